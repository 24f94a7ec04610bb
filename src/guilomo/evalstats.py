"""How sure an accuracy, and a difference of two, is (pure Python + numpy): 41.2% on 570
questions is 41.2% +- 4 points, and two adapters 2 points apart on the same questions may well
be tied. Wilson, not normal, intervals: sound at 0/n, n/n and small n."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

# Index draws per chunk of the bootstrap: resamples x N indices are drawn this many at a
# time (8 MiB of int64), so N = 10,000 questions x 10,000 resamples never holds 800 MB.
_CHUNK_ELEMENTS = 1 << 20


def _z(confidence: float) -> float:
    """The two-sided normal quantile of `confidence` (1.96 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of `correct / total`: with p = k/n and z the normal quantile,
    centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)."""
    if total <= 0:
        raise ValueError(f"total must be >= 1 question, got {total}: there is no accuracy to bound")
    if not 0 <= correct <= total:
        raise ValueError(f"correct must be between 0 and total={total}, got {correct}")
    z, p = _z(confidence), correct / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1.0 - p) / total + z * z / (4 * total * total)) / denom
    # The interval always holds p (at 0/n and n/n one end is exactly 0 or 1): clip the
    # rounding error of centre -+ half around it.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """The two-sided exact McNemar p-value from the questions only A (`b`) or only B (`c`) got
    right: each is a fair coin if both are equally good, so p = min(1, 2 P(X <= min(b, c))),
    X ~ Binomial(b + c, 1/2), exactly in integers; 1 without discordant questions."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts are >= 0, got b={b}, c={c}")
    n = b + c  # n = 0: tail 1, so p = 1
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # int / int: exact, then rounded once to a float


def paired_bootstrap(
    a: Sequence[bool],
    b: Sequence[bool],
    *,
    resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """(accuracy(b) - accuracy(a), lower, upper) by the seeded percentile paired bootstrap:
    `a[i]`, `b[i]` say whether A and B got question i right; each resample draws N question
    indices with replacement, the same for both (the pairing)."""
    xa, xb = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if xa.shape != xb.shape:
        raise ValueError(
            f"a paired bootstrap needs the same questions: a has {xa.size}, b has {xb.size}"
        )
    if (n := xa.size) == 0:
        raise ValueError("no questions: there is no difference to bound")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    _z(confidence)  # validates confidence
    d = xb.astype(np.int8) - xa.astype(np.int8)  # (N,) per question: -1, 0 or +1
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)
    diffs = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))  # (rows, N) question indices
        diffs[start:stop] = d[idx].sum(axis=1, dtype=np.int64) / n  # (rows,)
    lo, hi = np.quantile(diffs, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(d.sum() / n), float(lo), float(hi)


def summarise(
    correct: Sequence[bool], predictions: Sequence[str | None], answers: Sequence[str]
) -> dict[str, Any]:
    """``{"accuracy", "correct", "total", "ci95", "predicted", "gold", "majority_baseline"}``
    of one evaluation. "predicted" counts every gold or predicted letter, zeros included (a
    model that never says "D" shows "D": 0), and "none" (no answer) when there is one. The
    majority baseline answers the most common gold letter (ties: the earliest)."""
    n = len(correct)
    if not n == len(predictions) == len(answers):
        raise ValueError(
            f"correct, predictions and answers differ in length: {n}, {len(predictions)}, "
            f"{len(answers)}"
        )
    if n == 0:
        raise ValueError("no questions to summarise")
    k = sum(bool(x) for x in correct)
    gold = dict(sorted(Counter(answers).items()))
    picked = Counter(predictions)  # None: no answer
    predicted = {x: picked[x] for x in sorted(set(gold) | set(picked) - {None})}
    if picked[None]:
        predicted["none"] = picked[None]
    top = min(gold, key=lambda x: (-gold[x], x))
    return {
        "accuracy": k / n,
        "correct": k,
        "total": n,
        "ci95": list(wilson_interval(k, n)),
        "predicted": predicted,
        "gold": gold,
        "majority_baseline": {
            "answer": top,
            "accuracy": gold[top] / n,
            "ci95": list(wilson_interval(gold[top], n)),
        },
    }
