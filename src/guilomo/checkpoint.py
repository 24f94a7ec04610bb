"""The checkpointer of SFT and the search: safetensors + JSON, no pickles, one folder.

`save_checkpoint` swaps the whole folder in, so an interrupted save leaves the previous
checkpoint. `optimizer_state` splits an optimiser state dict (parameters numbered in order,
as a single process has it; FSDP's gathered state is renumbered to match) into tensors and
JSON; `optimizer_state_dict` joins them again.
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
    folder: Path, *, documents: Mapping[str, Any], tensors: Mapping[str, Mapping[str, torch.Tensor]]
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


def optimizer_state(prefix: str, sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors `{prefix}.{param index}.{key}` and JSON `{"param_groups", "state_keys"}`."""
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    layout = {str(i): list(st) for i, st in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "state_keys": layout}


def optimizer_state_dict(
    prefix: str, tensors: Mapping[str, torch.Tensor], meta: dict
) -> dict[str, Any]:
    """The optimiser state dict that `optimizer_state` split."""
    state = {
        int(i): {k: tensors[f"{prefix}.{i}.{k}"] for k in keys}
        for i, keys in meta["state_keys"].items()
    }
    return {"state": state, "param_groups": meta["param_groups"]}
