"""guilomo.evalstats against scipy (Wilson, exact binomial) and hand counts."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from guilomo.evalstats import mcnemar_exact, paired_bootstrap, summarise, wilson_interval

Z95 = 1.959963984540054  # the 0.975 normal quantile


@pytest.mark.parametrize(
    "k,n",
    [
        (0, 1),
        (1, 1),
        (0, 2),
        (1, 2),
        (0, 5),
        (5, 5),
        (1, 3),
        (2, 7),
        (3, 10),
        (50, 100),
        (235, 570),
        (0, 1000),
        (1000, 1000),
        (999, 1000),
        (4321, 10000),
    ],
)
@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_wilson_matches_scipy(k, n, confidence):
    want = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    lo, hi = wilson_interval(k, n, confidence)
    assert lo == pytest.approx(want.low, abs=1e-12)
    assert hi == pytest.approx(want.high, abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_by_hand():
    # 0 right of 10: p = 0, so centre = half-width = (z^2/2n) / (1 + z^2/n) and the interval
    # is [0, z^2 / (n + z^2)] = [0, 3.841459 / 13.841459] = [0, 0.277533].
    # 5 of 10: p = 1/2, centre 1/2, half-width z sqrt(1/40 + z^2/400) / (1 + z^2/10)
    # = 1.959964 * sqrt(0.025 + 0.0096036) / 1.3841459 = 0.263407, so [0.236593, 0.763407].
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert Z95**2 / (10 + Z95**2) == pytest.approx(0.277533, abs=1e-6)


@pytest.mark.parametrize(
    "k,n,conf,message",
    [
        (0, 0, 0.95, "total must be >= 1"),
        (3, 2, 0.95, "between 0 and total=2"),
        (-1, 2, 0.95, "between 0 and total=2"),
        (1, 2, 1.0, "strictly between 0 and 1"),
    ],
)
def test_wilson_refuses(k, n, conf, message):
    with pytest.raises(ValueError, match=message):
        wilson_interval(k, n, conf)


@pytest.mark.parametrize(
    "b,c",
    [
        (0, 1),
        (1, 0),
        (0, 5),
        (5, 0),
        (1, 1),
        (3, 3),
        (2, 8),
        (5, 10),
        (31, 46),
        (46, 31),
        (10, 2),
        (0, 20),
        (100, 130),
        (2000, 2100),
    ],
)
def test_mcnemar_matches_scipy(b, c):
    want = binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_mcnemar_by_hand():
    # No discordant questions: no evidence either way.
    assert mcnemar_exact(0, 0) == 1.0
    # 0 vs 5: P(X <= 0) = 1/32 for X ~ Bin(5, 1/2), two-sided 2/32.
    assert mcnemar_exact(0, 5) == 2 / 32
    # 1 vs 3: P(X <= 1) = (1 + 4)/16, two-sided 10/16.
    assert mcnemar_exact(1, 3) == 10 / 16


def pattern(both: int, a_only: int, b_only: int, neither: int, reps: int = 1):
    """Per-question correctness of A and B with the given cell counts, repeated `reps` times."""
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a * reps, b * reps


def test_bootstrap_contains_the_difference_and_shrinks_with_n():
    a, b = pattern(both=400, a_only=100, b_only=150, neither=350)  # N = 1000
    diff, lo, hi = paired_bootstrap(a, b, resamples=4000, seed=1)
    assert diff == pytest.approx((150 - 100) / 1000)
    assert lo < diff < hi
    # Four times the questions (same proportions): half the width.
    a4, b4 = pattern(both=400, a_only=100, b_only=150, neither=350, reps=4)
    diff4, lo4, hi4 = paired_bootstrap(a4, b4, resamples=4000, seed=1)
    assert diff4 == pytest.approx(diff)
    assert lo4 < diff4 < hi4
    assert (hi4 - lo4) / (hi - lo) == pytest.approx(0.5, rel=0.15)


def test_bootstrap_of_identical_systems_is_zero_width():
    a, _ = pattern(both=30, a_only=20, b_only=0, neither=50)
    assert paired_bootstrap(a, a, resamples=500) == (0.0, 0.0, 0.0)


def test_bootstrap_is_reproducible_for_a_seed():
    a, b = pattern(both=40, a_only=13, b_only=21, neither=26, reps=7)
    first = paired_bootstrap(a, b, resamples=2000, seed=7)
    assert paired_bootstrap(a, b, resamples=2000, seed=7) == first
    assert paired_bootstrap(np.array(a), np.array(b), resamples=2000, seed=7) == first
    assert paired_bootstrap(a, b, resamples=2000, seed=8) != first


def test_bootstrap_width_matches_the_normal_approximation():
    n, a_only, b_only = 10_000, 1000, 1500
    a, b = pattern(both=4000, a_only=a_only, b_only=b_only, neither=n - 4000 - a_only - b_only)
    rng = np.random.default_rng(0)  # question order must not matter: shuffle the pairs
    order = rng.permutation(n)
    a, b = np.array(a)[order], np.array(b)[order]
    diff, lo, hi = paired_bootstrap(a, b, resamples=10_000, seed=0)
    # Var of d_i = b_i - a_i in {-1, 0, 1}: E[d^2] - E[d]^2 = (b+c)/N - (c-b)^2/N^2.
    se = math.sqrt((a_only + b_only) / n - (b_only - a_only) ** 2 / n**2) / math.sqrt(n)
    half = Z95 * se
    assert diff == pytest.approx(0.05)
    assert (hi - lo) / (2 * half) == pytest.approx(1.0, rel=0.15)
    assert lo == pytest.approx(diff - half, abs=0.15 * half)
    assert hi == pytest.approx(diff + half, abs=0.15 * half)


def test_bootstrap_refuses_unpaired_or_empty():
    with pytest.raises(ValueError, match="a has 3, b has 2"):
        paired_bootstrap([True, False, True], [True, False])
    with pytest.raises(ValueError, match="no questions"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        paired_bootstrap([True], [False], resamples=0)


def test_summarise_by_hand():
    answers = ["A", "C", "C", "D", "B", "B", "B"]
    predictions = ["A", "B", "C", None, "A", "A", "B"]
    correct = [p == g for p, g in zip(predictions, answers, strict=True)]  # q0, q2, q6: 3 of 7
    s = summarise(correct, predictions, answers)
    assert s["accuracy"] == 3 / 7
    assert (s["correct"], s["total"]) == (3, 7)
    want = binomtest(3, 7).proportion_ci(method="wilson")
    assert s["ci95"] == pytest.approx([want.low, want.high])
    # predicted: A three times, B twice, C once, D never, no answer once.
    assert s["predicted"] == {"A": 3, "B": 2, "C": 1, "D": 0, "none": 1}
    assert s["gold"] == {"A": 1, "B": 3, "C": 2, "D": 1}
    base = s["majority_baseline"]
    assert (base["answer"], base["accuracy"]) == ("B", 3 / 7)
    assert base["ci95"] == pytest.approx([want.low, want.high])


def test_summarise_majority_ties_take_the_earliest_letter():
    s = summarise([True, False, False, False], ["B", "B", "B", "A"], ["B", "A", "A", "B"])
    assert s["majority_baseline"]["answer"] == "A"
    assert s["majority_baseline"]["accuracy"] == 0.5
    assert "none" not in s["predicted"]
    assert s["predicted"] == {"A": 1, "B": 3}


def test_summarise_refuses_ragged_or_empty():
    with pytest.raises(ValueError, match="differ in length"):
        summarise([True], ["A", "B"], ["A"])
    with pytest.raises(ValueError, match="no questions"):
        summarise([], [], [])
