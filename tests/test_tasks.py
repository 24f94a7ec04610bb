"""guilomo.tasks: what the KFP components run. The SFT task with gpus > 1 reruns itself under
torchrun (one process per GPU; gloo on CPU here) and must equal the single-process task."""

import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from guilomo.artifacts.allocation import write_allocation
from guilomo.config import AllocateConfig
from guilomo.tasks import Io, Tracking, sft_task, torchrun_command
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
        loss = sft_task(config, dataset, alloc, Io(out, str(out)), Tracking(parent, gpus=gpus))
        results[gpus] = (loss, load_file(str(out / "adapter_model.safetensors")))
    assert results[2][0] == pytest.approx(results[1][0], rel=1e-4)
    for k, v in results[1][1].items():
        torch.testing.assert_close(results[2][1][k], v, rtol=1e-4, atol=1e-6)
    runs = [r for r in stage_records(parent) if r.stage == "sft"]
    assert len(runs) == 2  # one child run per task, not one per rank
    assert {r.tags["guilomo.gpus"] for r in runs} == {"1", "2"}
    history = MlflowClient().get_metric_history(runs[1].run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
