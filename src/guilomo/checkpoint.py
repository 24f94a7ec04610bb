"""Training state to safetensors + JSON: optimiser, LR schedule and RNG, no pickles.

`optimizer_state(prefix, opt)` splits an optimiser's state dict into tensors (for a
safetensors file) and plain JSON (param groups and the key layout); `load_optimizer_state`
puts them back. Used by the search and SFT checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def optimizer_state(
    prefix: str, opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    layout = {str(i): list(st) for i, st in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "state_keys": layout}


def load_optimizer_state(
    prefix: str, opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict
) -> None:
    state = {
        int(i): {k: tensors[f"{prefix}.{i}.{k}"] for k in keys}
        for i, keys in meta["state_keys"].items()
    }
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
