"""The LoRA-MoE library: model math only (no I/O beyond adapter files, no tracking, no KFP)."""

from .config import (
    ALL_PROJECTIONS,
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    Allocation,
    LossConfig,
    ModuleAllocation,
    MoeConfig,
    RouterConfig,
    build_allocation,
    preset_experts,
)
from .layer import LoraMoeLinear, MixLoraMlp, RoutingState
from .losses import aux_loss, balance_loss, localized_balance_loss, z_loss
from .model import AdapterError, MoeAdapter, inject_adapter, load_adapter
from .routing import Router, Routing

__all__ = [
    "ALL_PROJECTIONS",
    "ATTENTION_PROJECTIONS",
    "MLP_PROJECTIONS",
    "AdapterError",
    "Allocation",
    "LoraMoeLinear",
    "LossConfig",
    "MixLoraMlp",
    "ModuleAllocation",
    "MoeAdapter",
    "MoeConfig",
    "Router",
    "RouterConfig",
    "Routing",
    "RoutingState",
    "aux_loss",
    "balance_loss",
    "build_allocation",
    "inject_adapter",
    "load_adapter",
    "localized_balance_loss",
    "preset_experts",
    "z_loss",
]
