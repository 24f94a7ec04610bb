"""`guilomo plan-memory`: parameter bytes by hand, activations measured on a real step."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

GUILOMO = str(Path(sys.executable).parent / "guilomo")
GIB = 2**30


def plan(*args):
    r = subprocess.run([GUILOMO, "plan-memory", *args], capture_output=True, text=True)
    return r


def test_llama_3_8b_parts_by_hand_and_under_24_gib():
    r = plan("--base-model", "llama-3-8b", "--gradient-checkpointing", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    # LLaMA-3-8B: V 128256, H 4096, I 14336, 32 layers, 8 KV heads of 128, untied head
    v, h, i, layers, kv = 128256, 4096, 14336, 32, 8 * 128
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q o, k v, gate up down, 2 norms
    base = 2 * v * h + layers * per_layer + h
    # 8 experts of rank 8 per projection: A (64, d_in), B (d_out, 64), router (8, d_in)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    adapter = layers * sum(64 * (d_in + d_out) + 8 * d_in for d_in, d_out in shapes)
    assert got["base_weights"] == pytest.approx(2 * base / GIB, abs=1e-4)  # bf16
    assert got["adapter_weights"] == pytest.approx(2 * adapter / GIB, abs=1e-4)
    assert got["optimizer"] == pytest.approx(2 * got["adapter_weights"], abs=1e-3)
    assert got["total"] < 24
    plain = json.loads(plan("--base-model", "llama-3-8b", "--json").stdout)
    assert plain["activations"] > 5 * got["activations"]  # checkpointing keeps layer inputs


def test_a_config_file_and_bad_input(tmp_path):
    config = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = plan("--base-model", str(tmp_path), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "total" in r.stdout and "GiB" in r.stdout
    missing = plan("--base-model", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such config.json" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    bad = plan("--base-model", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "not a transformers model config" in bad.stderr
