"""Compare two evaluations of the same questions: how far apart they are, and how sure.

Both answered the same questions (checked: ids and gold answers, in order), so the test is
paired: a bootstrap interval of B - A and the exact McNemar test (`guilomo compare A B`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .evalstats import mcnemar_exact, paired_bootstrap, wilson_interval

Metric = Literal["acc", "acc_norm"]
#: The per-question field each metric reads; acc_norm is the length-normalised pick of the
#: option-scoring formulations ("rc", "mc"), which generation ("generate") does not have.
METRIC_FIELD: dict[str, str] = {"acc": "correct", "acc_norm": "correct_norm"}


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


def formulation(report: Mapping[str, Any]) -> str:
    """The report's formulation; reports written before it was recorded were generations."""
    return str(report.get("formulation", "generate"))


def _predictions(report: Mapping[str, Any], name: str) -> Sequence[Mapping[str, Any]]:
    if not isinstance(preds := report.get("predictions"), list):
        raise ValueError(
            f"{name}: the report has no 'predictions' list, so its questions cannot be paired; "
            "rerun `guilomo stage evaluate` to write one"
        )
    return preds


def _field(q: Any, key: str, name: str, i: int) -> Any:
    if not isinstance(q, Mapping) or key not in q:
        raise ValueError(f"{name}: question {i} of 'predictions' has no {key!r}")
    return q[key]


def _check_same_questions(pa: Sequence[Mapping[str, Any]], pb: Sequence[Mapping[str, Any]]) -> None:
    """Refuse, naming the first difference, unless A and B are the same questions in order."""
    if len(pa) != len(pb):
        raise ValueError(
            f"A has {len(pa)} questions, B has {len(pb)}: a paired comparison needs both "
            "evaluated on the same split of the same PreparedDataset"
        )
    for i, (qa, qb) in enumerate(zip(pa, pb, strict=True)):
        ida, idb = _field(qa, "id", "A", i), _field(qb, "id", "B", i)
        gold_a, gold_b = _field(qa, "answer", "A", i), _field(qb, "answer", "B", i)
        if ida != idb or gold_a != gold_b:
            raise ValueError(
                f"question {i}: A has id {ida!r} (answer {gold_a}), B has id {idb!r} "
                f"(answer {gold_b}); the reports are not of the same questions in the same "
                "order (question numbers count from 0, as in report.json's 'predictions')"
            )


def _right(
    report: Mapping[str, Any], preds: Sequence[Mapping[str, Any]], name: str, metric: Metric
) -> list[bool]:
    """Per question, whether the report's pick under `metric` was the gold answer."""
    if metric == "acc_norm" and formulation(report) == "generate":
        raise ValueError(
            f"{name} is a 'generate' report, and that formulation has no acc_norm (only 'rc' and "
            "'mc' score options and pick by length-normalised score); compare with --metric acc"
        )
    return [bool(_field(q, METRIC_FIELD[metric], name, i)) for i, q in enumerate(preds)]


def compare_reports(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    metric: Metric = "acc",
    resamples: int = 10000,
    seed: int = 0,
) -> Comparison:
    """Compare two report.json contents (A, the baseline, and B) on the same questions."""
    pa, pb = _predictions(a, "A"), _predictions(b, "B")
    _check_same_questions(pa, pb)
    right_a, right_b = _right(a, pa, "A", metric), _right(b, pb, "B", metric)
    n, k_a, k_b = len(right_a), sum(right_a), sum(right_b)
    a_only = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
    b_only = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
    diff, lo, hi = paired_bootstrap(right_a, right_b, resamples=resamples, seed=seed)
    return Comparison(
        n=n,
        acc_a=k_a / n,
        acc_b=k_b / n,
        ci_a=wilson_interval(k_a, n),
        ci_b=wilson_interval(k_b, n),
        diff=diff,
        diff_ci=(lo, hi),
        b_only=b_only,
        a_only=a_only,
        p_value=mcnemar_exact(a_only, b_only),
        metric=metric,
        formulation_a=formulation(a),
        formulation_b=formulation(b),
        resamples=resamples,
        seed=seed,
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
    p = f"{cmp.p_value:.3f}" if cmp.p_value >= 0.001 else f"{cmp.p_value:.1e}"
    return "\n".join(
        [
            *lines,
            f"B - A: {100 * cmp.diff:+.1f} points, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}] "
            f"(paired bootstrap, {cmp.resamples:,} resamples, seed {cmp.seed})",
            f"McNemar exact: A only right {cmp.a_only:,}, B only right {cmp.b_only:,}, p = {p}",
        ]
    )
