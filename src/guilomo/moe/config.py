"""Typed adapter configuration and the per-module `Allocation`.

An allocation says, for every adapted module of a base model, how many experts it has,
how many of them each token uses (top-k) and the rank of every expert. The allocation is
data (like PEFT's `rank_pattern`), never parsed out of parameter names. MoLA's hand-made
allocations ("uniform", "2468", "8642", a per-layer list) are presets that build one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ALLOCATION_SCHEMA_VERSION = 1

#: Every projection of a LLaMA-family decoder layer (MoLA's default placement).
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The feed-forward projections only (LoRAMoE's placement).
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

RouterKind = Literal["topk", "switch", "soft", "top_p", "threshold"]
Placement = Literal["all", "mlp", "mixlora"]
#: How a search reads its GSVs (see `guilomo.moe.gsv`).
Estimator = Literal["expected", "reference"]
ESTIMATORS: tuple[str, ...] = ("expected", "reference")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModuleAllocation(_Strict):
    """One adapted module: its experts, how many each token uses, and each expert's rank."""

    experts: int = Field(ge=1, description="Number of LoRA experts in this module.")
    top_k: int = Field(
        ge=1,
        description="Experts each token is routed to (top-k routing); at most `experts`.",
    )
    ranks: list[int] = Field(description="Rank of every expert, one entry per expert.")

    @model_validator(mode="after")
    def _check(self) -> ModuleAllocation:
        if len(self.ranks) != self.experts:
            raise ValueError(
                f"`ranks` has {len(self.ranks)} entries but `experts` is {self.experts}: "
                "give exactly one rank per expert"
            )
        bad = [r for r in self.ranks if r <= 0]
        if bad:
            raise ValueError(f"`ranks` must all be >= 1, got {self.ranks}")
        if self.top_k > self.experts:
            raise ValueError(
                f"`top_k` ({self.top_k}) is larger than `experts` ({self.experts}): "
                "lower top_k or add experts"
            )
        return self

    @property
    def total_rank(self) -> int:
        return sum(self.ranks)


class Allocation(_Strict):
    """Per-module expert counts, top-k and expert ranks for one base model.

    Module names are full dotted names in the base model (``model.layers.0.self_attn.q_proj``).
    A name that points to an ``nn.Linear`` gets a LoRA-MoE linear; a name that points to a
    LLaMA-style MLP block (``gate_proj``/``up_proj``/``down_proj``/``act_fn``) gets a
    MixLoRA block whose experts are whole feed-forward networks sharing one router.
    """

    schema_version: Literal[1] = ALLOCATION_SCHEMA_VERSION
    base_model: str = Field(description="Id or path of the base model this allocation is for.")
    modules: dict[str, ModuleAllocation] = Field(description="Full module name -> allocation.")

    @model_validator(mode="after")
    def _check(self) -> Allocation:
        if not self.modules:
            raise ValueError("`modules` is empty: an allocation must adapt at least one module")
        return self

    @property
    def module_names(self) -> list[str]:
        return list(self.modules)

    def summary(self) -> dict[str, int]:
        experts = [m.experts for m in self.modules.values()]
        return {
            "modules": len(experts),
            "experts": sum(experts),
            "total_rank": sum(m.total_rank for m in self.modules.values()),
        }


class RouterConfig(_Strict):
    """How tokens choose experts. `top_k` per module lives in the allocation."""

    kind: RouterKind = Field(
        default="topk",
        description=(
            "topk: softmax, top-k, renormalised (MoLA, Mixtral); switch: top-1 with expert "
            "capacity, jitter and z-loss (MixLoRA 'switch'); soft: dense softmax over all "
            "experts (LoRAMoE); top_p: smallest set of experts whose probability mass >= "
            "top_p (MixLoRA 'dynamic'); threshold: experts whose probability exceeds a "
            "learned per-token threshold (MoA / AdaMoLE)."
        ),
    )
    capacity_factor: float = Field(
        default=1.25, gt=0, description="switch: capacity = ceil(factor * tokens / experts)."
    )
    jitter_noise: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="switch: router input multiplied by U(1-eps, 1+eps) in training.",
    )
    top_p: float = Field(default=0.75, gt=0, le=1, description="top_p: probability mass kept.")
    max_threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="threshold: tau(x) = max_threshold * sigmoid(w.x + b); default 1/experts.",
    )


class LossConfig(_Strict):
    """Auxiliary router losses added to the language-model loss."""

    balance_coef: float = Field(
        default=0.001, ge=0, description="Switch/Mixtral load-balancing loss weight (MoLA 0.001)."
    )
    z_loss_coef: float = Field(
        default=0.0, ge=0, description="Router z-loss weight: mean(logsumexp(logits)^2)."
    )
    localized_coef: float = Field(
        default=0.0, ge=0, description="LoRAMoE localized balancing constraint weight."
    )
    localized_beta: float = Field(
        default=0.1, ge=0, lt=1, description="LoRAMoE importance contrast: 1 +/- beta."
    )
    localized_groups: int = Field(
        default=2, ge=1, description="LoRAMoE expert groups (= number of task types)."
    )


class MoeConfig(_Strict):
    """Everything needed to rebuild a LoRA-MoE adapter on its base model."""

    allocation: Allocation
    lora_alpha: float = Field(
        default=16.0, gt=0, description="Expert e is scaled by lora_alpha / rank_e."
    )
    lora_dropout: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description=(
            "Dropout on the expert input (not the router's); applied as a multiple of 2^-16."
        ),
    )
    router: RouterConfig = RouterConfig()
    losses: LossConfig = LossConfig()

    @property
    def base_model(self) -> str:
        return self.allocation.base_model


# ----------------------------------------------------------------------------- presets

_LAYER_RE = re.compile(r"^(?P<prefix>.*?\blayers)\.(?P<idx>\d+)\.(?P<rest>.+)$")


def layer_modules(module_names: Iterable[str], targets: Sequence[str]) -> list[list[str]]:
    """Group the module names that end in one of `targets` by decoder-layer index.

    Returns one list per layer (in layer order), each holding the matching names in the
    order of `targets`.
    """
    found: dict[int, dict[str, str]] = {}
    for name in module_names:
        m = _LAYER_RE.match(name)
        if not m:
            continue
        leaf = m["rest"].rsplit(".", 1)[-1]
        if leaf in targets:
            found.setdefault(int(m["idx"]), {})[leaf] = name
    if not found:
        return []
    layers = sorted(found)
    return [[found[i][t] for t in targets if t in found[i]] for i in layers]


def preset_experts(preset: str | Sequence[int], num_layers: int, experts: int = 4) -> list[int]:
    """Experts per layer for a MoLA preset.

    - ``"uniform"``: `experts` in every layer;
    - ``"2468"`` / ``"8642"``: 2, 4, 6, 8 (or reversed) experts in each quarter of the layers;
    - a list of ints: one count per layer.
    """
    if isinstance(preset, str):
        if preset == "uniform":
            return [experts] * num_layers
        if preset in ("2468", "8642"):
            counts = [2, 4, 6, 8] if preset == "2468" else [8, 6, 4, 2]
            return [counts[min(3, 4 * i // num_layers)] for i in range(num_layers)]
        raise ValueError(
            f"unknown preset {preset!r}: use 'uniform', '2468', '8642' or a per-layer list"
        )
    counts = [int(c) for c in preset]
    if len(counts) != num_layers:
        raise ValueError(
            f"per-layer preset has {len(counts)} entries but the model has {num_layers} layers"
        )
    if any(c < 1 for c in counts):
        raise ValueError(f"per-layer expert counts must be >= 1, got {counts}")
    return counts


def build_allocation(
    *,
    base_model: str,
    module_names: Iterable[str],
    preset: str | Sequence[int] = "uniform",
    experts: int = 4,
    top_k: int = 2,
    rank: int = 8,
    placement: Placement = "all",
    targets: Sequence[str] | None = None,
) -> Allocation:
    """An `Allocation` from a MoLA preset over the decoder layers found in `module_names`.

    `placement` picks the targets: ``all`` projections (MoLA), ``mlp`` only (LoRAMoE), or
    ``mixlora``: one MixLoRA block per layer over its MLP (whole-FFN experts sharing a
    router) plus plain LoRA (one expert) on the attention projections. Every module gets
    `top_k`; one with fewer experts than that is a ValueError (see `check_top_k`).
    """
    names = list(module_names)
    if placement == "mixlora":
        attn = layer_modules(names, targets or ATTENTION_PROJECTIONS)
        mlp_leaf = layer_modules(names, ("gate_proj",))
        if not mlp_leaf:
            raise ValueError("mixlora placement needs LLaMA-style `mlp.gate_proj` modules")
        counts = preset_experts(preset, len(mlp_leaf), experts)
        blocks = {gate.rsplit(".", 1)[0]: counts[i] for i, (gate,) in enumerate(mlp_leaf)}
        check_top_k(top_k, blocks)
        modules: dict[str, ModuleAllocation] = {}
        for i, (mlp, n) in enumerate(blocks.items()):
            for name in attn[i] if i < len(attn) else []:
                modules[name] = ModuleAllocation(experts=1, top_k=1, ranks=[rank])
            modules[mlp] = ModuleAllocation(experts=n, top_k=top_k, ranks=[rank] * n)
        return Allocation(base_model=base_model, modules=modules)

    chosen = (
        tuple(targets) if targets else (ALL_PROJECTIONS if placement == "all" else MLP_PROJECTIONS)
    )
    layers = layer_modules(names, chosen)
    if not layers:
        raise ValueError(
            f"no decoder-layer modules named {list(chosen)} found; pass `targets` with the "
            "projection names of this architecture"
        )
    counts = preset_experts(preset, len(layers), experts)
    experts_of = {name: counts[i] for i, layer in enumerate(layers) for name in layer}
    check_top_k(top_k, experts_of)
    modules = {
        name: ModuleAllocation(experts=n, top_k=top_k, ranks=[rank] * n)
        for name, n in experts_of.items()
    }
    return Allocation(base_model=base_model, modules=modules)


def check_top_k(
    top_k: int, experts: Mapping[str, int], *, more: str = "raise --experts / the preset's counts"
) -> None:
    """ValueError naming the first module with fewer than `top_k` experts (`experts`: module
    -> expert count); `more` says how to give it more. Lowering top_k there instead would
    quietly train another method than the one asked for."""
    for name, n in experts.items():
        if n < top_k:
            raise ValueError(
                f"top_k (--top-k) is {top_k}, but {name} has only {n} expert(s): lower --top-k "
                f"to {min(experts.values())} or less, or {more}"
            )
