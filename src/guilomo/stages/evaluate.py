"""Evaluate stage: accuracy of the base model, or base + Adapter, on a PreparedDataset split.

Two modes:

- ``generate``: batched greedy generation from the prompt template; the answer letter is
  extracted from the response by ScienceQA's rule (:func:`extract_answer`) and compared with
  the record's ``answer``. A response with no (or several) answers counts as wrong and as a
  failure.
- ``loglik``: multiple-choice scoring. The options are parsed from the instruction's
  ``Options: (A) .. (B) ..`` line (:func:`parse_options`); each option is scored by the sum
  of the log-probabilities of the continuation ``"Answer: {option text}"`` after the prompt.
  ``accuracy`` takes the option with the highest sum, ``acc_norm`` the highest per-token mean.

The result is an ``EvalReport`` artifact with ``report.json``::

    report = run_evaluate(EvalConfig(mode="loglik"), dataset=data, out=out, adapter=adapter)
    report["accuracy"], report["per_subject"]["natural science"]["accuracy"]
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from ..artifacts import ArtifactWriter, read_artifact
from ..data.prepared import read_split
from ..data.prompts import Template, load_template

__all__ = [
    "ANSWER_PATTERN",
    "EvalConfig",
    "evaluate",
    "extract_answer",
    "parse_options",
    "run_evaluate",
]

# ScienceQA's rule (and MoLA's): case-sensitive, no word boundary after the letter.
ANSWER_PATTERN = re.compile(r"The answer is ([A-Z])")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CONTINUATION = "Answer: {option}"
# The options line: "Options: (A) " at the start of the instruction or of a line.
_OPTIONS_LINE = re.compile(r"(?:^|\n)Options: (?=\(A\) )")


class EvalConfig(BaseModel):
    """Evaluation settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["generate", "loglik"] = Field(
        default="generate",
        description="generate: greedy decoding + answer extraction; loglik: score each option.",
    )
    split: Literal["train", "validation", "test"] = Field(
        default="test", description="The PreparedDataset split to evaluate."
    )
    max_new_tokens: int = Field(
        default=16, ge=1, description="Tokens generated per prompt (generate mode)."
    )
    batch_size: int = Field(default=16, ge=1, description="Sequences per forward / generate call.")
    template: str = Field(default="alpaca", description="Prompt template name or JSON path.")
    limit: int | None = Field(
        default=None, ge=1, description="Evaluate only the first N records of the split."
    )
    base_model: str = Field(
        default="smollm2-135m", description="Model folder, hub id or smollm2-135m."
    )


# ----------------------------------------------------------------------------- parsing


def extract_answer(text: str) -> str | None:
    """The answer letter of a generated response, by ScienceQA's rule; None if there is none.

    All matches of ``The answer is ([A-Z])`` are found; exactly one match gives its letter,
    zero or several give None (scored wrong), even when the several agree. The rule is the
    reference's regex taken literally: case-sensitive ("the answer is A" has no match), the
    letter must follow "is " directly ("The answer is (A)" has no match), and nothing is
    required after the letter ("The answer is AB" and "The answer is Apple" both give "A").
    """
    found = ANSWER_PATTERN.findall(text)
    return found[0] if len(found) == 1 else None


def parse_options(instruction: str) -> list[tuple[str, str]]:
    """The ``(letter, text)`` options of a multiple-choice instruction.

    The options line is the last line starting ``Options: (A) `` (text after its end of line
    is not part of it). It is cut at `` (B) ``, then at `` (C) `` after that, and so on: only
    the next consecutive letter ends an option, so parentheses in option texts ("H (2)",
    "(a) or (b)", "see (D)") are kept. An option text containing the literal next marker
    (" (B) " inside option A) cannot be told apart and is cut there. Texts are stripped.

    Raises:
        ValueError: there is no options line, or it lists fewer than two options.
    """
    matches = list(_OPTIONS_LINE.finditer(instruction))
    if not matches:
        raise ValueError("no 'Options: (A) ...' line in the instruction")
    start = matches[-1].end()
    end = instruction.find("\n", start)
    line = instruction[start : end if end >= 0 else len(instruction)]
    pos = len("(A) ")
    options: list[tuple[str, str]] = []
    for i, letter in enumerate(LETTERS):
        nxt = re.compile(rf" \({LETTERS[i + 1]}\)(?: |$)") if i + 1 < len(LETTERS) else None
        m = nxt.search(line, pos) if nxt is not None else None
        if m is None:
            options.append((letter, line[pos:].strip()))
            break
        options.append((letter, line[pos : m.start()].strip()))
        pos = m.end()
    if len(options) < 2:
        raise ValueError("the options line lists only option A; need at least 2 options")
    return options


# ------------------------------------------------------------------------------ helpers


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set one")
    return int(pad)


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _batches(order: Sequence[int], size: int) -> list[list[int]]:
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def _check_records(records: Sequence[Mapping[str, Any]]) -> None:
    if not records:
        raise ValueError("no records to evaluate (the split is empty or limit is 0)")
    for i, r in enumerate(records):
        if not r.get("answer"):
            rid = r.get("id", f"#{i}")
            raise ValueError(
                f"record {rid}: no 'answer' to compare with; evaluate needs records with an "
                "answer letter (multiple-choice data)"
            )


def _record_id(record: Mapping[str, Any], index: int) -> str:
    return str(record.get("id", f"#{index}"))


# ----------------------------------------------------------------------------- generate


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def generation_kwargs(
    model: torch.nn.Module,
    tokenizer: Any,
    max_new_tokens: int,
) -> dict[str, Any]:
    """The arguments of ``model.generate`` for greedy decoding, independent of the model's
    own generation defaults (no sampling, beams or repetition penalty leak in)."""
    from transformers import GenerationConfig

    eos = _eos_ids(model, tokenizer)
    return {
        "generation_config": GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=_pad_id(tokenizer),
            eos_token_id=eos or None,
        )
    }


def _left_pad(seqs: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = [[pad] * (width - len(s)) + s for s in seqs]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in seqs]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def _generate(
    model: torch.nn.Module,
    tokenizer: Any,
    template: Template,
    records: Sequence[Mapping[str, Any]],
    config: EvalConfig,
    progress: bool,
) -> list[str]:
    """The response text of every record (greedy, batched with left padding)."""
    prompts = [
        _encode(tokenizer, template.prompt(r["instruction"], r.get("input", ""))) for r in records
    ]
    pad = _pad_id(tokenizer)
    eos = set(_eos_ids(model, tokenizer))
    kwargs = generation_kwargs(model, tokenizer, config.max_new_tokens)
    device = _device(model)
    # Longest first: similar lengths share a batch (less padding), and memory peaks early.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    responses = [""] * len(prompts)
    for batch in tqdm(_batches(order, config.batch_size), desc="evaluate", disable=not progress):
        ids, mask = _left_pad([prompts[i] for i in batch], pad)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row, i in enumerate(batch):
            new = out[row, ids.shape[1] :].tolist()
            stop = next((k for k, t in enumerate(new) if t in eos), len(new))
            text = tokenizer.decode(new[:stop], skip_special_tokens=True)
            # As the reference's split on the response marker: text after the prompt's marker
            # and before any marker the model generates itself.
            responses[i] = text.split(template.response_split)[0].strip()
    return responses


# ------------------------------------------------------------------------------- loglik


@dataclass
class _Request:
    record: int
    letter: str
    ids: list[int]
    boundary: int  # ids[boundary:] is the scored continuation


def loglik_requests(
    tokenizer: Any,
    template: Template,
    records: Sequence[Mapping[str, Any]],
) -> list[_Request]:
    """One scoring request per (record, option).

    The prompt and prompt + continuation are tokenised whole (BOS included, as in SFT); the
    continuation is ``ids[boundary:]`` where ``boundary`` is the prompt's token count. Should
    a token merge across the prompt/continuation seam (the prompt's tokens are then not a
    prefix of the full sequence), the boundary is the common prefix, so the merged token is
    scored with the continuation.
    """
    requests = []
    for index, record in enumerate(records):
        rid = _record_id(record, index)
        try:
            options = parse_options(record["instruction"])
        except ValueError as err:
            raise ValueError(
                f"record {rid}: {err}; loglik mode needs multiple-choice records"
            ) from None
        letters = [letter for letter, _ in options]
        if record["answer"] not in letters:
            raise ValueError(
                f"record {rid}: answer {record['answer']!r} is not one of its options {letters}"
            )
        prompt = template.prompt(record["instruction"], record.get("input", ""))
        p_ids = _encode(tokenizer, prompt)
        for letter, text in options:
            ids = _encode(tokenizer, prompt + CONTINUATION.format(option=text))
            boundary = 0
            limit = min(len(p_ids), len(ids))
            while boundary < limit and p_ids[boundary] == ids[boundary]:
                boundary += 1
            if boundary == 0 or boundary >= len(ids):
                raise ValueError(
                    f"record {rid}: option {letter} leaves no continuation token to score after "
                    "the prompt (or no prompt token to score it from)"
                )
            requests.append(_Request(index, letter, ids, boundary))
    return requests


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def score_requests(
    model: torch.nn.Module,
    requests: Sequence[_Request],
    pad: int,
    batch_size: int,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """(sum of continuation token log-probs, continuation token count) per request.

    One forward per batch of right-padded sequences (causal attention: the padding after a
    sequence cannot change its logits). Only the logits of the span that holds some
    continuation are computed (``logits_to_keep``) when the model supports it.
    """
    device = _device(model)
    keep_ok = _accepts_logits_to_keep(model)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
    for batch in tqdm(_batches(order, batch_size), desc="evaluate", disable=not progress):
        reqs = [requests[i] for i in batch]
        width = max(len(r.ids) for r in reqs)
        ids = torch.tensor([r.ids + [pad] * (width - len(r.ids)) for r in reqs], dtype=torch.long)
        mask = torch.tensor(
            [[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in reqs], dtype=torch.long
        )
        # logits at position t predict token t + 1: continuation tokens [b, n) need [b-1, n-1).
        lo = min(r.boundary for r in reqs) - 1 if keep_ok else 0
        hi = max(len(r.ids) for r in reqs) - 1 if keep_ok else width
        kwargs: dict[str, Any] = {}
        if keep_ok:
            kwargs["logits_to_keep"] = torch.arange(lo, hi, device=device)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
        for row, (i, r) in enumerate(zip(batch, reqs, strict=True)):
            n = len(r.ids)
            rows = logits[row, r.boundary - 1 - lo : n - 1 - lo].float()
            logp = torch.log_softmax(rows, dim=-1)
            target = torch.tensor(r.ids[r.boundary :], device=logp.device)
            total = logp.gather(1, target[:, None]).sum()
            scores[i] = (float(total), n - r.boundary)
    return scores


def _argmax(values: Mapping[str, float]) -> str:
    """The key of the largest value; ties go to the earliest option letter."""
    best = None
    for key, value in values.items():
        if best is None or value > values[best]:
            best = key
    assert best is not None
    return best


# ------------------------------------------------------------------------------ evaluate


def _per_subject(
    records: Sequence[Mapping[str, Any]], correct: Sequence[bool]
) -> dict[str, dict[str, Any]] | None:
    if not any(r.get("subject") for r in records):
        return None
    tally: dict[str, list[int]] = {}
    for r, ok in zip(records, correct, strict=True):
        t = tally.setdefault(str(r.get("subject") or "(none)"), [0, 0])
        t[0] += int(ok)
        t[1] += 1
    return {s: {"accuracy": c / n, "correct": c, "total": n} for s, (c, n) in sorted(tally.items())}


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    config: EvalConfig,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` on `records` (``config.limit`` is applied here).

    Returns:
        ``{"accuracy", "correct", "total", "failures", "per_subject" (when records have a
        subject), "predictions": [{"id", "answer", "prediction", "correct", ...}]}``; the
        predictions hold the ``response`` in generate mode and the per-option ``scores``
        (summed log-probs), ``prediction_norm`` and ``correct_norm`` in loglik mode, where
        the report also has ``acc_norm`` (failures are then always 0).

    Raises:
        ValueError: no records, a record without an answer, or (loglik) a record whose
            instruction has no options line; the message names the record's id.
    """
    if config.limit is not None:
        records = records[: config.limit]
    _check_records(records)
    template = load_template(config.template)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if config.mode == "generate":
                report = _evaluate_generate(model, tokenizer, template, records, config, progress)
            else:
                report = _evaluate_loglik(model, tokenizer, template, records, config, progress)
    finally:
        model.train(was_training)
    return report


def _summary(
    records: Sequence[Mapping[str, Any]], predictions: list[dict[str, Any]], failures: int
) -> dict[str, Any]:
    correct = [p["correct"] for p in predictions]
    report: dict[str, Any] = {
        "accuracy": sum(correct) / len(correct),
        "correct": sum(correct),
        "total": len(correct),
        "failures": failures,
    }
    per_subject = _per_subject(records, correct)
    if per_subject is not None:
        report["per_subject"] = per_subject
    return report


def _evaluate_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    template: Template,
    records: Sequence[Mapping[str, Any]],
    config: EvalConfig,
    progress: bool,
) -> dict[str, Any]:
    responses = _generate(model, tokenizer, template, records, config, progress)
    predictions = []
    for i, (r, response) in enumerate(zip(records, responses, strict=True)):
        pred = extract_answer(response)
        predictions.append(
            {
                "id": _record_id(r, i),
                "answer": r["answer"],
                "prediction": pred,
                "correct": pred is not None and pred == r["answer"],
                "response": response,
            }
        )
    failures = sum(p["prediction"] is None for p in predictions)
    report = _summary(records, predictions, failures)
    report["predictions"] = predictions
    return report


def _evaluate_loglik(
    model: torch.nn.Module,
    tokenizer: Any,
    template: Template,
    records: Sequence[Mapping[str, Any]],
    config: EvalConfig,
    progress: bool,
) -> dict[str, Any]:
    requests = loglik_requests(tokenizer, template, records)
    scored = score_requests(model, requests, _pad_id(tokenizer), config.batch_size, progress)
    sums: list[dict[str, float]] = [{} for _ in records]
    means: list[dict[str, float]] = [{} for _ in records]
    for req, (total, count) in zip(requests, scored, strict=True):
        sums[req.record][req.letter] = total
        means[req.record][req.letter] = total / count
    predictions = []
    for i, r in enumerate(records):
        pred, pred_norm = _argmax(sums[i]), _argmax(means[i])
        predictions.append(
            {
                "id": _record_id(r, i),
                "answer": r["answer"],
                "prediction": pred,
                "correct": pred == r["answer"],
                "prediction_norm": pred_norm,
                "correct_norm": pred_norm == r["answer"],
                "scores": sums[i],
            }
        )
    report = _summary(records, predictions, 0)
    report["acc_norm"] = sum(p["correct_norm"] for p in predictions) / len(predictions)
    report["predictions"] = predictions
    return report


# ------------------------------------------------------------------------------- stage


def run_evaluate(
    config: EvalConfig,
    *,
    dataset: Path,
    out: Path,
    adapter: Path | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    parents: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the base model (or base + `adapter`) on a split; write an EvalReport at `out`.

    The base model is ``load_model(config.base_model)`` unless `model` and `tokenizer` are
    given. An `adapter` must be a verified Adapter artifact; it is injected into the model in
    place (a passed-in `model` keeps it). Returns the report (also ``report.json``).

    Raises:
        ArtifactError: `dataset` or `adapter` is not a verified artifact of its kind, or the
            split is empty.
        ValueError: see :func:`evaluate`.
    """
    records = read_split(Path(dataset), config.split)
    if adapter is not None:
        read_artifact(Path(adapter), kind="Adapter")  # before the (slow) model load
    if model is None or tokenizer is None:
        from ..models import default_device, load_model

        model, tokenizer = load_model(config.base_model, device=default_device())
    moe = None
    if adapter is not None:
        from ..moe.model import load_adapter

        moe = load_adapter(model, Path(adapter))
        moe.reset_router_stats()
    report = evaluate(model, tokenizer, records, config, progress=progress)
    if moe is not None:  # per module, the share of routed tokens each expert received
        report["expert_load"] = moe.router_stats()
    meta = {
        "accuracy": report["accuracy"],
        "total": report["total"],
        "failures": report["failures"],
        "adapter": adapter is not None,
    }
    if "acc_norm" in report:
        meta["acc_norm"] = report["acc_norm"]
    with ArtifactWriter(
        out,
        kind="EvalReport",
        stage="evaluate",
        config=config,
        parents=parents,
        metadata=meta,
        overwrite=True,
    ) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
