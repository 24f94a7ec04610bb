"""Evaluate stage: accuracy of the base model, or base + Adapter, on a PreparedDataset split,
in the formulation the dataset was prepared in (and the adapter trained in).

- ``rc`` and ``mc``: each option's continuation is scored by its summed log-likelihood
  after its context (`guilomo.scoring`, tokenised as lm-evaluation-harness does). ``acc``
  picks the largest sum, ``acc_norm`` the largest sum per character of the option text
  (the harness's definition).
- ``generate``: batched greedy decoding after the prompt; the answer letter is read by
  ScienceQA's strict rule (exactly one ``The answer is X``) and compared with the gold
  letter. A lenient reading ("The answer is (B)", "B)", a lone "B") is counted beside it
  for the report, never in the accuracy.

Every accuracy comes with its N and 95% Wilson interval, the distribution of predicted
answers and the majority-answer baseline of the same questions. The result is an
``EvalReport`` artifact with ``report.json``::

    report = run_evaluate(EvalConfig(), dataset=data, out=out, adapter=adapter)
    report["accuracy"], report["ci95"], report["majority_baseline"]["accuracy"]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..artifacts.adapter import check_adapter
from ..artifacts.eval_report import write_report
from ..artifacts.prepared import dataset_info, read_split
from ..config import EvalConfig
from ..data.formulations import LETTERS, Formulation, scored_pairs
from ..evalstats import summarise, wilson_interval
from ..scoring import encode, encode_pair, loglikelihoods, model_device, pad_id
from . import Context, Metrics

__all__ = [
    "ANSWER_PATTERN",
    "EvalConfig",
    "evaluate",
    "extract_answer",
    "lenient_answer",
    "run_evaluate",
]

# ScienceQA's rule (and MoLA's): case-sensitive, no word boundary after the letter.
ANSWER_PATTERN = re.compile(r"The answer is ([A-Z])")
# What a reader would still take for an answer, the letter always a capital standing alone:
# "the answer is (B)" / "Answer: B" anywhere, or a response opening with "(B)",
# "B)", "B." or "B:", or that is just "B".
_LENIENT = (
    re.compile(r"(?i:answer(?: is)?):?\s*\(?([A-Z])(?![A-Za-z])"),
    re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?:[).:]|\s*$))"),
)


# ----------------------------------------------------------------------------- answers


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


def lenient_answer(text: str) -> str | None:
    """The letter a lenient reader takes from a response the strict rule may reject:
    "the answer is (B)", "The answer is: B", "(B) heat", "B) heat", "B". None when no
    pattern or more than one distinct letter matches."""
    for pattern in _LENIENT:
        found = {"".join(m) if isinstance(m, tuple) else m for m in pattern.findall(text)}
        if len(found) == 1:
            return found.pop()
        if found:
            return None
    return None


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
            pad_token_id=pad_id(tokenizer),
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
    records: Sequence[Mapping[str, Any]],
    config: EvalConfig,
    response_split: str | None,
    progress: bool,
) -> list[str]:
    """The response text of every record (greedy, batched with left padding)."""
    prompts = [encode(tokenizer, r["prompt"]) for r in records]
    pad = pad_id(tokenizer)
    eos = set(_eos_ids(model, tokenizer))
    kwargs = generation_kwargs(model, tokenizer, config.max_new_tokens)
    device = model_device(model)
    # Longest first: similar lengths share a batch (less padding), and memory peaks early.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    responses = [""] * len(prompts)
    for batch in tqdm(batches, desc="evaluate", disable=not progress):
        ids, mask = _left_pad([prompts[i] for i in batch], pad)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row, i in enumerate(batch):
            new = out[row, ids.shape[1] :].tolist()
            stop = next((k for k, t in enumerate(new) if t in eos), len(new))
            text = tokenizer.decode(new[:stop], skip_special_tokens=True)
            # As the reference's split on the response marker: text before any marker the
            # model generates itself.
            if response_split:
                text = text.split(response_split)[0]
            responses[i] = text.strip()
    return responses


def _evaluate_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    config: EvalConfig,
    response_split: str | None,
    progress: bool,
) -> dict[str, Any]:
    responses = _generate(model, tokenizer, records, config, response_split, progress)
    predictions = []
    for i, (r, response) in enumerate(zip(records, responses, strict=True)):
        pred = extract_answer(response)
        lenient = lenient_answer(response) if pred is None else pred
        predictions.append(
            {
                "id": _record_id(r, i),
                "answer": r["answer"],
                "prediction": pred,
                "correct": pred is not None and pred == r["answer"],
                "lenient": lenient,
                "response": response,
            }
        )
    report = _summary(records, predictions)
    rejected = [p for p in predictions if p["prediction"] is None]
    report["failures"] = len(rejected)
    readable = [p for p in rejected if p["lenient"] is not None]
    report["lenient"] = {
        "rejected_but_readable": len(readable),
        "of_which_correct": sum(p["lenient"] == p["answer"] for p in readable),
        "note": "answers the strict rule rejected that a lenient reading takes (e.g. "
        "'The answer is (B)'); not counted in the accuracy",
    }
    report["predictions"] = predictions
    return report


# ----------------------------------------------------------------------------- log-lik


def _evaluate_loglik(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    config: EvalConfig,
    progress: bool,
) -> dict[str, Any]:
    pairs, owner = [], []
    for i, r in enumerate(records):
        for context, continuation in scored_pairs(r):
            try:
                pairs.append(encode_pair(tokenizer, context, continuation))
            except ValueError as err:
                raise ValueError(f"record {_record_id(r, i)}: {err}") from None
            owner.append(i)
    scores = loglikelihoods(
        model, pairs, pad=pad_id(tokenizer), batch_size=config.batch_size, progress=progress
    )
    per_record: list[list[float]] = [[] for _ in records]
    for i, s in zip(owner, scores, strict=True):
        per_record[i].append(s)
    predictions = []
    for i, (r, lls) in enumerate(zip(records, per_record, strict=True)):
        # per character of the option text, not of the delimiter (the harness's acc_norm)
        norm = [ll / len(text) for ll, text in zip(lls, r["choices"], strict=True)]
        pred, pred_norm = _argmax(lls), _argmax(norm)
        predictions.append(
            {
                "id": _record_id(r, i),
                "answer": r["answer"],
                "prediction": LETTERS[pred],
                "correct": LETTERS[pred] == r["answer"],
                "prediction_norm": LETTERS[pred_norm],
                "correct_norm": LETTERS[pred_norm] == r["answer"],
                "scores": lls,
                "scores_norm": norm,
            }
        )
    report = _summary(records, predictions)
    norm = summarise(
        [p["correct_norm"] for p in predictions],
        [p["prediction_norm"] for p in predictions],
        [p["answer"] for p in predictions],
    )
    report["acc_norm"] = norm["accuracy"]
    report["correct_norm"] = norm["correct"]
    report["acc_norm_ci95"] = norm["ci95"]
    report["predicted_norm"] = norm["predicted"]
    report["predictions"] = predictions
    return report


def _argmax(values: Sequence[float]) -> int:
    """The index of the largest value; ties go to the earliest option."""
    return max(range(len(values)), key=lambda j: (values[j], -j))


# ------------------------------------------------------------------------------ evaluate


def _record_id(record: Mapping[str, Any], index: int) -> str:
    return str(record.get("id", f"#{index}"))


def _check_records(records: Sequence[Mapping[str, Any]], formulation: Formulation) -> None:
    if not records:
        raise ValueError("no records to evaluate (the split is empty or limit is 0)")
    for i, r in enumerate(records):
        rid = _record_id(r, i)
        if not r.get("answer"):
            raise ValueError(
                f"record {rid}: no 'answer' to compare with; evaluate needs records with an "
                "answer letter (multiple-choice data)"
            )
        if "prompt" not in r:
            raise ValueError(f"record {rid}: no 'prompt'; rerun preprocess to formulate it")
        if formulation != "generate":
            if not r.get("choices"):
                raise ValueError(f"record {rid}: no 'choices' to score ({formulation})")
            letters = LETTERS[: len(r["choices"])]
            if r["answer"] not in letters:
                raise ValueError(
                    f"record {rid}: answer {r['answer']!r} is not one of its options "
                    f"{list(letters)}"
                )


def _breakdown(
    records: Sequence[Mapping[str, Any]], correct: Sequence[bool], key: str
) -> dict[str, dict[str, Any]]:
    """Accuracy per value of `key` (subject, source), with intervals."""
    tally: dict[str, list[int]] = {}
    for r, ok in zip(records, correct, strict=True):
        t = tally.setdefault(str(r.get(key) or "(none)"), [0, 0])
        t[0] += int(ok)
        t[1] += 1
    return {
        s: {"accuracy": c / n, "correct": c, "total": n, "ci95": list(wilson_interval(c, n))}
        for s, (c, n) in sorted(tally.items())
    }


def _summary(
    records: Sequence[Mapping[str, Any]], predictions: list[dict[str, Any]]
) -> dict[str, Any]:
    correct = [p["correct"] for p in predictions]
    report = summarise(
        correct, [p["prediction"] for p in predictions], [p["answer"] for p in predictions]
    )
    if any(r.get("subject") for r in records):
        report["per_subject"] = _breakdown(records, correct, "subject")
    if len({r.get("source") for r in records}) > 1:
        report["per_source"] = _breakdown(records, correct, "source")
    return report


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    config: EvalConfig,
    *,
    formulation: Formulation,
    response_split: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` on formulated `records` (``config.limit`` is applied here).

    Returns:
        ``{"formulation", "accuracy", "correct", "total", "ci95", "predicted", "gold",
        "majority_baseline", "per_subject" / "per_source" (when there are several),
        "predictions": [{"id", "answer", "prediction", "correct", ...}]}``. rc / mc add
        ``acc_norm``, ``acc_norm_ci95``, ``predicted_norm`` and per prediction the options'
        ``scores`` (summed log-likelihoods), ``scores_norm``, ``prediction_norm``; generate
        adds ``failures`` (no answer by the strict rule), ``lenient`` and each ``response``.

    Raises:
        ValueError: no records, a record without an answer, prompt or choices, or an answer
            outside its options; the message names the record's id.
    """
    if config.limit is not None:
        records = records[: config.limit]
    _check_records(records, formulation)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if formulation == "generate":
                report = _evaluate_generate(
                    model, tokenizer, records, config, response_split, progress
                )
            else:
                report = _evaluate_loglik(model, tokenizer, records, config, progress)
    finally:
        model.train(was_training)
    return {"formulation": formulation, "split": config.split, **report}


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

    The formulation is the dataset's. The base model is ``load_model(config.base_model)``
    unless `model` and `tokenizer` are given. An `adapter` must be a verified Adapter
    artifact; it is injected into the model in place (a passed-in `model` keeps it). Returns
    the report (also ``report.json``).

    Raises:
        ArtifactError: `dataset` or `adapter` is not a verified artifact of its kind, or the
            split is empty.
        ValueError: see :func:`evaluate`.
    """
    info = dataset_info(Path(dataset))
    records = read_split(Path(dataset), config.split)
    if adapter is not None:
        check_adapter(adapter)  # before the (slow) model load
    base = None  # the base model's identity, when this stage loads it
    if model is None or tokenizer is None:
        from ..models import default_device, load_model, model_identity

        base = model_identity(config.base_model)
        model, tokenizer = load_model(config.base_model, device=default_device())
    moe = None
    if adapter is not None:
        from ..moe.model import load_adapter

        moe = load_adapter(model, Path(adapter))
        moe.reset_router_stats()
    report = evaluate(
        model,
        tokenizer,
        records,
        config,
        formulation=info["formulation"],
        response_split=info.get("response_split"),
        progress=progress,
    )
    if moe is not None:  # per module, the share of routed tokens each expert received
        report["expert_load"] = moe.router_stats()

    def plots(folder: Path) -> None:
        if report.get("expert_load"):
            from ..plots import expert_load

            expert_load(report["expert_load"], folder / "plots" / "expert_load.png")

    meta = _metadata(report, adapter is not None, base)
    write_report(out, report, metadata=meta, config=config, parents=parents, extra=plots)
    return report


def _metadata(report: Mapping[str, Any], adapted: bool, base: dict | None) -> dict[str, Any]:
    """The report's summary for the manifest (and the base model's identity, if loaded)."""
    meta = {
        "formulation": report["formulation"],
        "accuracy": report["accuracy"],
        "ci95": report["ci95"],
        "total": report["total"],
        "majority_baseline": report["majority_baseline"]["accuracy"],
        "adapter": adapted,
    } | ({"base_model": base} if base else {})
    return meta | {key: report[key] for key in ("acc_norm", "failures") if key in report}


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a report worth a metric: accuracy and its interval, N, the majority
    baseline, and acc_norm (rc, mc) or the failures and lenient count (generate)."""
    metrics = {
        "accuracy": report["accuracy"],
        "accuracy_ci95_low": report["ci95"][0],
        "accuracy_ci95_high": report["ci95"][1],
        "total": report["total"],
        "majority_baseline": report["majority_baseline"]["accuracy"],
    }
    if "acc_norm" in report:
        metrics["acc_norm"] = report["acc_norm"]
        metrics["acc_norm_ci95_low"], metrics["acc_norm_ci95_high"] = report["acc_norm_ci95"]
    if "failures" in report:
        metrics["failures"] = report["failures"]
        metrics["lenient_readable"] = report["lenient"]["rejected_but_readable"]
    return {k: float(v) for k, v in metrics.items()}


def headline(report: Mapping[str, Any]) -> str:
    """One line: accuracy [interval] (N, formulation), acc_norm, the majority baseline."""
    lo, hi = report["ci95"]
    text = (
        f"accuracy {report['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] "
        f"(N={report['total']}, {report['formulation']})"
    )
    if "acc_norm" in report:
        nlo, nhi = report["acc_norm_ci95"]
        text += f", acc_norm {report['acc_norm']:.1%} [{nlo:.1%}, {nhi:.1%}]"
    if "failures" in report:
        text += f", no answer {report['failures']}"
    base = report["majority_baseline"]
    return text + f"; always '{base['answer']}': {base['accuracy']:.1%}"


def run(config: EvalConfig, inputs: dict, out: Path, context: Context) -> Metrics:
    report = run_evaluate(
        config,
        dataset=inputs["dataset"],
        out=out,
        adapter=inputs.get("adapter"),
        parents=context.parents,
        progress=context.progress,
    )
    context.tags["guilomo.formulation"] = report["formulation"]
    context.say(headline(report))
    return report_metrics(report)
