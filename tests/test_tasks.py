"""guilomo.tasks: what the KFP components run. The SFT task with gpus > 1 reruns itself under
torchrun (one process per GPU; gloo on CPU here) and must equal the single-process task."""

import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from guilomo.artifacts.allocation import write_allocation
from guilomo.config import AllocateConfig
from guilomo.tasks import Io, Progress, Tracking, run_task, torchrun_command
from guilomo.tracking import stage_records, start_pipeline_run
from sft_helpers import allocation, model_and_tokenizer, prepared

SFT = {
    "max_steps": 3,
    "batch_size": 4,
    "micro_batch_size": 2,
    "cutoff": 64,
    "warmup_steps": 1,
    "lora_dropout": 0.0,
    "checkpoint_every": 2,
}


@pytest.fixture
def world(tmp_path, monkeypatch):
    model, tok = model_and_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = prepared(tmp_path / "data")
    alloc = tmp_path / "alloc"
    write_allocation(alloc, allocation(model), parameters=None, config=AllocateConfig())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path, Io(data, str(data)), Io(alloc, str(alloc))


def test_torchrun_command_runs_this_module_on_one_node():
    cmd = torchrun_command("sft", 4, "/tmp/args.json")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd
    assert cmd[-4:] == ["-m", "guilomo.tasks", "sft", "/tmp/args.json"]


@pytest.mark.slow
def test_sft_task_on_two_processes_equals_one_and_tracks_once(world):
    root, dataset, alloc = world
    config = SFT | {"base_model": str(root / "base")}
    parent = start_pipeline_run(run_name="t", params={}, tags={})
    results = {}
    for gpus in (1, 2):
        out = root / f"adapter-{gpus}"
        inputs = {"dataset": dataset, "allocation": alloc}
        tracking = Tracking(parent, gpus=gpus)
        loss = run_task("sft", config, inputs, Io(out, str(out)), tracking)["final_loss"]
        results[gpus] = (loss, load_file(str(out / "adapter_model.safetensors")))
    assert results[2][0] == pytest.approx(results[1][0], rel=1e-4)
    for k, v in results[1][1].items():
        torch.testing.assert_close(results[2][1][k], v, rtol=1e-4, atol=1e-6)
    runs = [r for r in stage_records(parent) if r.stage == "sft"]
    assert len(runs) == 2  # one child run per task, not one per rank
    assert {r.tags["guilomo.gpus"] for r in runs} == {"1", "2"}
    history = MlflowClient().get_metric_history(runs[1].run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]


def test_progress_lines_every_interval_with_time_left(monkeypatch):
    """One line on the first step, none within the interval, then one per interval and one
    on the last step; the rate and time left follow the steps' pace (1 step per 2 s)."""
    clock = [100.0]
    monkeypatch.setattr("guilomo.tasks.time.monotonic", lambda: clock[0])
    said = []
    progress = Progress("sft", total=40, every=30.0, say=said.append)
    for step in range(1, 41):
        clock[0] += 2.0
        progress(step, {"loss": 1.0 / step, "lr": 0.1})
    assert len(said) == 1 + 80 // 30 + 1  # first, at 30 s and 60 s, the last step
    assert said[0] == "sft: step 1/40, loss 1"  # the pace is not known yet
    assert said[1] == "sft: step 16/40, loss 0.0625, 0.5 steps/s, 0m48s left"
    assert said[-1] == "sft: step 40/40, loss 0.025, 0.5 steps/s"
    unknown = Progress("search", total=None, say=said.append)
    unknown(7, {"val_loss": 2.5})
    clock[0] += 40
    unknown(9, {"val_loss": 2.0})
    assert said[-2:] == ["search: step 7, val_loss 2.5", "search: step 9, val_loss 2, 0.05 steps/s"]
