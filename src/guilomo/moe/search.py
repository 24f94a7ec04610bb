"""Search mode: a LoRA-MoE at maximum size whose GSVs pick expert counts and ranks.

Every module gets N_max experts of rank R_max and a `ModuleGsv`; the masks are per-rank-
column gates on the same fused path as the plain layer, so a search forward costs about
what an SFT forward costs. `extract_allocation` turns the learned GSVs into an
`Allocation`, optionally shrunk to a parameter budget.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .config import Allocation, ModuleAllocation, MoeConfig, Placement, build_allocation
from .gsv import (
    REFERENCE_INIT_STD,
    Estimator,
    ModuleGsv,
    at_least,
    choose,
    count_distributions,
    expected_size,
    forget,
    modes,
    read_together,
)
from .layer import LoraMoeLinear
from .model import AdapterError, MoeAdapter, inject_adapter


def inject_search(
    model: nn.Module,
    *,
    base_model: str,
    max_experts: int = 8,
    max_rank: int = 8,
    top_k: int = 2,
    placement: Placement = "all",
    targets: Sequence[str] | None = None,
    seed: int = 0,
    estimator: Estimator = "expected",
    tau: float = 0.1,
    **config: object,
) -> MoeAdapter:
    """Inject a search-mode LoRA-MoE (N_max experts of rank R_max everywhere) with GSVs.

    With ``estimator="reference"`` the LoRA A and B start N(0, 0.02), as in the reference
    code's search stage; otherwise as in SFT (A kaiming-uniform, B zero)."""
    if placement == "mixlora":
        raise ValueError("the GSV search supports placements 'all' and 'mlp', not 'mixlora'")
    alloc = build_allocation(
        base_model=base_model,
        module_names=[n for n, _ in model.named_modules()],
        preset="uniform",
        experts=max_experts,
        top_k=top_k,
        rank=max_rank,
        placement=placement,
        targets=targets,
    )
    adapter = inject_adapter(model, MoeConfig(allocation=alloc, **config))
    gen = torch.Generator().manual_seed(seed)
    for layer in adapter.layers.values():
        layer.gsv = ModuleGsv(
            max_experts=max_experts,
            max_rank=max_rank,
            top_k=top_k,
            estimator=estimator,
            tau=tau,
            generator=gen,
        )
        if estimator == "reference":
            with torch.no_grad():
                for p in (layer.lora_A, layer.lora_B):
                    p.copy_(torch.randn(p.shape, generator=gen) * REFERENCE_INIT_STD)
    # every forward reads all GSVs in one batched pass (see read_together), then lets go
    reader = _GsvReader([layer.gsv for layer in adapter.layers.values()])
    adapter.search_reader = reader
    adapter.search_hooks = (
        model.register_forward_pre_hook(reader.before),
        model.register_forward_hook(reader.after, always_call=True),
    )
    return adapter


class _GsvReader:
    """The search model's forward hooks. Bound methods, so a deep copy of the model copies
    this object too and its hooks read the copy's GSVs. With `hold` (activation
    checkpointing) a forward's reading stays until the next forward: the backward's
    recomputation must see the very gates the forward used."""

    def __init__(self, gsvs: list[ModuleGsv]) -> None:
        self.gsvs = gsvs
        self.hold = False

    def before(self, _model: nn.Module, _args: tuple) -> None:  # (a return would replace args)
        read_together(self.gsvs)

    def after(self, _model: nn.Module, _args: tuple, _out: object) -> None:
        if not self.hold:
            forget(self.gsvs)


def expected_parameters(adapter: MoeAdapter) -> torch.Tensor:
    """E[trainable parameters] of the allocation the GSVs describe (``expected`` estimator),
    differentiable in the GSVs (all modules in one batched pass when their GSVs match)."""
    layers = list(adapter.layers.values())
    gsvs = [layer.gsv for layer in layers]
    stacked = read_together(gsvs)
    forget(gsvs)
    if stacked is None:
        return sum(
            gsv.expected_parameters(m.in_features, m.out_features)
            for gsv, m in zip(gsvs, layers, strict=True)
        )
    q, gates = stacked
    d_in = torch.tensor([m.in_features for m in layers], dtype=q.dtype, device=q.device)
    d_out = torch.tensor([m.out_features for m in layers], dtype=q.dtype, device=q.device)
    return expected_size(q, gates, d_in, d_out).sum()


@torch.no_grad()
def mode_parameters(adapter: MoeAdapter) -> int:
    """Trainable parameters of the allocation the GSVs select now (each distribution's
    mode), with one host sync for all modules (see `guilomo.moe.gsv.choose`)."""
    total = None
    for layer in adapter.layers.values():
        g = layer.gsv
        d_in, d_out = layer.in_features, layer.out_features
        n, ranks = modes(g.expert, g.rank, top_k=g.top_k, estimator=g.estimator, tau=g.tau)
        kept = torch.arange(ranks.shape[0], device=ranks.device) < n
        size = (d_in + d_out) * (ranks * kept).sum() + d_in * n * (n > 1)
        total = size if total is None else total + size
    return int(total)


def gsv_parameters(adapter: MoeAdapter) -> dict[str, nn.Parameter]:
    return {k: p for k, p in _named(adapter).items() if ".gsv." in k}


def weight_parameters(adapter: MoeAdapter) -> dict[str, nn.Parameter]:
    return {k: p for k, p in _named(adapter).items() if ".gsv." not in k}


def _named(adapter: MoeAdapter) -> dict[str, nn.Parameter]:
    return {
        f"{name}.{n}": p
        for name, layer in adapter.layers.items()
        for n, p in layer.named_parameters()
        if not n.startswith("base_layer.")
    }


def module_shapes(adapter: MoeAdapter) -> dict[str, tuple[int, int]]:
    out = {}
    for name, layer in adapter.layers.items():
        if not isinstance(layer, LoraMoeLinear):
            raise AdapterError(f"{name}: search mode needs LoRA-MoE linears")
        out[name] = (layer.in_features, layer.out_features)
    return out


def module_parameters(shape: tuple[int, int], experts: int, ranks: Sequence[int]) -> int:
    """Trainable parameters of one LoRA-MoE linear: experts' A and B plus the router."""
    d_in, d_out = shape
    return sum(ranks) * (d_in + d_out) + (experts * d_in if experts > 1 else 0)


def allocation_parameters(alloc: Allocation, shapes: Mapping[str, tuple[int, int]]) -> int:
    return sum(module_parameters(shapes[n], m.experts, m.ranks) for n, m in alloc.modules.items())


def size_range(
    shapes: Mapping[str, tuple[int, int]], *, top_k: int, max_experts: int, max_rank: int
) -> tuple[int, int]:
    """(smallest, largest) trainable parameters a search over `shapes` can select: top_k
    experts of rank 1 everywhere, N_max experts of rank R_max everywhere."""
    low = sum(module_parameters(s, top_k, [1] * top_k) for s in shapes.values())
    high = sum(module_parameters(s, max_experts, [max_rank] * max_experts) for s in shapes.values())
    return low, high


PRESET_SPEC = "uniform:E, uniform:ExR, 2468, 8642, 2468xR or 8642xR (R: rank, default 8)"


def preset_parameters(
    spec: str, shapes: Mapping[str, tuple[int, int]], *, top_k: int, placement: Placement = "all"
) -> int:
    """Trainable parameters of a MoLA preset on the modules of `shapes`, e.g. ``uniform:8``
    (8 experts of rank 8 everywhere), ``uniform:5x4`` or ``2468`` (MoLA's, rank 8)."""
    name, _, size = spec.strip().partition(":")
    if name == "uniform":
        experts_text, _, rank_text = size.partition("x")
    elif name[:4] in ("2468", "8642") and not size:
        experts_text, rank_text = "4", name[4:].lstrip("x")
        name = name[:4]
    else:
        raise ValueError(f"preset {spec!r}: use {PRESET_SPEC}")
    try:
        experts, rank = int(experts_text), int(rank_text or 8)
    except ValueError:
        raise ValueError(f"preset {spec!r}: use {PRESET_SPEC}") from None
    if experts < 1 or rank < 1:
        raise ValueError(f"preset {spec!r}: experts and rank must be >= 1")
    alloc = build_allocation(
        base_model="-",
        module_names=list(shapes),
        preset=name,
        experts=experts,
        top_k=top_k,
        rank=rank,
        placement=placement,
    )
    missing = sorted(set(alloc.modules) - set(shapes))
    if missing:
        raise ValueError(f"preset {spec!r} adapts modules this search does not: {missing[:3]}")
    return allocation_parameters(alloc, shapes)


def extract_allocation(
    gsvs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    base_model: str,
    top_k: int,
    shapes: Mapping[str, tuple[int, int]],
    budget: int | None = None,
    estimator: Estimator = "expected",
    tau: float = 0.1,
) -> Allocation:
    """GSVs -> Allocation: the mode of each distribution (see `guilomo.moe.gsv.choose`).

    `gsvs` maps module name -> (expert GSV (N_max,), rank GSVs (N_max, R_max)). With a
    `budget` (trainable parameters), the least likely choice (the last kept expert of a
    module, or the last kept rank component of an expert; ``expected``: smallest P(n >= j)
    or P(r_j >= t), ``reference``: smallest sigmoid value) is dropped until the allocation
    fits; never below top_k experts of rank 1.
    """
    experts: dict[str, int] = {}
    ranks: dict[str, list[int]] = {}
    s_expert: dict[str, list[float]] = {}
    s_rank: dict[str, list[list[float]]] = {}
    for name, (g_e, g_r) in gsvs.items():
        experts[name], ranks[name] = choose(g_e, g_r, top_k=top_k, estimator=estimator, tau=tau)
        if estimator == "expected":
            q, p = count_distributions(g_e.double(), g_r.double(), top_k=top_k, tau=tau)
            s_expert[name], s_rank[name] = at_least(q).tolist(), at_least(p).tolist()
        else:
            s_expert[name] = torch.sigmoid(g_e.double()).tolist()
            s_rank[name] = torch.sigmoid(g_r.double()).tolist()

    if budget is not None:
        _trim_to_budget(experts, ranks, s_expert, s_rank, shapes=shapes, top_k=top_k, budget=budget)
    modules = {
        n: ModuleAllocation(experts=experts[n], top_k=min(top_k, experts[n]), ranks=ranks[n])
        for n in experts
    }
    return Allocation(base_model=base_model, modules=modules)


def _trim_to_budget(
    experts: dict[str, int],
    ranks: dict[str, list[int]],
    s_expert: Mapping[str, list[float]],
    s_rank: Mapping[str, list[list[float]]],
    *,
    shapes: Mapping[str, tuple[int, int]],
    top_k: int,
    budget: int,
) -> None:
    """Drop the least likely choice (by `s_expert` / `s_rank`) until the allocation
    (`experts`, `ranks`, changed in place) fits `budget` parameters."""
    minimal = sum(module_parameters(shapes[n], top_k, [1] * top_k) for n in experts)
    if budget < minimal:
        raise ValueError(
            f"budget {budget:,} is smaller than the minimal allocation ({minimal:,} "
            f"parameters: {top_k} experts of rank 1 in each of {len(experts)} modules); "
            "raise the budget or adapt fewer modules"
        )
    current = sum(module_parameters(shapes[n], experts[n], ranks[n]) for n in experts)
    # (value, module, kind, expert index, the rank or count this entry would shrink)
    heap: list[tuple[float, str, str, int, int]] = []
    for name, n in experts.items():
        if n > top_k:
            heap.append((s_expert[name][n - 1], name, "expert", n - 1, n))
        heap += [
            (s_rank[name][j][r - 1], name, "rank", j, r) for j, r in enumerate(ranks[name]) if r > 1
        ]
    heapq.heapify(heap)
    while current > budget and heap:
        _, name, kind, j, was = heapq.heappop(heap)
        n = experts[name]
        if kind == "expert" and n != was or kind == "rank" and (j >= n or ranks[name][j] != was):
            continue  # stale: the choice it describes has changed
        before = module_parameters(shapes[name], n, ranks[name])
        if kind == "expert":
            experts[name] = n - 1
            ranks[name] = ranks[name][: n - 1]
            if n - 1 > top_k:
                heapq.heappush(heap, (s_expert[name][n - 2], name, "expert", n - 2, n - 1))
        else:
            ranks[name][j] = r = ranks[name][j] - 1
            if r > 1:
                heapq.heappush(heap, (s_rank[name][j][r - 1], name, "rank", j, r))
        current += module_parameters(shapes[name], experts[name], ranks[name]) - before
