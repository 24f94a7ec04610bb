"""Evaluate stage: accuracy of the base model, or base + Adapter, on a PreparedDataset split
in its formulation: ``rc`` / ``mc`` score each option's log-likelihood (``acc``: the largest
sum, ``acc_norm``: per character, as the harness), ``generate`` decodes greedily and reads the
letter by ScienceQA's strict rule (a lenient reading is reported beside it, never counted).
Every accuracy comes with its N, 95% Wilson interval and the majority-answer baseline."""

from __future__ import annotations

import re
from collections import Counter
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
from ..scoring import encode, encode_pair, loglikelihoods, model_device, pad_batch, pad_id
from . import Context, Metrics

# ScienceQA's rule (and MoLA's): case-sensitive, no word boundary after the letter.
ANSWER_PATTERN = re.compile(r"The answer is ([A-Z])")
# What a reader would still take for an answer, the letter always a capital standing alone:
# "the answer is (B)" / "Answer: B" anywhere, or a response opening with "(B)",
# "B)", "B." or "B:", or that is just "B".
_LENIENT = (
    re.compile(r"(?i:answer(?: is)?):?\s*\(?([A-Z])(?![A-Za-z])"),
    re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?:[).:]|\s*$))"),
)


Records = Sequence[Mapping[str, Any]]


# -- answers ---------------------------------------------------------------------------------
def extract_answer(text: str) -> str | None:
    """The answer letter of a response by ScienceQA's rule, taken literally: exactly one match
    of `ANSWER_PATTERN` gives its letter; none or several (even agreeing) give None. So "the
    answer is A" and "The answer is (A)" have none, "The answer is Apple" gives "A"."""
    found = ANSWER_PATTERN.findall(text)
    return found[0] if len(found) == 1 else None


def lenient_answer(text: str) -> str | None:
    """The letter a lenient reader takes from a response the strict rule may reject; None when
    no pattern or more than one distinct letter matches."""
    for pattern in _LENIENT:
        found = {"".join(m) if isinstance(m, tuple) else m for m in pattern.findall(text)}
        if found:
            return found.pop() if len(found) == 1 else None
    return None


# -- generate --------------------------------------------------------------------------------
def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    gen = getattr(model, "generation_config", None)
    values = (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id)
    flat = [v for x in values for v in (x if isinstance(x, (list, tuple)) else [x])]
    return list(dict.fromkeys(int(v) for v in flat if v is not None))


def _generate(
    model: torch.nn.Module, tokenizer: Any, records: Records, config: EvalConfig, progress: bool
) -> list[str]:
    """The generated text of every record (greedy, batched with left padding)."""
    from transformers import GenerationConfig

    prompts = [encode(tokenizer, r["prompt"]) for r in records]
    pad, eos = pad_id(tokenizer), _eos_ids(model, tokenizer)
    # Greedy whatever the model's own generation defaults (no sampling, beams or penalties).
    greedy = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos or None,
    )
    device = model_device(model)
    # Longest first: similar lengths share a batch (less padding), and memory peaks early.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    starts = range(0, len(order), config.batch_size)
    for start in tqdm(starts, desc="evaluate", disable=not progress):
        batch = order[start : start + config.batch_size]
        ids, mask = pad_batch([prompts[i] for i in batch], pad)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=greedy
        )
        for row, i in enumerate(batch):
            new = out[row, ids.shape[1] :].tolist()
            stop = next((k for k, t in enumerate(new) if t in eos), len(new))
            texts[i] = tokenizer.decode(new[:stop], skip_special_tokens=True)
    return texts


def _read_responses(records: Records, texts: Sequence[str], split: str | None) -> dict[str, Any]:
    predictions = []
    for i, (r, text) in enumerate(zip(records, texts, strict=True)):
        # As the reference's split on the response marker: text before any marker the model
        # generates itself.
        response = (text.split(split)[0] if split else text).strip()
        pred = extract_answer(response)
        lenient = lenient_answer(response) if pred is None else pred
        predictions.append(_prediction(r, i, pred) | {"lenient": lenient, "response": response})
    rejected = [p for p in predictions if p["prediction"] is None]
    readable = [p for p in rejected if p["lenient"] is not None]
    lenient = {
        "rejected_but_readable": len(readable),
        "of_which_correct": sum(p["lenient"] == p["answer"] for p in readable),
        "note": "answers the strict rule rejected that a lenient reading takes (e.g. "
        "'The answer is (B)'); not counted in the accuracy",
    }
    summary = _summary(records, predictions)
    return summary | {"failures": len(rejected), "lenient": lenient, "predictions": predictions}


# -- log-likelihood --------------------------------------------------------------------------
def _score_options(
    model: torch.nn.Module, tokenizer: Any, records: Records, config: EvalConfig, progress: bool
) -> dict[str, Any]:
    pairs = []
    for i, r in enumerate(records):
        try:
            pairs += [encode_pair(tokenizer, ctx, cont) for ctx, cont in scored_pairs(r)]
        except ValueError as err:
            raise ValueError(f"record {_record_id(r, i)}: {err}") from None
    pad, size = pad_id(tokenizer), config.batch_size
    scores = iter(loglikelihoods(model, pairs, pad=pad, batch_size=size, progress=progress))
    predictions = []
    for i, r in enumerate(records):
        lls = [next(scores) for _ in r["choices"]]  # one pair per option, in option order
        # per character of the option text, not of the delimiter (the harness's acc_norm)
        norm = [ll / len(text) for ll, text in zip(lls, r["choices"], strict=True)]
        pred_norm = LETTERS[norm.index(max(norm))]  # index: ties go to the earliest option
        predictions.append(
            _prediction(r, i, LETTERS[lls.index(max(lls))])
            | {"prediction_norm": pred_norm, "correct_norm": pred_norm == r["answer"]}
            | {"scores": lls, "scores_norm": norm}
        )
    norm = summarise(*_columns(predictions, "_norm"))
    return _summary(records, predictions) | {
        "acc_norm": norm["accuracy"],
        "correct_norm": norm["correct"],
        "acc_norm_ci95": norm["ci95"],
        "predicted_norm": norm["predicted"],
        "predictions": predictions,
    }


# -- evaluate --------------------------------------------------------------------------------
def _record_id(record: Mapping[str, Any], index: int) -> str:
    return str(record.get("id", f"#{index}"))


def _prediction(record: Mapping[str, Any], index: int, pred: str | None) -> dict[str, Any]:
    """The fields every prediction has (an answer is never None: no answer is wrong)."""
    rid, answer = _record_id(record, index), record["answer"]
    return {"id": rid, "answer": answer, "prediction": pred, "correct": pred == answer}


def _check_records(records: Records, formulation: Formulation) -> None:
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
        if formulation == "generate":
            continue
        if not r.get("choices"):
            raise ValueError(f"record {rid}: no 'choices' to score ({formulation})")
        letters = LETTERS[: len(r["choices"])]
        if r["answer"] not in letters:
            raise ValueError(
                f"record {rid}: answer {r['answer']!r} is not one of its options {list(letters)}"
            )


def _breakdown(records: Records, correct: Sequence[bool], key: str) -> dict[str, dict[str, Any]]:
    """Accuracy per value of `key` (subject, source), with intervals."""
    groups = [str(r.get(key) or "(none)") for r in records]
    right = Counter(g for g, ok in zip(groups, correct, strict=True) if ok)
    out = {}
    for s, n in sorted(Counter(groups).items()):
        c = right[s]
        out[s] = {"accuracy": c / n, "correct": c, "total": n, "ci95": list(wilson_interval(c, n))}
    return out


def _columns(predictions: Sequence[Mapping[str, Any]], suffix: str = "") -> tuple[list, ...]:
    """(correct, prediction, answer) per prediction, of the metric named by `suffix`."""
    keys = (f"correct{suffix}", f"prediction{suffix}", "answer")
    return tuple([p[k] for p in predictions] for k in keys)


def _summary(records: Records, predictions: list[dict[str, Any]]) -> dict[str, Any]:
    correct, *rest = _columns(predictions)
    report = summarise(correct, *rest)
    if any(r.get("subject") for r in records):
        report["per_subject"] = _breakdown(records, correct, "subject")
    if len({r.get("source") for r in records}) > 1:
        report["per_source"] = _breakdown(records, correct, "source")
    return report


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Records,
    config: EvalConfig,
    *,
    formulation: Formulation,
    response_split: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The report of `model` on formulated `records` (the first ``config.limit``): `summarise`'s
    fields, ``per_subject`` / ``per_source``, ``predictions``, and acc_norm's (rc, mc) or the
    failures and lenient reading (generate); `ValueError` names a malformed record."""
    if config.limit is not None:
        records = records[: config.limit]
    _check_records(records, formulation)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if formulation == "generate":
                texts = _generate(model, tokenizer, records, config, progress)
                report = _read_responses(records, texts, response_split)
            else:
                report = _score_options(model, tokenizer, records, config, progress)
    finally:
        model.train(was_training)
    return {"formulation": formulation, "split": config.split, **report}


# -- stage -----------------------------------------------------------------------------------
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
    """Evaluate ``config.base_model`` (or `model`), plus `adapter` injected in place if given,
    on a split of `dataset`; write an EvalReport at `out` and return the report."""
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

    # the report's summary for the manifest (and the base model's identity, if loaded)
    meta = {key: report[key] for key in ("formulation", "accuracy", "ci95", "total")}
    meta["majority_baseline"] = report["majority_baseline"]["accuracy"]
    meta |= {"adapter": adapter is not None} | ({"base_model": base} if base else {})
    meta |= {key: report[key] for key in ("acc_norm", "failures") if key in report}
    write_report(out, report, metadata=meta, config=config, parents=parents, extra=plots)
    return report


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a report worth a metric: accuracy and its interval, N, the majority
    baseline, and acc_norm (rc, mc) or the failures and lenient count (generate)."""
    (lo, hi), base = report["ci95"], report["majority_baseline"]["accuracy"]
    metrics = {"accuracy": report["accuracy"], "accuracy_ci95_low": lo, "accuracy_ci95_high": hi}
    metrics |= {"total": report["total"], "majority_baseline": base}
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
    text = f"accuracy {report['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] "
    text += f"(N={report['total']}, {report['formulation']})"
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
