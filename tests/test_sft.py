"""SFT stage: it trains, resumes to the same adapter, and runs under torchrun (2 processes)."""

import pytest
import torch
from safetensors.torch import load_file

from guilomo.artifacts import read_artifact
from guilomo.stages.sft import SftConfig, run_sft
from sft_helpers import allocation, model_and_tokenizer, prepared

CFG = SftConfig(
    base_model="tiny",
    max_steps=8,
    batch_size=8,
    micro_batch_size=4,
    lr=1e-2,
    warmup_steps=1,
    cutoff=64,
    checkpoint_every=3,
    lora_dropout=0.1,
    seed=5,
)


def sft(tmp_path, name, config=CFG, stop_after=None, ckpt="ckpt"):
    model, tok = model_and_tokenizer()
    data = tmp_path / "data"
    if not data.exists():
        prepared(data)
    return run_sft(
        config,
        dataset=data,
        allocation=allocation(model),
        out=tmp_path / name,
        model=model,
        tokenizer=tok,
        checkpoints=tmp_path / f"{name}.{ckpt}",
        stop_after=stop_after,
        progress=False,
    )


def test_sft_lowers_loss_and_writes_adapter(tmp_path):
    r = sft(tmp_path, "a", CFG.model_copy(update={"max_steps": 25}))
    assert r.losses[-1] < 0.5 * r.losses[0], r.losses
    m = read_artifact(tmp_path / "a", kind="Adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "train_log.json"} <= set(m.files)
    assert m.metadata["steps"] == 25


@pytest.mark.parametrize("checkpointing", [False, True])
def test_resume_equals_uninterrupted(tmp_path, checkpointing):
    config = CFG.model_copy(update={"gradient_checkpointing": checkpointing})
    full = sft(tmp_path, "full", config)
    part = sft(tmp_path, "resumed", config, stop_after=5)
    assert part.steps == 5 and not (tmp_path / "resumed").exists()  # no half artifact
    rest = sft(tmp_path, "resumed", config)
    assert rest.resumed_from == 5 and rest.steps == 8
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.losses == rest.losses
    if checkpointing:  # the same training as without checkpointing, to float tolerance
        plain = sft(tmp_path, "plain")
        torch.testing.assert_close(full.losses, plain.losses, rtol=1e-4, atol=0)


def test_parallel_is_ignored_by_one_process_and_checkpoints_cross_it(tmp_path):
    """`parallel` only decides how several processes share the work: in one process fsdp
    trains as ddp, and a checkpoint of either resumes under the other."""
    fsdp = CFG.model_copy(update={"parallel": "fsdp"})
    full = sft(tmp_path, "ddp")
    part = sft(tmp_path, "mixed", fsdp, stop_after=4)
    assert part.steps == 4
    rest = sft(tmp_path, "mixed")  # the default, ddp, resumes the fsdp run's checkpoint
    assert rest.resumed_from == 4 and rest.losses == full.losses
    a = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "mixed" / "adapter_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_of_another_config_is_refused(tmp_path):
    sft(tmp_path, "x", stop_after=3)
    with pytest.raises(ValueError, match="another config"):
        sft(tmp_path, "x", CFG.model_copy(update={"lr": 5e-3}))


def test_bad_config():
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        SftConfig(batch_size=10, micro_batch_size=4)
