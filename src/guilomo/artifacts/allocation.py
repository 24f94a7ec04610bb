"""The Allocation artifact: `allocation.json` (a `guilomo.moe.config.Allocation`), plus
whatever figures the writer adds; its metadata summarises the counts and the trainable
parameters (None when the module shapes were not known)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel

from ..moe.config import Allocation
from . import ArtifactWriter, read_artifact

KIND = "Allocation"
FILE = "allocation.json"


def write_allocation(
    out: Path,
    alloc: Allocation,
    *,
    parameters: int | None,
    config: BaseModel,
    parents: Sequence[str] = (),
    overwrite: bool = False,
    extra: Callable[[Path], object] | None = None,
) -> Path:
    """Publish `alloc` at `out`; `extra(folder)` may add files (figures) before it is."""
    meta = {**alloc.summary(), "trainable_parameters": parameters}
    with ArtifactWriter(
        out,
        kind=KIND,
        stage="allocate",
        config=config,
        parents=parents,
        metadata=meta,
        overwrite=overwrite,
    ) as tmp:
        (tmp / FILE).write_text(alloc.model_dump_json(indent=2) + "\n")
        if extra is not None:
            extra(tmp)
    return Path(out)


def read_allocation(path: Path) -> Allocation:
    """The Allocation of a verified artifact folder."""
    read_artifact(path, kind=KIND)
    return Allocation.model_validate_json((Path(path) / FILE).read_text())
