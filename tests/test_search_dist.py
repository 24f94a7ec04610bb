"""The search under torchrun: each process takes its rows of every batch, gradients are summed.

In-process tests check the sharding arithmetic against whole-batch autograd (a process group
of one sums nothing, so each shard's gradient can be taken in turn); the slow tests run the
README's `torchrun ... guilomo stage search` and the pipeline's task on 2 gloo processes and
compare them with one process.
"""

import json
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import search_model, tiny_llama
from guilomo.artifacts.search_state import STATE_TENSORS
from guilomo.moe import LossConfig
from guilomo.stages.bilevel import BilevelSearch, shard
from sft_helpers import base_and_data

IGNORE = -100


def padded_batch(rows=5, width=7, seed=0):
    """Rows of different lengths, right-padded: label -100 and attention 0 past each length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (rows, width), generator=g)
    lengths = [width - (i * 2) % 5 for i in range(rows)]  # 7, 5, 3, 6, 4
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[0, :2] = IGNORE  # a prompt not trained on
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_shard_weights_are_the_shares_of_label_tokens_and_rows():
    batch = padded_batch()
    # HF's causal-LM loss averages over the shifted labels that are not -100: count by hand
    counted = [sum(1 for t in row[1:] if t != IGNORE) for row in batch["labels"].tolist()]
    total = sum(counted)
    parts = [shard(batch, r, 2) for r in range(2)]
    assert parts[0].batch["input_ids"].tolist() == batch["input_ids"][[0, 2, 4]].tolist()
    assert parts[1].batch["labels"].tolist() == batch["labels"][[1, 3]].tolist()
    assert parts[0].ce_weight == pytest.approx((counted[0] + counted[2] + counted[4]) / total)
    assert parts[1].ce_weight == pytest.approx((counted[1] + counted[3]) / total)
    assert [p.aux_weight for p in parts] == [3 / 5, 2 / 5]
    whole = shard(batch, 0, 1)
    assert whole.batch is batch and (whole.ce_weight, whole.aux_weight) == (1.0, 1.0)
    empty = shard(batch, 5, 8)  # 5 rows over 8 processes: ranks 5-7 get none
    assert empty.batch is None and empty.ce_weight == 0.0


def shard_sum(search, batch, wrt, world_size):
    """The sum over `world_size` simulated processes of their shard gradients and CE."""
    grads, ce = None, 0.0
    for rank in range(world_size):
        g, c = search.grad(shard(batch, rank, world_size), wrt)
        grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
        ce += float(c)
    return grads, ce


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_sharded_ce_gradient_is_the_whole_batch_gradient(world_size):
    """Router losses off: any number of processes gives the one-process gradient."""
    model, adapter = search_model(torch.float64, losses=LossConfig(balance_coef=0.0))
    search = BilevelSearch(model, adapter, total_steps=4)
    batch = padded_batch()
    wrt = list(search.w.values()) + list(search.alpha.values())
    out = model(**batch)
    # top-1 routers and the expert GSVs are not in the graph: their gradient is zero
    expected = torch.autograd.grad(out.loss, wrt, allow_unused=True, materialize_grads=True)
    grads, ce = shard_sum(search, batch, wrt, world_size)
    # HF takes the loss in fp32 whatever the model's dtype: fp32 tolerances
    assert ce == pytest.approx(out.loss.item(), rel=1e-6)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_sharded_router_loss_is_averaged_over_shards():
    """Router losses on: CE of the whole batch plus the row-weighted mean of the shards'
    router losses, each taken by plain forward passes."""
    model, adapter = search_model(torch.float64, losses=LossConfig(balance_coef=0.5))
    search = BilevelSearch(model, adapter, total_steps=4)
    batch = padded_batch()
    wrt = list(search.w.values())
    model(**{k: v[[0, 2, 4]] for k, v in batch.items()})
    aux_even = adapter.aux_loss()
    model(**{k: v[[1, 3]] for k, v in batch.items()})
    aux_odd = adapter.aux_loss()
    ce = model(**batch).loss
    expected = torch.autograd.grad(ce + aux_even * 3 / 5 + aux_odd * 2 / 5, wrt)
    grads, _ = shard_sum(search, batch, wrt, 2)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_batch_smaller_than_the_process_count_is_refused(monkeypatch):
    import guilomo.stages.search as search_stage

    monkeypatch.setattr(search_stage, "world", lambda: (0, 8))
    config = search_stage.SearchConfig(batch_size=4, max_experts=2, max_rank=2, top_k=1)
    with pytest.raises(ValueError, match=r"batch_size \(4\) is smaller than the number of "):
        search_stage.SearchRun(tiny_llama(num_hidden_layers=1), config, base_model="tiny")


def test_router_load_covers_every_routed_module_even_uncounted():
    """A process whose shards were all empty so far reduces zeros for every module, so all
    processes send the same list; the shares are of the counted selections."""
    from guilomo.stages.search import router_load

    model, adapter = search_model(torch.float64, losses=LossConfig(balance_coef=0.0))
    assert set(router_load(adapter)) == set(adapter.layers)  # nothing counted yet
    assert all(v == [0.0, 0.0, 0.0] for v in router_load(adapter).values())
    model(**padded_batch())
    load = router_load(adapter)
    for name, counts in adapter.state.counts.items():
        assert load[name] == pytest.approx((counts / counts.sum()).tolist())


# -- for real: 2 gloo processes ----------------------------------------------------------


def search_args(world, out, *extra):
    return [
        "stage",
        "search",
        "--dataset",
        world / "data",
        "--base-model",
        world / "base",
        "--out",
        out,
        "--steps",
        4,
        "--max-experts",
        3,
        "--max-rank",
        2,
        "--top-k",
        2,  # top-1 would give the routers no gradient to compare
        "--batch-size",
        5,  # 48 train rows: the last batch has 3, split 2 + 1
        "--cutoff",
        48,
        "--lora-dropout",
        0,
        "--balance-coef",
        0,
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return base_and_data(tmp_path_factory.mktemp("search-dist"))


def assert_same_state(a, b):
    ta = load_file(str(a / STATE_TENSORS))
    tb = load_file(str(b / STATE_TENSORS))
    assert set(ta) == set(tb)
    for k in ta:
        if k.startswith(("gsv.", "w.", "history.")):
            torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-6, msg=k)
    la = json.loads((a / "search_state.json").read_text())["losses"]
    lb = json.loads((b / "search_state.json").read_text())["losses"]
    for x, y in zip(la, lb, strict=True):
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-4)
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["first", "second"])
def test_torchrun_search_two_processes_equal_one(world, tmp_path, order):
    """The README's multi-GPU search command, on CPU with 2 gloo processes."""
    guilomo = [sys.executable, "-m", "guilomo.cli"]
    one = search_args(world, tmp_path / "one", "--order", order)
    r = subprocess.run([*guilomo, *map(str, one)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = search_args(world, tmp_path / "two", "--order", order)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*torchrun, "--nproc_per_node", "2", *guilomo[1:], *map(str, two)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_state(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_search_task_on_two_processes_equals_one_and_tracks_once(world, tmp_path, monkeypatch):
    from guilomo.tasks import Io, Tracking, run_task
    from guilomo.tracking import stage_records, start_pipeline_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    config = {
        "base_model": str(world / "base"),
        "steps": 3,
        "max_experts": 2,
        "max_rank": 2,
        "top_k": 1,
        "batch_size": 4,
        "cutoff": 48,
        "lora_dropout": 0.0,
        "balance_coef": 0.0,
    }
    parent = start_pipeline_run(run_name="t", params={}, tags={})
    data = Io(world / "data", str(world / "data"))
    for gpus in (1, 2):
        out = tmp_path / f"state-{gpus}"
        metrics = run_task(
            "search", config, {"dataset": data}, Io(out, str(out)), Tracking(parent, gpus=gpus)
        )
        assert metrics["steps"] == 3
    assert_same_state(tmp_path / "state-1", tmp_path / "state-2")
    runs = [r for r in stage_records(parent) if r.stage == "search"]
    assert len(runs) == 2  # one child run per task, not one per rank
    assert {r.tags["guilomo.gpus"] for r in runs} == {"1", "2"}
    history = MlflowClient().get_metric_history(runs[1].run_id, "val_loss")
    assert [m.step for m in history] == [1, 2, 3]
