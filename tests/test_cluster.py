"""The multi-node SFT command line (guilomo.cluster.TORCHRUN_SFT, rendered by the chart's
PyTorchJob) runs for real: on CPU, one node, 2 gloo processes, a tiny model."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_llama, tiny_tokenizer
from guilomo.artifacts import read_artifact
from guilomo.cluster import TORCHRUN_SFT, torchrun_sft_command

BIN = Path(sys.executable).parent


def guilomo(*args):
    r = subprocess.run(
        [str(BIN / "guilomo"), *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_command_line_shape():
    assert TORCHRUN_SFT[0] == "torchrun"
    assert TORCHRUN_SFT[TORCHRUN_SFT.index("-m") + 1 :][:3] == ["guilomo.cli", "stage", "sft"]
    with pytest.raises(KeyError):
        torchrun_sft_command(nnodes=1)


@pytest.mark.slow
def test_torchrun_sft_trains_with_two_gloo_processes(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), initializer_range=0.2, num_hidden_layers=2)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    guilomo(
        "stage", "preprocess", "--out", tmp_path / "data", "--datasets", "sciq",
        "--train-size", 32, "--validation-size", 8, "--test-size", 8, "--seed", 1,
    )  # fmt: skip
    guilomo(
        "stage", "allocate", "--out", tmp_path / "alloc", "--base-model", tmp_path / "base",
        "--preset", "2468", "--rank", 4,
    )  # fmt: skip
    config = tmp_path / "sft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tmp_path / "base"),
                "max_steps": 3,
                "batch_size": 4,
                "micro_batch_size": 2,
                "cutoff": 64,
                "lora_dropout": 0.0,
            }
        )
    )
    cmd = torchrun_sft_command(
        nnodes=1,
        nproc_per_node=2,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=free_port(),
        config=config,
        dataset=tmp_path / "data",
        allocation=tmp_path / "alloc",
        checkpoints=tmp_path / "ckpt",
        out=tmp_path / "adapter",
    )
    cmd[0] = str(BIN / "torchrun")  # the venv's torchrun, as the image's is on PATH
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sft: 3 steps" in r.stdout, r.stdout[-2000:]
    adapter = read_artifact(tmp_path / "adapter", kind="Adapter")
    assert adapter.metadata["steps"] == 3
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
