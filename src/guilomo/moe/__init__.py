"""The LoRA-MoE library: model math only (no I/O beyond adapter files, no tracking, no KFP).

Names load on first use (PEP 562), so `guilomo.moe.config` is importable without torch.
"""

from importlib import import_module

_WHERE = {
    "ALL_PROJECTIONS": "config",
    "ATTENTION_PROJECTIONS": "config",
    "MLP_PROJECTIONS": "config",
    "Allocation": "config",
    "LossConfig": "config",
    "ModuleAllocation": "config",
    "MoeConfig": "config",
    "RouterConfig": "config",
    "build_allocation": "config",
    "preset_experts": "config",
    "LoraMoeLinear": "layer",
    "MixLoraMlp": "layer",
    "RoutingState": "layer",
    "aux_loss": "losses",
    "balance_loss": "losses",
    "localized_balance_loss": "losses",
    "z_loss": "losses",
    "AdapterError": "model",
    "MoeAdapter": "model",
    "inject_adapter": "model",
    "load_adapter": "model",
    "Router": "routing",
    "Routing": "routing",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
