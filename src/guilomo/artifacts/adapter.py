"""The Adapter artifact: the LoRA-MoE adapter's own files (`adapter_config.json`,
`adapter_model.safetensors`, see `guilomo.moe.model.MoeAdapter.save`) and the SFT loss log
`train_log.json`; the metadata holds steps, final loss, trainable parameters and
throughput."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import ArtifactWriter, Manifest, read_artifact

KIND = "Adapter"
LOG_FILE = "train_log.json"


def write_adapter(
    out: Path,
    save: Callable[[Path], object],
    *,
    losses: Sequence[float],
    metadata: Mapping[str, Any],
    config: BaseModel,
    parents: Sequence[str] = (),
) -> Path:
    """Publish at `out` (replacing an earlier adapter there) what `save(folder)` writes,
    with the loss log."""
    with ArtifactWriter(
        out,
        kind=KIND,
        stage="sft",
        config=config,
        parents=parents,
        metadata=metadata,
        overwrite=True,
    ) as tmp:
        save(tmp)
        (tmp / LOG_FILE).write_text(json.dumps({"losses": list(losses)}, indent=1) + "\n")
    return Path(out)


def check_adapter(path: Path) -> Manifest:
    """The manifest of a verified Adapter folder (an `ArtifactError` otherwise)."""
    return read_artifact(Path(path), kind=KIND)
