"""The PreparedDataset artifact: `train.jsonl`, `validation.jsonl`, `test.jsonl`, `report.json`.

Records are the readers' dicts put into one formulation (`guilomo.data.formulations`):
each has `prompt` and `output`, the text SFT trains on; `rc` / `mc` records also have the
`choices` evaluation scores. The manifest's metadata holds the split sizes and `info`:
the formulation, and for `generate` the template's name and response marker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.split import SPLITS
from . import ArtifactError, ArtifactWriter, read_artifact

KIND = "PreparedDataset"


def write_prepared(
    out: Path,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    report: Mapping[str, Any],
    info: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    parents: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    meta = {"counts": {name: len(splits.get(name, ())) for name in SPLITS}, **info}
    with ArtifactWriter(
        out,
        kind=KIND,
        stage="preprocess",
        config=config,
        parents=parents,
        metadata=meta,
        overwrite=overwrite,
    ) as tmp:
        for name in SPLITS:
            rows = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in splits.get(name, ())]
            (tmp / f"{name}.jsonl").write_text("".join(row + "\n" for row in rows))
        (tmp / "report.json").write_text(json.dumps(dict(report), indent=2, sort_keys=True) + "\n")
    return out


def dataset_info(dataset: Path) -> dict[str, Any]:
    """The formulation of a verified PreparedDataset (and, for generate, its template's name
    and response marker)."""
    meta = read_artifact(dataset, kind=KIND).metadata
    if "formulation" not in meta:
        raise ArtifactError(
            f"{dataset}: a PreparedDataset from before formulations (rc / mc / generate) were "
            "recorded; rerun preprocess"
        )
    return {k: v for k, v in meta.items() if k != "counts"}


def read_split(dataset: Path, split: str) -> list[dict[str, Any]]:
    """The records of one split of a verified PreparedDataset; an empty split is an error."""
    dataset_info(dataset)
    if split not in SPLITS:
        raise ArtifactError(f"{dataset}: unknown split {split!r}; splits are {list(SPLITS)}")
    path = Path(dataset) / f"{split}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ArtifactError(
            f"{path}: the {split} split is empty; rerun preprocess with a larger split"
        )
    return records
