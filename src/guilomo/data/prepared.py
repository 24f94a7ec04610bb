"""The PreparedDataset artifact: `train.jsonl`, `validation.jsonl`, `test.jsonl`, `report.json`.

Records are the instruction / input / output / answer dicts of the readers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..artifacts import ArtifactError, ArtifactWriter, read_artifact

SPLITS = ("train", "validation", "test")


def write_prepared(
    out: Path,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    report: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    parents: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    counts = {name: len(splits.get(name, ())) for name in SPLITS}
    with ArtifactWriter(
        out,
        kind="PreparedDataset",
        stage="preprocess",
        config=config,
        parents=parents,
        metadata={"counts": counts},
        overwrite=overwrite,
    ) as tmp:
        for name in SPLITS:
            with open(tmp / f"{name}.jsonl", "w") as f:
                for rec in splits.get(name, ()):
                    f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
        (tmp / "report.json").write_text(json.dumps(dict(report), indent=2, sort_keys=True) + "\n")
    return out


def read_split(dataset: Path, split: str) -> list[dict[str, Any]]:
    """The records of one split of a verified PreparedDataset; an empty split is an error."""
    read_artifact(dataset, kind="PreparedDataset")
    if split not in SPLITS:
        raise ArtifactError(f"{dataset}: unknown split {split!r}; splits are {list(SPLITS)}")
    path = Path(dataset) / f"{split}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ArtifactError(
            f"{path}: the {split} split is empty; rerun preprocess with a larger split"
        )
    return records
