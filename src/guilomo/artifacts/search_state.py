"""The SearchState artifact's payload: one JSON document and one safetensors file.

The JSON (`search_state.json`) holds the config, the step, the module names and shapes,
the loss log, the router load, the optimisers' and scheduler's states and the size target;
the tensors (`search_state.safetensors`) hold, per module NAME, ``gsv.NAME.expert`` and
``gsv.NAME.rank``, the LoRA weights ``w.*``, the optimisers' tensors and the GSV history
``history.step`` / ``history.expert`` / ``history.rank`` (steps x modules x ...).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors.torch import load_file

from ..checkpoint import save_checkpoint

KIND = "SearchState"  # the manifest kind
STATE_JSON = "search_state.json"
STATE_TENSORS = "search_state.safetensors"
DOC_KIND = "guilomo-search-state"


class SearchStateError(ValueError):
    """A search state that cannot be read, or does not fit the model or config."""


def gsv_key(module: str, part: str) -> str:  # part: "expert" or "rank"
    return f"gsv.{module}.{part}"


def gsvs(doc: Mapping, tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """Module name -> (expert GSV, rank GSV), in the state's module order."""
    return {n: (tensors[gsv_key(n, "expert")], tensors[gsv_key(n, "rank")]) for n in doc["modules"]}


def write_state(out_dir: Path, doc: Mapping, tensors: Mapping[str, torch.Tensor]) -> None:
    """Make `out_dir` a search state folder (swapped in whole: see `save_checkpoint`)."""
    documents = {STATE_JSON: {"kind": DOC_KIND, **doc}}
    save_checkpoint(Path(out_dir), documents=documents, tensors={STATE_TENSORS: tensors})


def publish_state(
    out: Path,
    state_dir: Path,
    *,
    config: BaseModel,
    parents: Sequence[str],
    metadata: Mapping,
    extra: Callable[[Path], object] | None = None,
) -> None:
    """Publish the state in `state_dir` (the search's checkpoint folder) as a SearchState
    artifact at `out`; `extra(folder)` may add files (figures) before it is."""
    from . import ArtifactWriter

    with ArtifactWriter(
        out,
        kind=KIND,
        stage="search",
        config=config,
        parents=parents,
        metadata=dict(metadata),
        overwrite=True,
    ) as tmp:
        for name in (STATE_JSON, STATE_TENSORS):
            (tmp / name).write_bytes((Path(state_dir) / name).read_bytes())
        if extra is not None:
            extra(tmp)


def read_state(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON and tensors of a search state folder, or a `SearchStateError` saying what is wrong."""
    path = Path(out_dir) / STATE_JSON
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SearchStateError(f"{path}: not found; is {out_dir} the output of a search?") from None
    except json.JSONDecodeError as exc:
        raise SearchStateError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if doc.get("kind") != DOC_KIND:
        raise SearchStateError(f"{path}: not a guilomo search state")
    try:
        tensors = load_file(str(Path(out_dir) / STATE_TENSORS))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise SearchStateError(f"{Path(out_dir) / STATE_TENSORS}: unreadable ({exc})") from None
    return doc, tensors


def check_state_fits(
    doc: dict, where: Path, *, base_model: str | None, shapes: Mapping[str, tuple[int, int]]
) -> None:
    """Refuse GSV state searched on another model (module names or shapes differ)."""
    theirs = {n: tuple(s) for n, s in doc["shapes"].items()}
    mine = {n: tuple(s) for n, s in shapes.items()}
    if theirs != mine:
        missing = sorted(set(mine) - set(theirs))[:3]
        extra = sorted(set(theirs) - set(mine))[:3]
        diff = [n for n in mine if n in theirs and mine[n] != theirs[n]][:3]
        raise SearchStateError(
            f"{where}: the GSV state was searched on another model ({doc.get('base_model')}): "
            f"modules missing from it {missing}, not in this model {extra}, other shapes {diff}"
        )
    if base_model is not None and doc.get("base_model") != base_model:
        raise SearchStateError(
            f"{where}: searched on base model {doc.get('base_model')!r}, this run uses {base_model!r}"
        )
