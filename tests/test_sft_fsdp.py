"""SFT with `parallel: fsdp`: under torchrun the base and the adapter are sharded (FSDP2).

The slow tests run 2 gloo processes on CPU and hold them to the single process: the same
adapter and the same checkpoint files (full tensors, rank 0 writes), a run interrupted under
FSDP resumes to the uninterrupted result, and checkpoints move between one process and FSDP
both ways. The fast ones check the layer discovery and that a bad `parallel` is refused.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from conftest import tiny_llama
from guilomo.artifacts import read_artifact
from guilomo.artifacts.allocation import read_allocation
from guilomo.cli import main
from guilomo.stages.allocate import AllocateConfig, run_allocate
from guilomo.stages.sft import (
    ADAPTER_TENSORS,
    CKPT_JSON,
    CKPT_TENSORS,
    SftConfig,
    decoder_layers,
    run_sft,
)
from sft_helpers import base_and_data

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

#: Two micro-batches per process and step, so FSDP's deferred gradient sync is exercised.
OPTIONS = {
    "max_steps": 6,
    "batch_size": 8,
    "micro_batch_size": 2,
    "lr": 1e-2,
    "warmup_steps": 1,
    "cutoff": 64,
    "checkpoint_every": 2,
    "lora_dropout": 0.0,
    "seed": 5,
}

#: `run_sft(..., stop_after=N)` under torchrun: an interrupted run (no artifact, a checkpoint).
INTERRUPTED = """
import sys
from pathlib import Path

from guilomo.artifacts.allocation import read_allocation
from guilomo.distributed import init_distributed
from guilomo.stages.sft import SftConfig, run_sft

config, data, alloc, out, stop = sys.argv[1:]
init_distributed()
run_sft(
    SftConfig.model_validate_json(config),
    dataset=Path(data),
    allocation=read_allocation(Path(alloc)),
    out=Path(out),
    checkpoints=Path(out + ".ckpt"),
    stop_after=int(stop),
    progress=False,
)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model folder, a PreparedDataset and a preset Allocation."""
    root = base_and_data(tmp_path_factory.mktemp("sft-fsdp"))
    run_allocate(
        AllocateConfig(base_model=str(root / "base"), preset="2468", rank=4), root / "alloc"
    )
    return root


def config(world, **update):
    return SftConfig(base_model=str(world / "base"), **{**OPTIONS, **update})


def sft_cli(world, out, *extra):
    """`guilomo stage sft` arguments for the OPTIONS run into `out` (checkpoints OUT.ckpt)."""
    args = ["stage", "sft", "--dataset", world / "data", "--allocation", world / "alloc"]
    args += ["--base-model", world / "base", "--out", out, "--quiet", "--keep-checkpoints"]
    for key, value in OPTIONS.items():
        args += ["--" + key.replace("_", "-"), value]
    return [*map(str, args), *extra]


def torchrun(*args):
    r = subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def one_process(world, out, stop_after=None, **update):
    return run_sft(
        config(world, **update),
        dataset=world / "data",
        allocation=read_allocation(world / "alloc"),
        out=out,
        checkpoints=Path(f"{out}.ckpt"),
        stop_after=stop_after,
        progress=False,
    )


@pytest.fixture(scope="module")
def reference(world):
    """The single-process run of OPTIONS: adapter in `one`, last checkpoint in `one.ckpt`."""
    one_process(world, world / "one")
    return world / "one"


def assert_same_adapter(a: Path, b: Path):
    ta, tb = load_file(str(a / ADAPTER_TENSORS)), load_file(str(b / ADAPTER_TENSORS))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-6, msg=k)


def assert_same_checkpoint(a: Path, b: Path):
    """Same files, tensor names, shapes and JSON layout; values to float tolerance."""
    for name in (ADAPTER_TENSORS, CKPT_TENSORS):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert (ta[k].dtype, ta[k].shape) == (tb[k].dtype, tb[k].shape), k
            torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-6, msg=k)
    da, db = (json.loads((p / CKPT_JSON).read_text()) for p in (a, b))
    assert db.pop("losses") == pytest.approx(da.pop("losses"), rel=1e-4)
    assert da == db  # step, optimiser layout and param groups, schedule, config hash


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(world, reference, tmp_path):
    """`torchrun ... guilomo stage sft --parallel fsdp`: the single process's adapter and
    checkpoint files, full tensors written once."""
    r = torchrun("-m", "guilomo.cli", *sft_cli(world, tmp_path / "fsdp", "--parallel", "fsdp"))
    assert "sft: 6 steps (resumed from 0)" in r.stdout
    assert_same_adapter(reference, tmp_path / "fsdp")
    for name in ("adapter_config.json", "train_log.json"):
        a, b = (json.loads((p / name).read_text()) for p in (reference, tmp_path / "fsdp"))
        if name == "train_log.json":
            a, b = a["losses"], pytest.approx(b["losses"], rel=1e-4)
        assert a == b, name
    assert_same_checkpoint(Path(f"{reference}.ckpt"), tmp_path / "fsdp.ckpt")
    manifest = read_artifact(tmp_path / "fsdp", kind="Adapter")
    assert manifest.metadata["steps"] == 6
    assert manifest.metadata["trainable_parameters"] == sum(
        t.numel() for t in load_file(str(tmp_path / "fsdp" / ADAPTER_TENSORS)).values()
    )


@pytest.mark.slow
def test_interrupted_fsdp_run_resumes_to_the_uninterrupted_result(world, reference, tmp_path):
    """Stopped after 3 of 6 steps under FSDP, it resumes under FSDP and in one process."""
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    out = tmp_path / "fsdp"
    cfg = config(world, parallel="fsdp").model_dump_json()
    torchrun(script, cfg, world / "data", world / "alloc", out, 3)
    ckpt = Path(f"{out}.ckpt")
    assert json.loads((ckpt / CKPT_JSON).read_text())["step"] == 3 and not out.exists()
    shutil.copytree(ckpt, tmp_path / "single.ckpt")  # the same checkpoint, for one process

    r = torchrun("-m", "guilomo.cli", *sft_cli(world, out, "--parallel", "fsdp"))
    assert "sft: 6 steps (resumed from 3)" in r.stdout
    assert_same_adapter(reference, out)

    rest = one_process(world, tmp_path / "single")
    assert rest.resumed_from == 3 and rest.steps == 6
    assert_same_adapter(reference, tmp_path / "single")


@pytest.mark.slow
def test_single_process_checkpoint_resumes_under_fsdp(world, reference, tmp_path):
    out = tmp_path / "mixed"
    part = one_process(world, out, stop_after=2)
    assert part.steps == 2 and not out.exists()
    r = torchrun("-m", "guilomo.cli", *sft_cli(world, out, "--parallel", "fsdp"))
    assert "sft: 6 steps (resumed from 2)" in r.stdout
    assert_same_adapter(reference, out)


def test_decoder_layers_found_generically():
    llama = tiny_llama(num_hidden_layers=3)
    assert decoder_layers(llama) == list(llama.model.layers)  # by `_no_split_modules`

    class Stack(torch.nn.Module):  # no `_no_split_modules`: `model.layers`
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 2)

    stack = Stack()
    assert decoder_layers(stack) == list(stack.model.layers)
    with pytest.raises(ValueError, match="in Sequential.*use parallel: ddp"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_bad_parallel_is_refused(tmp_path, capsys):
    with pytest.raises(ValidationError, match="parallel"):
        SftConfig(parallel="zero3")
    args = ["stage", "sft", "--dataset", "d", "--allocation", "a", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--parallel", "zero3"])
    assert exc.value.code == 2
    assert "argument --parallel: invalid choice: 'zero3'" in capsys.readouterr().err
    yaml = tmp_path / "sft.yaml"
    yaml.write_text("parallel: zero3\n")
    assert main([*args, "--config", str(yaml)]) == 2
    err = capsys.readouterr().err
    assert "parallel: Input should be 'ddp' or 'fsdp' (got 'zero3')" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_interrupted_ddp_run_with_dropout_resumes_to_the_uninterrupted_result(world, tmp_path):
    """Dropout is reseeded per (seed, step, rank): every rank of a resumed 2-process run
    draws the masks of the uninterrupted one (a saved RNG state of rank 0 could not)."""
    full = tmp_path / "full"
    torchrun("-m", "guilomo.cli", *sft_cli(world, full, "--lora-dropout", "0.2"))
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    out = tmp_path / "resumed"
    cfg = config(world, lora_dropout=0.2).model_dump_json()
    torchrun(script, cfg, world / "data", world / "alloc", out, 3)
    r = torchrun("-m", "guilomo.cli", *sft_cli(world, out, "--lora-dropout", "0.2"))
    assert "sft: 6 steps (resumed from 3)" in r.stdout
    a, b = (load_file(str(p / ADAPTER_TENSORS)) for p in (full, out))
    for k in a:
        assert torch.equal(a[k], b[k]), k
