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
        "router.kind=VALUE",
        "losses.balance_coef=VALUE",
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
    assert not (tmp_path / "adapter.ckpt").exists()  # removed once the adapter is published
    guilomo(*sft_args(world, "max_steps=1", "--keep-checkpoints"), "--out", tmp_path / "kept")
    assert (tmp_path / "kept.ckpt" / "trainer_state.json").is_file()
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
    # a searched allocation takes its top-k from the search: a preset option is refused
    r = guilomo(
        *("stage", "allocate", "--out", tmp_path / "k", "--state", tmp_path / "search"),
        *("--top-k", 2),
        check=False,
    )
    assert r.returncode == 2 and "takes its top_k from the search (1)" in r.stderr
    assert not (tmp_path / "k").exists()
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


def check_loramoe(data: Path, adapter: Path) -> None:
    """The data carries one task type per data set; the adapter is LoRAMoE's: MLP modules
    only, soft routing, localized balancing on."""
    assert read_artifact(data).metadata["task_types"] == ["sciq", "arc_easy"]
    train = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    assert {r["task_type"] for r in train} == {0, 1}
    assert all(r["task_type"] == (r["source"] != "sciq") for r in train)
    doc = json.loads((adapter / "adapter_config.json").read_text())["config"]
    assert doc["router"]["kind"] == "soft" and doc["losses"]["localized_coef"] == 0.1
    assert doc["allocation"]["modules"]
    assert all(".mlp." in name for name in doc["allocation"]["modules"])


def test_loramoe_with_localized_balancing_through_the_five_stages(world, tmp_path):
    """LoRAMoE from the CLI: two mixed data sets, an MLP-only search, soft routing and the
    localized balancing constraint fed each record's task type; one set only is refused."""
    base = world / "base"
    guilomo(
        *("stage", "preprocess", "--out", tmp_path / "data", "--datasets", "sciq", "arc_easy"),
        *("--train-size", 24, "--validation-size", 8, "--test-size", 4),
    )
    guilomo(
        *("stage", "search", "--out", tmp_path / "search", "--dataset", tmp_path / "data"),
        *("--base-model", base, "--quiet", "placement=mlp", "steps=2", "max_experts=2"),
        *("max_rank=2", "top_k=1", "batch_size=8", "cutoff=64"),
    )
    guilomo("stage", "allocate", "--out", tmp_path / "alloc", "--state", tmp_path / "search")
    loramoe = ["router.kind=soft", "losses.localized_coef=0.1", "max_steps=2", "--quiet"]
    sft = ["stage", "sft", "--dataset", tmp_path / "data", "--allocation", tmp_path / "alloc"]
    sft += ["--base-model", base, "batch_size=4", "micro_batch_size=2", "cutoff=64", *loramoe]
    guilomo(*sft, "--out", tmp_path / "adapter")
    check_loramoe(tmp_path / "data", tmp_path / "adapter")
    r = guilomo(
        *("stage", "evaluate", "--out", tmp_path / "eval", "--dataset", tmp_path / "data"),
        *("--adapter", tmp_path / "adapter", "--base-model", base, "--quiet"),
    )
    assert "accuracy" in r.stdout
    # one data set has one task type: refused before training, naming the field
    sft = ["stage", "sft", "--dataset", world / "data", "--allocation", tmp_path / "alloc"]
    r = guilomo(*sft, "--base-model", base, *loramoe, "--out", tmp_path / "no", check=False)
    assert r.returncode == 2 and "losses.localized_coef is 0.1" in r.stderr
    assert "1 task type(s) ['sciq']" in r.stderr and not (tmp_path / "no").exists()
