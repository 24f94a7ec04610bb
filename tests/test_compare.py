"""guilomo.compare and `guilomo compare` on hand-made EvalReports: numbers against scipy,
guilomo.evalstats and hand counts, the refusals, and the command (local folders and S3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from guilomo.artifacts import ArtifactError, ArtifactWriter
from guilomo.artifacts.eval_report import read_report
from guilomo.compare import compare_reports, format_comparison
from guilomo.evalstats import paired_bootstrap

GUILOMO = str(Path(sys.executable).parent / "guilomo")


def guilomo(*args, check=True, env=None):
    r = subprocess.run(
        [GUILOMO, *map(str, args)], capture_output=True, text=True, timeout=600, env=env
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def predictions(ids, gold, picks, picks_norm=None):
    """report.json's 'predictions' for one system: gold letters and its picks (None: no
    answer); with `picks_norm`, the rc / mc fields of the length-normalised pick too."""
    rows = []
    for i, (qid, g, p) in enumerate(zip(ids, gold, picks, strict=True)):
        row = {"id": qid, "answer": g, "prediction": p, "correct": p is not None and p == g}
        if picks_norm is not None:
            row["prediction_norm"] = picks_norm[i]
            row["correct_norm"] = picks_norm[i] == g
        rows.append(row)
    return rows


def write_report(path: Path, preds, formulation: str | None = "rc", split="test") -> Path:
    """An EvalReport folder as `run_evaluate` writes it (report.json + manifest)."""
    correct = [p["correct"] for p in preds]
    report = {
        "split": split,
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "correct": sum(correct),
        "total": len(correct),
        "failures": sum(p["prediction"] is None for p in preds),
        "predictions": preds,
    }
    if formulation is not None:  # None: an old report, written before formulations
        report["formulation"] = formulation
    if preds and "correct_norm" in preds[0]:
        report["acc_norm"] = sum(p["correct_norm"] for p in preds) / len(preds)
    meta = {k: report[k] for k in ("accuracy", "total", "failures")}
    with ArtifactWriter(
        path, kind="EvalReport", stage="evaluate", config={"split": split}, metadata=meta
    ) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return path


# Five questions, by hand: A is right on q0, q1, q2; B on q1, q2, q3, q4.
# acc A = 3/5, acc B = 4/5, B - A = +20 points; A only right: q0 (1); B only right: q3, q4 (2).
IDS5 = [f"arc_easy-{i}" for i in range(5)]
GOLD5 = ["A", "B", "C", "D", "A"]
PICKS_A5 = ["A", "B", "C", "A", None]
PICKS_B5 = ["B", "B", "C", "D", "A"]
# acc_norm picks, by hand: A right on q0, q3 (2/5); B right on q0, q1, q2, q3, q4 (5/5).
NORM_A5 = ["A", "A", "A", "D", "B"]
NORM_B5 = ["A", "B", "C", "D", "A"]


def hand_report(picks, norm=None, formulation="rc"):
    preds = predictions(IDS5, GOLD5, picks, norm)
    return {"formulation": formulation, "split": "test", "predictions": preds}


def test_five_questions_by_hand():
    a, b = hand_report(PICKS_A5, NORM_A5), hand_report(PICKS_B5, NORM_B5)
    cmp = compare_reports(a, b, resamples=2000, seed=0)
    assert (cmp.n, cmp.acc_a, cmp.acc_b) == (5, 3 / 5, 4 / 5)
    assert (cmp.a_only, cmp.b_only) == (1, 2)
    assert cmp.diff == pytest.approx(0.2)
    # Exact McNemar on 1 vs 2: 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8 = 1.
    assert cmp.p_value == 1.0
    want_a = binomtest(3, 5).proportion_ci(method="wilson")
    assert cmp.ci_a == pytest.approx((want_a.low, want_a.high))
    assert (cmp.metric, cmp.formulation_a, cmp.formulation_b) == ("acc", "rc", "rc")

    norm = compare_reports(a, b, metric="acc_norm", resamples=2000, seed=0)
    assert (norm.acc_a, norm.acc_b) == (2 / 5, 5 / 5)
    assert (norm.a_only, norm.b_only) == (0, 3)
    assert norm.p_value == 2 / 8  # 2 * P(X <= 0), X ~ Bin(3, 1/2)
    want_b = binomtest(5, 5).proportion_ci(method="wilson")
    assert norm.ci_b == pytest.approx((want_b.low, want_b.high))
    assert norm.metric == "acc_norm"


def random_pair(n=300, seed=0):
    """Two systems on the same n four-option questions, B somewhat better than A."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("ABCD"))
    gold = letters[rng.integers(0, 4, n)]
    guess_a, guess_b = letters[rng.integers(0, 4, n)], letters[rng.integers(0, 4, n)]
    picks_a = np.where(rng.random(n) < 0.45, gold, guess_a).tolist()
    picks_b = np.where(rng.random(n) < 0.55, gold, guess_b).tolist()
    ids = [f"sciq-{i}" for i in range(n)]
    return ids, gold.tolist(), picks_a, picks_b


def test_numbers_match_scipy_evalstats_and_a_count():
    ids, gold, picks_a, picks_b = random_pair()
    a = {"formulation": "mc", "predictions": predictions(ids, gold, picks_a)}
    b = {"formulation": "mc", "predictions": predictions(ids, gold, picks_b)}
    cmp = compare_reports(a, b, resamples=3000, seed=5)
    right_a = [p == g for p, g in zip(picks_a, gold, strict=True)]
    right_b = [p == g for p, g in zip(picks_b, gold, strict=True)]
    n = len(gold)
    k_a, k_b = sum(right_a), sum(right_b)
    a_only = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
    b_only = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
    assert (cmp.n, cmp.acc_a, cmp.acc_b) == (n, k_a / n, k_b / n)
    assert (cmp.a_only, cmp.b_only) == (a_only, b_only)
    assert b_only - a_only == k_b - k_a
    assert cmp.p_value == pytest.approx(binomtest(min(a_only, b_only), a_only + b_only).pvalue)
    for (lo, hi), k in ((cmp.ci_a, k_a), (cmp.ci_b, k_b)):
        want = binomtest(k, n).proportion_ci(method="wilson")
        assert (lo, hi) == pytest.approx((want.low, want.high))
    diff, lo, hi = paired_bootstrap(right_a, right_b, resamples=3000, seed=5)
    assert cmp.diff == pytest.approx((k_b - k_a) / n)
    assert (cmp.diff, *cmp.diff_ci) == (diff, lo, hi)
    assert (cmp.resamples, cmp.seed) == (3000, 5)


def test_format_comparison_lines():
    a, b = hand_report(PICKS_A5), hand_report(PICKS_B5, formulation="mc")
    cmp = compare_reports(a, b, resamples=1000, seed=3)
    lines = format_comparison(cmp, "runs/a", "runs/b").splitlines()
    assert len(lines) == 4
    lo_a, hi_a = (100 * x for x in cmp.ci_a)
    assert lines[0] == f"A runs/a: 60.0% [{lo_a:.1f}, {hi_a:.1f}] (N=5, rc, acc)"
    assert lines[1].startswith("B runs/b: 80.0% [") and lines[1].endswith("(N=5, mc, acc)")
    lo, hi = (100 * x for x in cmp.diff_ci)
    assert lines[2] == (
        f"B - A: +20.0 points, 95% CI [{lo:+.1f}, {hi:+.1f}] "
        "(paired bootstrap, 1,000 resamples, seed 3)"
    )
    assert lines[3] == "McNemar exact: A only right 1, B only right 2, p = 1.000"


def test_refuses_a_different_number_of_questions():
    a = hand_report(PICKS_A5)
    b = {"predictions": a["predictions"][:3]}
    with pytest.raises(ValueError, match="A has 5 questions, B has 3"):
        compare_reports(a, b)


def test_refuses_a_different_id_naming_the_first():
    a, b = hand_report(PICKS_A5), hand_report(PICKS_B5)
    b["predictions"][2]["id"] = "arc_easy-7"
    b["predictions"][4]["id"] = "arc_easy-9"
    with pytest.raises(ValueError) as exc:
        compare_reports(a, b)
    assert str(exc.value).startswith(
        "question 2: A has id 'arc_easy-2' (answer C), B has id 'arc_easy-7' (answer C)"
    )


def test_refuses_a_different_gold_answer():
    a, b = hand_report(PICKS_A5), hand_report(PICKS_B5)
    b["predictions"][3]["answer"] = "B"
    with pytest.raises(ValueError) as exc:
        compare_reports(a, b)
    assert str(exc.value).startswith(
        "question 3: A has id 'arc_easy-3' (answer D), B has id 'arc_easy-3' (answer B)"
    )


def test_acc_norm_on_a_generation_is_refused():
    rc = hand_report(PICKS_A5, NORM_A5)
    gen = hand_report(PICKS_B5, formulation="generate")
    with pytest.raises(ValueError, match="B is a 'generate' report, and that formulation has no"):
        compare_reports(rc, gen, metric="acc_norm")
    old = {"predictions": predictions(IDS5, GOLD5, PICKS_B5)}  # no formulation: a generation
    with pytest.raises(ValueError, match="A is a 'generate' report"):
        compare_reports(old, rc, metric="acc_norm")
    assert compare_reports(old, rc, resamples=100).formulation_a == "generate"


def test_read_report_verifies_the_artifact(tmp_path):
    path = write_report(tmp_path / "eval", predictions(IDS5, GOLD5, PICKS_A5))
    assert read_report(path)["predictions"][0]["id"] == "arc_easy-0"
    with ArtifactWriter(tmp_path / "adapter", kind="Adapter", stage="sft") as tmp:
        (tmp / "report.json").write_text("{}")
    with pytest.raises(ArtifactError, match="holds a Adapter artifact, expected EvalReport"):
        read_report(tmp_path / "adapter")
    with pytest.raises(ArtifactError, match=str(tmp_path / "missing")):
        read_report(tmp_path / "missing")
    (path / "report.json").write_text("{}")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        read_report(path)


# ------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two EvalReports of the same 300 questions, one of different ones, one generation."""
    root = tmp_path_factory.mktemp("compare")
    ids, gold, picks_a, picks_b = random_pair(seed=1)
    write_report(root / "a", predictions(ids, gold, picks_a, picks_a))
    write_report(root / "b", predictions(ids, gold, picks_b, picks_b))
    other = ids[:]
    other[17] = "sciq-999"
    write_report(root / "other", predictions(other, gold, picks_b))
    write_report(root / "gen", predictions(ids, gold, picks_b), formulation="generate")
    right_a = [p == g for p, g in zip(picks_a, gold, strict=True)]
    right_b = [p == g for p, g in zip(picks_b, gold, strict=True)]
    return root, right_a, right_b


def expected_lines(right_a, right_b, resamples, seed):
    """The difference and McNemar lines, from a count and guilomo.evalstats."""
    n = len(right_a)
    diff = 100 * (sum(right_b) - sum(right_a)) / n
    _, lo, hi = paired_bootstrap(right_a, right_b, resamples=resamples, seed=seed)
    a_only = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
    b_only = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
    p = binomtest(min(a_only, b_only), a_only + b_only).pvalue
    p_text = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"  # 3 decimals, small ones as 1.2e-05
    return (
        f"B - A: {diff:+.1f} points, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}] "
        f"(paired bootstrap, {resamples:,} resamples, seed {seed})",
        f"McNemar exact: A only right {a_only}, B only right {b_only}, p = {p_text}",
    )


def test_command_prints_the_comparison(folders):
    root, right_a, right_b = folders
    r = guilomo("compare", root / "a", root / "b", "--resamples", 2000, "--seed", 4)
    lines = r.stdout.splitlines()
    acc_a = 100 * sum(right_a) / len(right_a)
    assert lines[0].startswith(f"A {root / 'a'}: {acc_a:.1f}% [")
    assert lines[0].endswith("(N=300, rc, acc)")
    assert tuple(lines[2:4]) == expected_lines(right_a, right_b, 2000, 4)
    # acc_norm: these reports' normalised picks are their plain ones, so the same numbers.
    r = guilomo("compare", root / "a", root / "b", "--metric", "acc_norm", "--resamples", 2000)
    assert r.stdout.splitlines()[0].endswith("(N=300, rc, acc_norm)")
    assert tuple(r.stdout.splitlines()[2:4]) == expected_lines(right_a, right_b, 2000, 0)


@pytest.mark.parametrize(
    "which,extra,message",
    [
        ("other", [], "question 17: A has id 'sciq-17' (answer "),
        ("gen", ["--metric", "acc_norm"], "B is a 'generate' report"),
        ("missing", [], "no artifact here"),
    ],
)
def test_command_bad_input_exits_2(folders, which, extra, message):
    root, _, _ = folders
    r = guilomo("compare", root / "a", root / which, *extra, check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("guilomo compare: error: ")
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_command_reads_reports_on_s3(weed, folders, tmp_path, monkeypatch):
    from guilomo.storage import put_artifact
    from servers import AWS_UNSET, BUCKET, client_env, point_env_at

    root, right_a, right_b = folders
    prefix = f"s3://{BUCKET}/compare-{uuid.uuid4().hex[:8]}"
    point_env_at(weed, monkeypatch, tmp_path)
    put_artifact(root / "a", f"{prefix}/a")
    put_artifact(root / "b", f"{prefix}/b")
    env = {k: v for k, v in os.environ.items() if k not in AWS_UNSET}
    env.update(client_env(weed, tmp_path), GUILOMO_CACHE=str(tmp_path / "cache"))
    r = guilomo("compare", f"{prefix}/a", root / "b", "--resamples", 2000, env=env)
    assert r.stdout.splitlines()[0].startswith(f"A {prefix}/a: ")
    assert tuple(r.stdout.splitlines()[2:4]) == expected_lines(right_a, right_b, 2000, 0)
    r = guilomo("compare", f"{prefix}/a", f"{prefix}/nothing", check=False, env=env)
    assert r.returncode == 2
    assert f"{prefix}/nothing: no manifest.json" in r.stderr
