"""Allocation validation and MoLA presets."""

import pytest
from pydantic import ValidationError

from guilomo.moe import Allocation, ModuleAllocation, MoeConfig, build_allocation, preset_experts


def names(layers=8, leaves=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")):
    out = []
    for i in range(layers):
        for leaf in leaves:
            grp = "self_attn" if leaf in ("q_proj", "v_proj") else "mlp"
            out.append(f"model.layers.{i}.{grp}.{leaf}")
        out.append(f"model.layers.{i}.mlp")
    return out


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(experts=2, top_k=1, ranks=[4, 0]), "ranks"),
        (dict(experts=2, top_k=1, ranks=[4, -2]), "ranks"),
        (dict(experts=2, top_k=3, ranks=[4, 4]), "top_k"),
        (dict(experts=3, top_k=1, ranks=[4, 4]), "one rank per expert"),
        (dict(experts=2, top_k=1, ranks=[4, 4], rank=8), "Extra inputs"),
        (dict(experts=0, top_k=1, ranks=[]), "experts"),
    ],
)
def test_module_allocation_rejects_bad_values(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        ModuleAllocation(**kwargs)


def test_config_rejects_unknown_keys():
    alloc = {"base_model": "m", "modules": {"a": {"experts": 1, "top_k": 1, "ranks": [2]}}}
    MoeConfig.model_validate({"allocation": alloc})
    with pytest.raises(ValidationError, match="Extra inputs"):
        MoeConfig.model_validate({"allocation": alloc, "lora_rank": 8})
    with pytest.raises(ValidationError, match="kind"):
        MoeConfig.model_validate({"allocation": alloc, "router": {"kind": "hash"}})
    with pytest.raises(ValidationError, match="at least one module"):
        Allocation(base_model="m", modules={})


def test_presets_by_hand():
    assert preset_experts("2468", 8) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert preset_experts("8642", 8) == [8, 8, 6, 6, 4, 4, 2, 2]
    assert preset_experts("2468", 32) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert preset_experts("uniform", 3, experts=5) == [5, 5, 5]
    assert preset_experts([1, 2, 3], 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="3 entries but the model has 4"):
        preset_experts([1, 2, 3], 4)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_experts("triangle-ish", 4)


def test_build_allocation_placements():
    alloc = build_allocation(
        base_model="m", module_names=names(), preset="2468", top_k=2, rank=4, placement="all"
    )
    assert len(alloc.modules) == 8 * 5
    assert alloc.modules["model.layers.0.self_attn.q_proj"] == ModuleAllocation(
        experts=2, top_k=2, ranks=[4, 4]
    )
    assert alloc.modules["model.layers.7.mlp.down_proj"].experts == 8

    mlp = build_allocation(base_model="m", module_names=names(), placement="mlp")
    assert {n.rsplit(".", 1)[1] for n in mlp.modules} == {"gate_proj", "up_proj", "down_proj"}

    mix = build_allocation(
        base_model="m", module_names=names(), preset="8642", placement="mixlora", rank=6
    )
    assert mix.modules["model.layers.0.mlp"] == ModuleAllocation(experts=8, top_k=2, ranks=[6] * 8)
    assert mix.modules["model.layers.0.self_attn.q_proj"] == ModuleAllocation(
        experts=1, top_k=1, ranks=[6]
    )
    assert "model.layers.0.mlp.gate_proj" not in mix.modules

    with pytest.raises(ValueError, match="targets"):
        build_allocation(base_model="m", module_names=["transformer.h.0.attn.c_attn"])


@pytest.mark.parametrize(
    "kwargs,module",
    [
        (dict(preset="uniform", experts=2), "model.layers.0.self_attn.q_proj"),
        (dict(preset="2468"), "model.layers.0.self_attn.q_proj"),  # layers 0-1 get 2 experts
        (dict(preset="8642"), "model.layers.6.self_attn.q_proj"),  # layers 6-7 get 2
        (dict(preset=[4, 4, 4, 2, 4, 4, 4, 4]), "model.layers.3.self_attn.q_proj"),
        (dict(preset="8642", placement="mixlora"), "model.layers.6.mlp"),
    ],
)
def test_top_k_above_a_modules_experts_is_refused(kwargs, module):
    with pytest.raises(ValueError, match=rf"top_k \(--top-k\) is 3, but {module} has only 2 "):
        build_allocation(base_model="m", module_names=names(), top_k=3, **kwargs)
    # with top_k at most the smallest count, every module keeps exactly the top_k asked for
    alloc = build_allocation(base_model="m", module_names=names(), top_k=2, **kwargs)
    assert {m.top_k for n, m in alloc.modules.items() if m.experts > 1} == {2}
