"""The EvalReport artifact: `report.json` (accuracy, interval, per-question predictions,
...; see `guilomo.stages.evaluate`) and a summary of it as the manifest's metadata."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import ArtifactError, ArtifactWriter, read_artifact

KIND = "EvalReport"
FILE = "report.json"


def write_report(
    out: Path,
    report: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any],
    config: BaseModel,
    parents: Sequence[str] = (),
    extra: Callable[[Path], object] | None = None,
) -> Path:
    """Publish `report` at `out` (replacing an earlier report there); `extra(folder)` adds
    files (plots) to the payload."""
    with ArtifactWriter(
        out,
        kind=KIND,
        stage="evaluate",
        config=config,
        parents=parents,
        metadata=metadata,
        overwrite=True,
    ) as tmp:
        (tmp / FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        if extra is not None:
            extra(tmp)
    return Path(out)


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """The report.json of the EvalReport artifact at the local folder `path`, verified
    (manifest, kind, checksums) first; `ArtifactError` naming the path otherwise."""
    root = Path(path)
    manifest = read_artifact(root, kind=KIND)
    file = root / FILE
    if FILE not in manifest.files:
        raise ArtifactError(f"{root}: this EvalReport has no {FILE}")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{file}: not valid JSON: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("predictions"), list):
        raise ArtifactError(
            f"{file}: no 'predictions' list, so its questions cannot be paired; rerun "
            "`guilomo stage evaluate` to write one"
        )
    return report
