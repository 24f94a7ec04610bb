"""Compare two evaluations of the same questions: how far apart they are, and how sure. Both
answered the same questions (checked: ids and gold answers, in order), so the test is paired:
a bootstrap interval of B - A and the exact McNemar test (`guilomo compare A B`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .evalstats import mcnemar_exact, paired_bootstrap, wilson_interval

Metric = Literal["acc", "acc_norm"]
#: The per-question field each metric reads; acc_norm is the length-normalised pick of the
#: option-scoring formulations ("rc", "mc"), which generation ("generate") does not have.
METRIC_FIELD: dict[str, str] = {"acc": "correct", "acc_norm": "correct_norm"}
Report = Mapping[str, Any]  # a report.json's contents


@dataclass(frozen=True)
class Comparison:
    """Two evaluations of the same `n` questions under one metric (fractions, not percent):
    95% Wilson intervals, `diff` = acc_b - acc_a with its paired bootstrap interval, the
    questions only B / only A got right and the McNemar `p_value` on those two counts."""

    n: int
    acc_a: float
    acc_b: float
    ci_a: tuple[float, float]
    ci_b: tuple[float, float]
    diff: float
    diff_ci: tuple[float, float]
    b_only: int
    a_only: int
    p_value: float
    metric: Metric
    formulation_a: str
    formulation_b: str
    resamples: int
    seed: int


def formulation(report: Report) -> str:
    """The report's formulation; reports written before it was recorded were generations."""
    return str(report.get("formulation", "generate"))


def _column(report: Report, name: str, key: str) -> list:
    """`key` of every question in the report's 'predictions' (`name`, A or B, for the errors)."""
    if not isinstance(preds := report.get("predictions"), list):
        raise ValueError(
            f"{name}: the report has no 'predictions' list, so its questions cannot be paired; "
            "rerun `guilomo stage evaluate` to write one"
        )
    for i, q in enumerate(preds):
        if not isinstance(q, Mapping) or key not in q:
            raise ValueError(f"{name}: question {i} of 'predictions' has no {key!r}")
    return [q[key] for q in preds]


def _check_same_questions(a: Report, b: Report) -> None:
    """Refuse, naming the first difference, unless A and B are the same questions in order."""
    ids_a, ids_b = _column(a, "A", "id"), _column(b, "B", "id")
    if len(ids_a) != len(ids_b):
        raise ValueError(
            f"A has {len(ids_a)} questions, B has {len(ids_b)}: a paired comparison needs both "
            "evaluated on the same split of the same PreparedDataset"
        )
    gold_a, gold_b = _column(a, "A", "answer"), _column(b, "B", "answer")
    for i, (ida, idb, ga, gb) in enumerate(zip(ids_a, ids_b, gold_a, gold_b, strict=True)):
        if ida != idb or ga != gb:
            raise ValueError(
                f"question {i}: A has id {ida!r} (answer {ga}), B has id {idb!r} "
                f"(answer {gb}); the reports are not of the same questions in the same "
                "order (question numbers count from 0, as in report.json's 'predictions')"
            )


def _right(report: Report, name: str, metric: Metric) -> list[bool]:
    """Per question, whether the report's pick under `metric` was the gold answer."""
    if metric == "acc_norm" and formulation(report) == "generate":
        raise ValueError(
            f"{name} is a 'generate' report, and that formulation has no acc_norm (only 'rc' and "
            "'mc' score options and pick by length-normalised score); compare with --metric acc"
        )
    return [bool(x) for x in _column(report, name, METRIC_FIELD[metric])]


def compare_reports(
    a: Report, b: Report, *, metric: Metric = "acc", resamples: int = 10000, seed: int = 0
) -> Comparison:
    """Compare two report.json contents (A, the baseline, and B) on the same questions."""
    _check_same_questions(a, b)
    right_a, right_b = _right(a, "A", metric), _right(b, "B", metric)
    n, k_a, k_b = len(right_a), sum(right_a), sum(right_b)
    a_only = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
    b_only = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
    diff, lo, hi = paired_bootstrap(right_a, right_b, resamples=resamples, seed=seed)
    return Comparison(
        n=n,
        metric=metric,
        formulation_a=formulation(a),
        formulation_b=formulation(b),
        acc_a=k_a / n,
        acc_b=k_b / n,
        ci_a=wilson_interval(k_a, n),
        ci_b=wilson_interval(k_b, n),
        diff=diff,
        diff_ci=(lo, hi),
        resamples=resamples,
        seed=seed,
        a_only=a_only,
        b_only=b_only,
        p_value=mcnemar_exact(a_only, b_only),
    )


def format_comparison(cmp: Comparison, name_a: str, name_b: str) -> str:
    """Four lines: each accuracy with its Wilson interval, B - A with its bootstrap
    interval, and the McNemar counts and p-value (percent and points, one decimal)."""
    lines = [
        f"{tag} {name}: {100 * acc:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] "
        f"(N={cmp.n:,}, {form}, {cmp.metric})"
        for tag, name, acc, ci, form in (
            ("A", name_a, cmp.acc_a, cmp.ci_a, cmp.formulation_a),
            ("B", name_b, cmp.acc_b, cmp.ci_b, cmp.formulation_b),
        )
    ]
    lo, hi = cmp.diff_ci
    lines.append(
        f"B - A: {100 * cmp.diff:+.1f} points, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}] "
        f"(paired bootstrap, {cmp.resamples:,} resamples, seed {cmp.seed})"
    )
    p = f"{cmp.p_value:.3f}" if cmp.p_value >= 0.001 else f"{cmp.p_value:.1e}"
    counts = f"A only right {cmp.a_only:,}, B only right {cmp.b_only:,}"
    lines.append(f"McNemar exact: {counts}, p = {p}")
    return "\n".join(lines)
