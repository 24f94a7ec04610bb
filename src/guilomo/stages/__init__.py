"""The five pipeline stages, each one `Stage`, in `STAGES`. The registry is torch-free: a
stage's module is imported only when it runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..config import AllocateConfig, EvalConfig, PreprocessConfig, SearchConfig, SftConfig

#: `on_step(step, metrics)`: the steps done so far (1-based) and that step's metrics.
StepHook = Callable[[int, dict[str, float]], None]
Metrics = dict[str, float]
if TYPE_CHECKING:  # the artifacts' manifest models are not needed for `--help`
    from ..artifacts import ArtifactKind


@dataclass(frozen=True)
class Input:
    """An artifact a stage reads: its name (also the upstream stage's output name), kind,
    and the name the run goes by when an optional input is absent (`preset`: an allocation
    without a search; `evaluate-base`: an evaluation without an adapter)."""

    name: str
    kind: ArtifactKind
    absent_name: str | None = None  # None: required
    note: str = ""  # for its --help

    @property
    def required(self) -> bool:
        return self.absent_name is None

    @property
    def help(self) -> str:
        return f"{self.kind}: folder or s3:// URI" + (f" ({self.note})" if self.note else "")


@dataclass
class Context:
    """What a stage gets besides its config and inputs. `say` prints its one-line summary;
    `tags` collects the run tags it wants recorded (e.g. the formulation)."""

    parents: Sequence[str] = ()  # the inputs' URIs, for the manifest
    checkpoints: Path | None = None  # local checkpoint folder (resumed from)
    checkpoint_uri: str | None = None  # a store URI the folder mirrors
    progress: bool = True
    on_step: StepHook | None = None
    overwrite: bool = False
    say: Callable[[str], None] = print
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, object] = field(default_factory=dict)  # run params found at run time

    def training(self) -> dict[str, Any]:
        """The keyword arguments of a training stage's `run_*` (search, SFT)."""
        keys = ("checkpoints", "checkpoint_uri", "parents", "progress", "on_step")
        return {k: getattr(self, k) for k in keys}


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[BaseModel]
    inputs: tuple[Input, ...]
    output: tuple[str, ArtifactKind]  # (name, kind)
    help: str
    gpu: bool = False
    checkpointed: bool = False  # checkpoints as it goes, resumes, runs under torchrun
    replaces: bool = False  # rewrites an existing output (it resumes, so a rerun is the same)

    def run(
        self, config: BaseModel, inputs: Mapping[str, Path | None], out: Path, context: Context
    ) -> Metrics:
        if "threads" in type(config).model_fields:  # the stages that run torch work
            from ..threads import configure_threads

            context.params.update(configure_threads(config.threads))
        return self._module().run(config, dict(inputs), Path(out), context)

    def planned_steps(self, config: BaseModel, inputs: Mapping[str, Path | None]) -> int | None:
        """How many steps a run will take (for progress lines), if the stage counts steps."""
        plan = getattr(self._module(), "planned_steps", None)
        return None if plan is None else plan(config, dict(inputs))

    def _module(self) -> Any:
        return import_module(f"{__name__}.{self.name}")

    def run_name(self, inputs: Mapping[str, Any]) -> str:
        """`preset` / `evaluate-base` when that optional input is absent, else the name."""
        for i in self.inputs:
            if not i.required and inputs.get(i.name) is None:
                return i.absent_name
        return self.name


_DATASET = Input("dataset", "PreparedDataset")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "preprocess",
            PreprocessConfig,
            (),
            ("dataset", "PreparedDataset"),
            "Read raw data (ScienceQA, instruction data, multiple-choice sets), split it seeded "
            "into train / validation / test, and write a PreparedDataset.",
        ),
        Stage(
            "search",
            SearchConfig,
            (_DATASET,),
            ("state", "SearchState"),
            "Bilevel GSV search: LoRA weights on the train split, GSVs on the validation split; "
            "checkpoints as it goes and resumes; runs under torchrun for several GPUs (each "
            "process takes its rows of every batch); writes a SearchState with GSV plots.",
            gpu=True,
            checkpointed=True,
            replaces=True,
        ),
        Stage(
            "allocate",
            AllocateConfig,
            (Input("state", "SearchState", "preset"),),
            ("allocation", "Allocation"),
            "Turn a SearchState (optionally under a parameter budget), a MoLA preset, or the "
            "reference code's expert.json / rank.json into an Allocation with heatmaps.",
        ),
        Stage(
            "sft",
            SftConfig,
            (_DATASET, Input("allocation", "Allocation")),
            ("adapter", "Adapter"),
            "Train a LoRA-MoE built from an Allocation on a PreparedDataset; checkpoints every N "
            "steps and resumes; runs under torchrun for several GPUs (DDP, or FSDP with "
            "parallel=fsdp for bases too large for one GPU). Writes an Adapter.",
            gpu=True,
            checkpointed=True,
            replaces=True,
        ),
        Stage(
            "evaluate",
            EvalConfig,
            (_DATASET, Input("adapter", "Adapter", "evaluate-base", "omit for the base model")),
            ("report", "EvalReport"),
            "Evaluate the base model, or the base plus an Adapter, on a split, in the "
            "dataset's formulation (rc / mc: each option scored by log-likelihood, as "
            "lm-evaluation-harness does; generate: greedy decoding and 'The answer is X'). "
            "Reports every accuracy with its N and 95% Wilson interval, the predicted answers "
            "and the majority-answer baseline. Writes an EvalReport.",
            gpu=True,
            replaces=True,
        ),
    )
}
