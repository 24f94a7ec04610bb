"""`make bench` runs these scripts; here they run small and must end in one JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,args,keys",
    [
        ("moe_layer.py", ["--quick", "--cases", "1024"], {"cases", "targets", "met"}),
        (
            "moe_layer.py",
            ["--quick", "--cases", "1024/hetero", "--dropout", "0.05"],
            {"cases", "dropout", "met"},
        ),
        (
            "search_step.py",
            [
                "--hidden",
                "64",
                "--layers",
                "2",
                "--vocab",
                "128",
                "--seq",
                "16",
                "--batch",
                "2",
                "--rounds",
                "2",
                "--experts",
                "4",
                "--rank",
                "2",
            ],
            {"first_order_ratio", "second_order_ratio", "met"},
        ),
        (
            "whole_model.py",
            [
                "--layers",
                "2",
                "--hidden",
                "64",
                "--vocab",
                "128",
                "--batch",
                "2",
                "--seq",
                "16",
                "--decode-batch",
                "2",
                "--prompt",
                "8",
                "--new-tokens",
                "4",
                "--rounds",
                "1",
            ],
            {"ratios", "targets", "met", "sizes", "saved_bytes", "threads", "torch"},
        ),
        (
            "memory_model.py",
            ["--layers", "1", "--micro-batch", "1", "--cutoff", "16"],
            {"rows", "llama_3_8b", "targets", "met"},
        ),
        (
            "contended.py",
            [
                "--hidden",
                "64",
                "--layers",
                "1",
                "--seq",
                "16",
                "--rounds",
                "1",
                "--neighbours",
                "1",
            ],
            {"threads", "cpu_share", "slowdown", "met"},
        ),
        (
            "search_known_answer.py",
            ["--seeds", "1", "--steps", "4"],
            {"estimator", "steps", "ranks", "experts", "landing"},
        ),
        (
            "evaluate.py",
            ["--tiny", "--sets", "arc_easy", "piqa", "--questions", "3", "--rounds", "1"],
            {"guilomo_s", "harness_s", "ratio", "max_abs_diff", "met"},
        ),
    ],
)
def test_benchmark_prints_json_last(script, args, keys):
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert keys <= set(last)
    if "max_abs_diff" in last:  # guilomo and the harness scored the same requests alike
        assert last["max_abs_diff"] < 1e-3


def _load_benchmark(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_layer_benchmark_matmuls_backward_equals_autograd():
    """The hand-written backward of the "matmuls" method (the layer's products alone) gives
    the gradients autograd gives for y = x W0^T + ((x C^T)[:, :R] * G) B^T."""
    import torch

    bench = _load_benchmark("moe_layer")
    torch.manual_seed(0)
    n, d_in, d_out, rank, experts = 7, 5, 6, 4, 2
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(d_out, d_in, dtype=torch.float64)
    c = torch.randn(rank + experts, d_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, rank, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(n, rank, dtype=torch.float64)
    g = torch.randn(n, d_out, dtype=torch.float64)

    def grads(fn):
        for t in (x, c, b):
            t.grad = None
        y = fn()
        y.backward(g)
        return [y.detach()] + [t.grad.clone() for t in (x, c, b)]

    got = grads(lambda: bench._Matmuls.apply(x, w0, c, b, gate))
    want = grads(lambda: x @ w0.t() + ((x @ c.t())[:, :rank] * gate) @ b.t())
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.slow
def test_allocation_quality_tiny_runs_then_reuses_every_cell(tmp_path):
    """benchmarks/allocation_quality.py --tiny end to end, then again on the same --root:
    the second run finds every cell (preprocess, search, allocate, sft, evaluate) cached;
    a third on an empty --root with the same --ledger (a fresh checkout) runs nothing."""
    import re

    done = re.compile(r"^\[\d+/\d+\] .+ \.\.\. (cached|\d+ s)$")
    ledger = tmp_path / "ledger"

    def run(root="aq"):
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "allocation_quality.py"),
                "--tiny",
                "--root",
                str(tmp_path / root),
                "--ledger",
                str(ledger),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
        last = json.loads(r.stdout.strip().splitlines()[-1])
        assert {"cells", "summary", "goal_met"} <= set(last)
        assert "| searched |" in r.stdout  # the Markdown table
        return last, [line for line in r.stderr.splitlines() if done.match(line)]

    first, lines1 = run()
    assert {c["allocation"] for c in first["cells"]} == {"uniform", "2468", "8642", "searched"}
    assert lines1 and not any(line.endswith("cached") for line in lines1)
    second, lines2 = run()
    assert len(lines2) == len(lines1)
    assert all(line.endswith("... cached") for line in lines2), lines2
    assert second["cells"] == first["cells"] and second["summary"] == first["summary"]
    assert len(list(ledger.glob("evaluate-*.json"))) == 4  # one record per allocation
    third, lines3 = run("fresh")
    assert len(lines3) == len(lines1) and all(line.endswith("... cached") for line in lines3)
    assert third["summary"] == first["summary"]
    assert not (tmp_path / "fresh" / "tiny-base").exists()  # nothing was run


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: make gpu-check runs the real check")
    out = tmp_path / "report.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(r.stdout.strip().splitlines()[-1])
    assert report["cuda"] is False and "no CUDA GPU" in report["message"]
    assert "no CUDA GPU" in r.stderr
