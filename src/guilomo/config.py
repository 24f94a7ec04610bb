"""The stages' typed configs, in one torch-free module (so `guilomo --help`, the run
config and the KFP components read them without importing the model code)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.formulations import Formulation
from .data.multiple_choice import MULTIPLE_CHOICE
from .data.split import DEFAULT_TRAIN_SHARE, DEFAULT_VALIDATION_SHARE
from .moe.config import Estimator, LossConfig, Placement, RouterConfig

DEFAULT_TEMPLATE = "alpaca"
M = TypeVar("M", bound=BaseModel)


class _Config(BaseModel):
    """A stage's config: unknown keys are errors, and a validated config does not change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


#: The stages' shared run-time fields.
Threads = Annotated[
    int | None,
    Field(
        ge=1,
        description="torch intra-op threads; default OMP_NUM_THREADS, else the CPUs this "
        "process may use (its affinity and cgroup quota).",
    ),
]
Checkpointing = Annotated[
    bool,
    Field(
        description="Recompute each decoder layer's activations in the backward (transformers' "
        "own, non-reentrant): less memory for more time. Search: first order only."
    ),
]


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`, or ValueError naming the file and what is wrong."""
    import yaml

    from .textfiles import read_text

    try:
        doc = yaml.safe_load(read_text(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a config file holds a mapping of option: value")
    return doc


def apply_overrides(doc: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """`key.sub=value` overrides (YAML values: `lr=1e-4`, `router.kind=soft`,
    `datasets=[sciq,arc_easy]`) set into a copy of `doc`; `-` in keys reads as `_`. The one
    override syntax of `guilomo stage` and `guilomo run`."""
    import copy

    import yaml

    doc = copy.deepcopy(doc)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"{item!r}: overrides are key=value, e.g. max_steps=10")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ValueError(f"{key}: {part} is not a section")
        node[leaf] = value
    return doc


def validated(model: type[M], doc: dict[str, Any], source: str = "") -> M:
    """`doc` as a `model`, or ValueError `source: where: what (got value)` from the first
    pydantic error (`source`: a file, or nothing)."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
    where = ".".join(str(x) for x in err["loc"])
    text = err["msg"].removeprefix("Value error, ")
    if err["type"] != "value_error":
        text += f" (got {err['input']!r})"
    text = f"{where}: {text}" if where else text
    raise ValueError(f"{source}: {text}" if source else text)


class PreprocessConfig(_Config):
    source: Literal["scienceqa", "instructions", "multiple_choice"] = Field(
        "multiple_choice", description="Kind of raw data."
    )
    path: str | None = Field(
        None,
        description="Raw data location (scienceqa, instructions; optional for multiple_choice).",
    )
    datasets: list[str] = Field(
        default_factory=lambda: ["sciq", "arc_easy"],
        description=f"multiple_choice sets to combine: {sorted(MULTIPLE_CHOICE)}.",
    )
    fields: dict[str, str] | None = Field(
        None, description="instructions: our field -> their column, e.g. instruction=prompt."
    )
    formulation: Formulation | None = Field(
        None,
        description="How questions are put to the model, in SFT and evaluation alike. rc: the "
        "lm-evaluation-harness prompt, each option's text scored by log-likelihood (default "
        "for multiple_choice); mc: lettered options, the letter scored; generate: the "
        "ScienceQA protocol, greedy decoding and 'The answer is X' (default for scienceqa and "
        "instructions).",
    )
    template: str | None = Field(
        None,
        description=f"Prompt template (name or JSON path) of the generate formulation "
        f"(default {DEFAULT_TEMPLATE}); rc and mc use the harness's prompts.",
    )
    train_size: int | None = Field(
        None,
        ge=1,
        description=f"Questions in train (default: {DEFAULT_TRAIN_SHARE:.0%} of unsplit data, or "
        "the source's whole train split).",
    )
    validation_size: int | None = Field(
        None,
        ge=1,
        description=f"Questions in validation, the search's held-out split (default: "
        f"{DEFAULT_VALIDATION_SHARE:.0%} of unsplit data or of the source's train split when it "
        "has no validation split).",
    )
    test_size: int | None = Field(
        None,
        ge=1,
        description="Cap on the test split (default: every question not in train or validation).",
    )
    seed: int = Field(0, description="Seed of the split and of the caps.")

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
        return self.formulation or ("rc" if self.source == "multiple_choice" else "generate")


class SearchConfig(_Config):
    """Search hyper-parameters; defaults are the method's (ALGORITHM.md section 4)."""

    base_model: str = Field("smollm2-135m", description="Model folder, hub id or smollm2-135m.")
    cutoff: int = Field(256, ge=8, description="Max tokens per example.")
    batch_size: int = Field(16, ge=1, description="Examples per train and per val batch.")
    max_experts: int = Field(8, ge=1, description="N_max: experts per module searched over.")
    max_rank: int = Field(8, ge=1, description="R_max: rank per expert searched over.")
    top_k: int = Field(2, ge=1, description="Experts per token; the minimum expert count.")
    placement: Literal["all", "mlp"] = Field(
        "all",
        description="Projections searched: all (MoLA) or mlp (LoRAMoE); mixlora's shared "
        "MLP experts are not searched.",
    )
    order: Literal["first", "second"] = Field("first", description="DARTS order.")
    estimator: Estimator = Field(
        "expected",
        description="How GSVs become counts: expected (GSVs are logits of distributions over "
        "counts; the layer uses expectations) or reference (the paper's argmax masks with a "
        "straight-through gradient, N(0, 0.02) LoRA init).",
    )
    tau: float = Field(0.1, gt=0, description="expected: softmax temperature of the GSV logits.")
    size_penalty: float = Field(
        0.01,
        ge=0,
        description="expected, no target: weight lambda of E[params] / P_max in the GSV loss.",
    )
    penalty_ramp: float = Field(
        0.6,
        gt=0,
        le=1,
        description="Share of the steps over which the size penalty ramps up from 0.",
    )
    target_params: int | None = Field(
        None,
        ge=1,
        description="expected: steer the search to this many trainable parameters "
        "(a Lagrange multiplier replaces size_penalty).",
    )
    target_like: str | None = Field(
        None,
        description="expected: target the parameters of a MoLA preset on this model, e.g. "
        "uniform:5 (5 experts of rank 8), uniform:8x4, 2468, 8642.",
    )
    steps: int = Field(100, ge=1, description="Bilevel steps (one train + one val batch each).")
    gsv_start: int = Field(0, ge=0, description="Steps of LoRA weights only before the GSVs move.")
    lora_lr: float = Field(3e-4, gt=0, description="AdamW LR of the LoRA weights and routers.")
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warm-up of the LoRA LR (default: 10% of steps)."
    )
    gsv_lr: float = Field(3e-3, gt=0, description="AdamW LR of the GSVs.")
    gsv_decay: float = Field(
        0.3,
        ge=0,
        lt=1,
        description="Share of the last steps over which the GSV LR decays linearly to 0, "
        "so the selection (and a parameter target) settles.",
    )
    gsv_betas: tuple[float, float] = Field((0.5, 0.999), description="AdamW betas of the GSVs.")
    balance_coef: float = Field(0.001, ge=0, description="Balance-loss weight at both levels.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Expert-input dropout.")
    seed: int = Field(0, description="Seeds GSV init, data order and dropout.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    history_every: int = Field(1, ge=1, description="Steps between GSV history rows.")
    gradient_checkpointing: Checkpointing = False
    threads: Threads = None

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if self.top_k > self.max_experts:
            raise ValueError(
                f"top_k ({self.top_k}) is larger than max_experts ({self.max_experts})"
            )
        if self.target_params is not None and self.target_like is not None:
            raise ValueError("give target_params (--target-params) or target_like, not both")
        if self.estimator == "reference" and self.targeted:
            raise ValueError(
                "a parameter target needs estimator 'expected' (the reference rule has no "
                "differentiable size); drop --target-params / --target-like or the estimator"
            )
        if self.warmup_steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) is not below steps ({self.steps}): the "
                "LoRA learning rate would never leave its warm-up; lower --warmup-steps"
            )
        if self.gradient_checkpointing and self.order == "second":
            raise ValueError(
                "gradient_checkpointing supports order 'first' only: the second order's "
                "virtual weights are gone when the backward recomputes; drop one of the two"
            )
        if self.gsv_start >= self.steps:
            raise ValueError(
                f"gsv_start ({self.gsv_start}) is not below steps ({self.steps}): the GSVs "
                "would never move; lower --gsv-start"
            )
        return self

    @property
    def targeted(self) -> bool:
        return self.target_params is not None or self.target_like is not None

    @property
    def warmup(self) -> int:
        return self.steps // 10 if self.warmup_steps is None else self.warmup_steps


class AllocateConfig(_Config):
    """Where the allocation comes from: a search state, a MoLA preset, or the reference's JSON."""

    base_model: str = Field("smollm2-135m", description="Base model (for module names and shapes).")
    preset: str | list[int] | None = Field(
        None,
        description="MoLA preset instead of a search: uniform, 2468, 8642, or experts per "
        "layer as a list ([2,4,6,8] on the command line).",
    )
    experts: int = Field(4, ge=1, description="preset uniform: experts per module.")
    top_k: int = Field(2, ge=1, description="preset / reference import: top-k.")
    rank: int = Field(8, ge=1, description="preset: rank of every expert.")
    placement: Placement = Field("all", description="preset: all, mlp or mixlora.")
    budget: int | None = Field(None, ge=1, description="search: max trainable parameters.")
    budget_like: str | None = Field(
        None,
        description="search: the budget is the parameter count of a MoLA preset on the "
        "searched modules, e.g. uniform:5 (5 experts of rank 8), uniform:8x4, 2468, 8642.",
    )
    reference_expert: str | None = Field(
        None, description="The reference code's expert.json (with reference_rank)."
    )
    reference_rank: str | None = Field(
        None, description="The reference code's rank.json (with reference_expert)."
    )

    @field_validator("preset", mode="before")
    @classmethod
    def _preset_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) else value  # YAML reads 2468 as a number

    def contradicts(self, search: dict) -> str | None:
        """A message when this config sets a top_k or placement that differs from the
        search's (`search`: its config), which a searched allocation takes instead."""
        for key in ("top_k", "placement"):
            if key in self.model_fields_set and getattr(self, key) != search.get(key):
                return (
                    f"allocate.{key} is {getattr(self, key)!r}, but a searched allocation takes "
                    f"its {key} from the search ({search.get(key)!r}): set search.{key}, or "
                    f"drop allocate.{key}"
                )
        return None

    @model_validator(mode="after")
    def _check(self) -> AllocateConfig:
        if (self.reference_expert is None) != (self.reference_rank is None):
            raise ValueError("reference_expert and reference_rank go together")
        if self.preset is not None and self.reference_expert is not None:
            raise ValueError("give preset or reference_expert / reference_rank, not both")
        if self.budget is not None and self.budget_like is not None:
            raise ValueError("give budget or budget_like, not both")
        return self


class SftConfig(_Config):
    """SFT hyper-parameters. Defaults follow the method's ScienceQA recipe where it has one."""

    base_model: str = Field("smollm2-135m", description="Model folder, hub id or smollm2-135m.")
    cutoff: int = Field(256, ge=8, description="Max tokens per example (prompt + answer).")
    train_on_inputs: bool = Field(True, description="Also learn the prompt tokens.")
    epochs: float = Field(1.0, gt=0, description="Passes over the train split.")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps; overrides epochs.")
    batch_size: int = Field(16, ge=1, description="Examples per optimiser step (all processes).")
    micro_batch_size: int = Field(4, ge=1, description="Examples per forward pass.")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate (linear warm-up and decay).")
    warmup_steps: int = Field(
        100, ge=0, description="Warm-up steps (capped at a tenth of the run)."
    )
    lora_alpha: float = Field(16.0, gt=0, description="Expert scaling alpha / r_e.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on expert inputs.")
    router: RouterConfig = RouterConfig()
    losses: LossConfig = LossConfig()
    group_by_length: bool = Field(True, description="Batch examples of similar length.")
    seed: int = Field(0, description="Seeds adapter init, data order and dropout.")
    checkpoint_every: int = Field(50, ge=1, description="Optimiser steps between checkpoints.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU."
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp, every process holds the whole model and the adapter "
        "gradients are averaged; fsdp, base and adapter parameters are sharded over the "
        "processes (PyTorch FSDP2) for bases that do not fit one GPU. Same result and "
        "checkpoints either way; ignored for one process.",
    )
    gradient_checkpointing: Checkpointing = False
    threads: Threads = None

    @model_validator(mode="after")
    def _check(self) -> SftConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self


class EvalConfig(_Config):
    """Evaluation settings. The formulation is the dataset's (chosen in preprocess)."""

    split: Literal["train", "validation", "test"] = Field(
        "test", description="The PreparedDataset split to evaluate."
    )
    max_new_tokens: int = Field(
        16, ge=1, description="Tokens generated per prompt (generate formulation)."
    )
    batch_size: int = Field(
        16,
        ge=1,
        description="Prompts per forward pass: questions (rc, mc: their options then run, as "
        "many per pass, against the questions' cached context) or generations.",
    )
    limit: int | None = Field(
        None, ge=1, description="Evaluate only the first N records of the split."
    )
    base_model: str = Field("smollm2-135m", description="Model folder, hub id or smollm2-135m.")
    threads: Threads = None
