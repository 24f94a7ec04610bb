"""The checkpointer of SFT and the search: safetensors + JSON, no pickles, one folder.

`save_checkpoint(folder, documents=..., tensors=...)` writes the JSON documents and the
safetensors files into a temporary sibling folder and swaps it in whole, so an interrupted
save leaves the previous checkpoint. `optimizer_state(prefix, opt)` splits an optimiser's state dict into
tensors and plain JSON (param groups and the key layout); `load_optimizer_state` puts them
back. Both also work on a plain state dict in the optimiser's own layout (parameters
numbered in order), so a state gathered from FSDP shards is written and read in the same
format as a single process's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .folders import replace_folder


def save_checkpoint(
    folder: Path,
    *,
    documents: Mapping[str, Any],
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
) -> None:
    """Make `folder` hold exactly these files: file name -> JSON document, and file name ->
    tensors (a safetensors file), written into a sibling folder first and swapped in whole."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, part in tensors.items():
        save_file({k: v.contiguous().cpu() for k, v in part.items()}, str(tmp / name))
    for name, doc in documents.items():
        (tmp / name).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    replace_folder(tmp, folder)


def optimizer_state(
    prefix: str, opt: torch.optim.Optimizer | Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors `{prefix}.{param index}.{key}` and JSON `{"param_groups", "state_keys"}` of an
    optimiser, or of a state dict `{"state": {index: {...}}, "param_groups": [...]}`."""
    sd = opt.state_dict() if isinstance(opt, torch.optim.Optimizer) else opt
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    layout = {str(i): list(st) for i, st in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "state_keys": layout}


def optimizer_state_dict(
    prefix: str, tensors: Mapping[str, torch.Tensor], meta: dict
) -> dict[str, Any]:
    """The optimiser state dict that `optimizer_state` split (parameters numbered in order)."""
    state = {
        int(i): {k: tensors[f"{prefix}.{i}.{k}"] for k in keys}
        for i, keys in meta["state_keys"].items()
    }
    return {"state": state, "param_groups": meta["param_groups"]}


def load_optimizer_state(
    prefix: str, opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict
) -> None:
    opt.load_state_dict(optimizer_state_dict(prefix, tensors, meta))
