"""`guilomo stage NAME`: each stage from the command line on a tiny model, bad input, kill + resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama, tiny_tokenizer
from guilomo.artifacts import read_artifact
from guilomo.artifacts.search_state import read_state

GUILOMO = str(Path(sys.executable).parent / "guilomo")


def guilomo(*args, check=True):
    r = subprocess.run([GUILOMO, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def sft_args(world, *extra):
    """`guilomo stage sft` on the tiny world: a few small steps."""
    return [
        "stage",
        "sft",
        "--dataset",
        world / "data",
        "--allocation",
        world / "alloc",
        "--base-model",
        world / "base",
        "--batch-size",
        4,
        "--micro-batch-size",
        2,
        "--cutoff",
        64,
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model folder, a PreparedDataset (SciQ) and a preset Allocation."""
    root = tmp_path_factory.mktemp("stages")
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), initializer_range=0.2, num_hidden_layers=2)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    guilomo(
        "stage",
        "preprocess",
        "--out",
        root / "data",
        "--datasets",
        "sciq",
        "--train-size",
        48,
        "--validation-size",
        8,
        "--test-size",
        8,
        "--seed",
        1,
    )
    guilomo(
        "stage",
        "allocate",
        "--out",
        root / "alloc",
        "--base-model",
        root / "base",
        "--preset",
        "2468",
        "--rank",
        4,
    )
    return root


def test_help_explains_every_option():
    r = guilomo("stage", "sft", "--help")
    for option in (
        "--dataset",
        "--allocation",
        "--checkpoints",
        "--max-steps",
        "--router.kind",
        "--losses.balance-coef",
        "--train-on-inputs",
        "--micro-batch-size",
    ):
        assert option in r.stdout, option
    assert "Examples per forward pass" in r.stdout


def test_stages_chain(world, tmp_path):
    data = read_artifact(world / "data", kind="PreparedDataset")
    assert data.metadata["counts"] == {"train": 48, "validation": 8, "test": 8}
    alloc = json.loads((world / "alloc" / "allocation.json").read_text())
    assert alloc["modules"]["model.layers.0.self_attn.q_proj"]["experts"] == 2
    guilomo(*sft_args(world, "--max-steps", 3), "--out", tmp_path / "adapter")
    assert read_artifact(tmp_path / "adapter", kind="Adapter").metadata["steps"] == 3
    r = guilomo(
        "stage",
        "evaluate",
        "--out",
        tmp_path / "eval",
        "--dataset",
        world / "data",
        "--adapter",
        tmp_path / "adapter",
        "--base-model",
        world / "base",
        "--limit",
        4,
        "--max-new-tokens",
        4,
    )
    assert "accuracy" in r.stdout
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["total"] == 4 and len(report["predictions"]) == 4


def test_search_then_allocate_with_budget(world, tmp_path):
    guilomo(
        "stage",
        "search",
        "--out",
        tmp_path / "search",
        "--dataset",
        world / "data",
        "--base-model",
        world / "base",
        "--steps",
        3,
        "--max-experts",
        2,
        "--max-rank",
        2,
        "--top-k",
        1,
        "--batch-size",
        8,
        "--cutoff",
        64,
        "--quiet",
    )
    m = read_artifact(tmp_path / "search", kind="SearchState")
    assert {"plots/search_capacity.png", "plots/search_final.png"} <= set(m.files)
    r = guilomo("stage", "allocate", "--out", tmp_path / "alloc", "--search", tmp_path / "search")
    assert "trainable parameters" in r.stdout
    r = guilomo(
        "stage",
        "allocate",
        "--out",
        tmp_path / "small",
        "--search",
        tmp_path / "search",
        "--budget",
        10,
        check=False,
    )
    assert r.returncode == 2 and "smaller than the minimal allocation" in r.stderr
    assert not (tmp_path / "small").exists()
    # --budget-like: the parameters of one rank-2 expert (plain LoRA, no router) everywhere
    doc, _ = read_state(tmp_path / "search")
    like = sum(2 * (d_in + d_out) for d_in, d_out in doc["shapes"].values())
    guilomo(
        "stage",
        "allocate",
        "--out",
        tmp_path / "like",
        "--search",
        tmp_path / "search",
        "--budget-like",
        "uniform:1x2",
    )
    meta = read_artifact(tmp_path / "like", kind="Allocation").metadata
    assert meta["trainable_parameters"] <= like


SEARCH = ["stage", "search", "--dataset", "{data}", "--base-model", "{base}", "--steps", "3"]
SEARCH += ["--max-experts", "2", "--max-rank", "2", "--top-k", "1", "--quiet"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["stage", "preprocess", "--source", "instructions", "--path", "{bad}"], "line 2"),
        (["stage", "preprocess", "--source", "scienceqa"], "needs `path`"),
        (["stage", "preprocess", "--datasets", "mmlu"], "unknown datasets ['mmlu']"),
        (
            ["stage", "sft", "--dataset", "{data}", "--allocation", "{data}"],
            "holds a PreparedDataset artifact, expected Allocation",
        ),
        (
            ["stage", "sft", "--dataset", "{data}", "--allocation", "{alloc}", "--batch-size", "3"],
            "multiple of micro_batch_size",
        ),
        (
            ["stage", "evaluate", "--dataset", "{data}", "--base-model", "{empty}"],
            "no *.safetensors",
        ),
        (
            ["stage", "allocate", "--preset", "2468", "--base-model", "{base}", "--top-k", "0"],
            "top_k",
        ),
        (
            SEARCH + ["--estimator", "gumbel"],
            "argument --estimator: invalid choice: 'gumbel'",
        ),
        (SEARCH + ["--tau", "0"], "tau: Input should be greater than 0"),
        (SEARCH + ["--target-params", "10"], "target_params (--target-params) 10 is outside"),
        (SEARCH + ["--target-params", "10000000000"], "is outside what this search can select"),
        (SEARCH + ["--target-like", "1357"], "use uniform:E, uniform:ExR, 2468"),
        (SEARCH + ["--target-like", "2468", "--estimator", "reference"], "needs estimator"),
        (SEARCH + ["--warmup-steps", "3"], "never leave its warm-up"),
    ],
)
def test_bad_input_exits_2_without_artifact(world, tmp_path, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    subst = {
        "{bad}": bad,
        "{data}": world / "data",
        "{alloc}": world / "alloc",
        "{empty}": empty,
        "{base}": world / "base",
    }
    args = [str(subst.get(a, a)) for a in args]
    r = guilomo(*args, "--out", tmp_path / "out", check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_sft_resumes_to_the_uninterrupted_result(world, tmp_path):
    common = sft_args(world, "--max-steps", 12, "--checkpoint-every", 2)
    guilomo(*common, "--out", tmp_path / "full")
    proc = subprocess.Popen(
        [GUILOMO, *map(str, common), "--out", str(tmp_path / "killed")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = tmp_path / "killed.ckpt" / "trainer_state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(state.read_text())["step"]
    assert 2 <= step < 12 and not (tmp_path / "killed").exists(), step
    r = guilomo(*common, "--out", tmp_path / "killed")
    assert f"resumed from {step}" in r.stdout
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_torchrun_cli_two_processes_equals_one(world, tmp_path):
    """The README's multi-GPU command, on CPU with 2 gloo processes."""
    common = sft_args(world, "--max-steps", 3, "--lora-dropout", 0)
    guilomo(*common, "--out", tmp_path / "one")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "guilomo.cli",
        *map(str, common),
        "--out",
        str(tmp_path / "two"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _scienceqa_variant(src: Path, dest: Path, edit) -> Path:
    dest.mkdir()
    problems = json.loads((src / "problems.json").read_text())
    for p in problems.values():
        edit(p)
    (dest / "problems.json").write_text(json.dumps(problems))
    (dest / "pid_splits.json").write_text((src / "pid_splits.json").read_text())
    return dest


FIXTURE = Path(__file__).parent / "fixtures" / "scienceqa"


@pytest.mark.parametrize(
    "kind,message",
    [
        ("images_only", "no text-only"),
        ("bad_answers", "answer"),
        ("missing_output", "output"),
        ("one_row", "too few"),
    ],
)
def test_preprocess_bad_data_exits_2(tmp_path, kind, message):
    if kind == "images_only":
        args = [
            "--source",
            "scienceqa",
            "--path",
            _scienceqa_variant(FIXTURE, tmp_path / "s", lambda p: p.update(image="x.png")),
        ]
    elif kind == "bad_answers":
        args = [
            "--source",
            "scienceqa",
            "--path",
            _scienceqa_variant(FIXTURE, tmp_path / "s", lambda p: p.update(answer=9)),
        ]
    else:
        rows = [
            {"instruction": f"q{i}", "output": "a"} for i in range(1 if kind == "one_row" else 5)
        ]
        if kind == "missing_output":
            rows = [{"instruction": r["instruction"]} for r in rows]
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = ["--source", "instructions", "--path", path]
    r = guilomo("stage", "preprocess", "--out", tmp_path / "out", *args, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
