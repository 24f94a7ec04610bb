"""Injection into stock transformers models, save / load, bad input, and a short training."""

import hashlib
import json

import pytest
import torch

from conftest import tiny_llama
from guilomo.moe import AdapterError, MoeConfig, build_allocation, inject_adapter, load_adapter
from guilomo.moe.config import Allocation, LossConfig, ModuleAllocation, RouterConfig


def config_for(model, placement="all", preset="2468", **kw):
    alloc = build_allocation(
        base_model="tiny",
        module_names=[n for n, _ in model.named_modules()],
        preset=preset,
        placement=placement,
        rank=4,
    )
    return MoeConfig(allocation=alloc, **kw)


def batch(vocab=64, b=3, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :4] = 0
    return ids, mask


def base_digest(model):
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if "lora_" not in name and "router" not in name:
            h.update(name.replace(".base_layer", "").encode())
            h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def other_architectures():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return {
        "mistral": MistralForCausalLM(MistralConfig(**common)).eval(),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**common)).eval(),
    }


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("placement", ["all", "mlp", "mixlora"])
def test_injection_starts_at_base_and_trains_only_adapter(arch, placement):
    model = tiny_llama() if arch == "llama" else other_architectures()[arch]
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    cfg = config_for(model, placement, losses=LossConfig(balance_coef=0.01, z_loss_coef=0.001))
    adapter = inject_adapter(model, cfg)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, before, atol=1e-6, rtol=1e-6)  # B = 0 at step 0
    (out.loss + adapter.aux_loss()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "router" in n) for n in trainable)
    assert all(p.grad is not None for p in adapter.parameters())
    assert set(adapter.state.records) == {
        n for n, a in cfg.allocation.modules.items() if a.experts > 1
    }
    assert (
        sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
        == adapter.num_parameters()
    )


def test_unsupported_architecture_names_missing_modules():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
    cfg = config_for(tiny_llama())
    with pytest.raises(
        AdapterError, match=r"GPT2LMHeadModel has no module model\.layers\.0\.self_attn\.q_proj"
    ):
        inject_adapter(gpt2, cfg)
    alloc = Allocation(
        base_model="gpt2",
        modules={"transformer.h.0.attn.c_attn": ModuleAllocation(experts=2, top_k=1, ranks=[2, 2])},
    )
    with pytest.raises(
        AdapterError, match="cannot wrap transformer.h.0.attn.c_attn of type Conv1D"
    ):
        inject_adapter(gpt2, MoeConfig(allocation=alloc))


def test_allocation_naming_absent_modules_is_refused_and_model_untouched(llama):
    alloc = Allocation(
        base_model="tiny",
        modules={
            "model.layers.0.self_attn.q_proj": ModuleAllocation(experts=2, top_k=1, ranks=[2, 2]),
            "model.layers.9.self_attn.q_proj": ModuleAllocation(experts=2, top_k=1, ranks=[2, 2]),
        },
    )
    digest = base_digest(llama)
    with pytest.raises(AdapterError, match=r"no module model\.layers\.9\.self_attn\.q_proj"):
        inject_adapter(llama, MoeConfig(allocation=alloc))
    assert base_digest(llama) == digest
    assert all(p.requires_grad for p in llama.parameters())


def trained_adapter(tmp_path, placement="all", router="topk"):
    model = tiny_llama()
    adapter = inject_adapter(model, config_for(model, placement, router=RouterConfig(kind=router)))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    adapter.save(tmp_path / "adapter")
    return model, adapter


@pytest.mark.parametrize(
    "placement,router", [("all", "topk"), ("mixlora", "top_p"), ("mlp", "threshold")]
)
def test_save_load_bit_identical(tmp_path, placement, router):
    model, adapter = trained_adapter(tmp_path, placement, router)
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        got = fresh(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    doc = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert doc["config"]["allocation"] == json.loads(adapter.config.allocation.model_dump_json())
    assert not list((tmp_path / "adapter").glob("*.tmp"))


def test_load_refuses_other_base_shapes(tmp_path):
    trained_adapter(tmp_path)
    wider = tiny_llama(hidden_size=48)
    with pytest.raises(AdapterError, match=r"module model\.layers\.\d+\.\S+ was .* but is"):
        load_adapter(wider, tmp_path / "adapter")


def test_load_refuses_corrupted_safetensors(tmp_path):
    trained_adapter(tmp_path)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    fresh = tiny_llama()
    digest = base_digest(fresh)
    with pytest.raises(AdapterError, match="adapter_model.safetensors: corrupted"):
        load_adapter(fresh, tmp_path / "adapter")
    assert base_digest(fresh) == digest and not any(
        "lora_" in n for n, _ in fresh.named_parameters()
    )


def test_load_refuses_mismatched_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    trained_adapter(tmp_path)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "model.layers.0.self_attn.q_proj.lora_A"
    tensors[key] = torch.zeros(3, 32)
    save_file(tensors, str(path))
    fresh = tiny_llama()
    with pytest.raises(
        AdapterError,
        match=r"tensor model\.layers\.0\.self_attn\.q_proj\.lora_A has shape \(3, 32\)",
    ):
        load_adapter(fresh, tmp_path / "adapter")
    assert not any("lora_" in n for n, _ in fresh.named_parameters())
    del tensors[key]
    save_file(tensors, str(path))
    with pytest.raises(AdapterError, match="missing"):
        load_adapter(tiny_llama(), tmp_path / "adapter")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: "{not json", r"adapter_config.json: not valid JSON \(line 1"),
        (lambda d: json.dumps({**d, "format": "peft"}), "not a guilomo LoRA-MoE adapter"),
        (
            lambda d: json.dumps({**d, "config": {**d["config"], "lora_alpha": -1}}),
            r"config\.lora_alpha",
        ),
    ],
)
def test_load_refuses_bad_config(tmp_path, edit, match):
    trained_adapter(tmp_path)
    cfg = tmp_path / "adapter" / "adapter_config.json"
    cfg.write_text(edit(json.loads(cfg.read_text())))
    with pytest.raises(AdapterError, match=match):
        load_adapter(tiny_llama(), tmp_path / "adapter")


def test_training_lowers_loss_and_leaves_base_untouched():
    # initializer_range 0.3: with the default 0.02 the frozen random head caps the logits
    model = tiny_llama(initializer_range=0.3)
    digest = base_digest(model)
    adapter = inject_adapter(model, config_for(model, "all", lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    ids, mask = batch(b=8, t=16, seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for _ in range(40):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss = out.loss + adapter.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert base_digest(model) == digest
    stats = adapter.router_stats()
    assert all(abs(sum(v) - 1) < 1e-6 for v in stats.values())
