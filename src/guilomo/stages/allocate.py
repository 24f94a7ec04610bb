"""Allocate stage: a SearchState's GSVs (`guilomo.moe.search.extract_allocation`), a preset
or the reference code's JSON files -> an Allocation, with errors that name file and fix."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..artifacts.allocation import write_allocation
from ..config import AllocateConfig
from ..moe.config import (
    ALL_PROJECTIONS,
    Allocation,
    ModuleAllocation,
    build_allocation,
    check_top_k,
)
from ..moe.search import allocation_parameters, extract_allocation, preset_parameters
from ..textfiles import read_text
from . import Context, Metrics

_PREFIX = "base_model.model."  # PEFT-style wrapping in the reference's module names
_RANK_KEY = re.compile(r"^(?P<module>.+)\.expertlora_E_vector_(?P<j>\d+)$")


class AllocationInputError(ValueError):
    """Bad allocation input; the message names the file and what to change."""


def _read_json_object(path: Path) -> dict:
    try:
        doc = json.loads(read_text(path, error=AllocationInputError))
    except FileNotFoundError:
        raise AllocationInputError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise AllocationInputError(
            f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    if not isinstance(doc, dict):
        raise AllocationInputError(f"{path}: expected a JSON object mapping names to integers")
    return doc


def import_reference_json(
    expert_json: Path,
    rank_json: Path,
    *,
    base_model: str,
    module_names: Sequence[str],
    top_k: int,
) -> Allocation:
    """Read the reference's `expert.json` (module -> experts) and `rank.json`
    (`<module>.expertlora_E_vector_<j>` -> rank) for a model whose adapted modules are
    `module_names`."""
    experts = {k.removeprefix(_PREFIX): v for k, v in _read_json_object(expert_json).items()}
    ranks_raw = _read_json_object(rank_json)
    if len(experts) != len(module_names):
        raise AllocationInputError(
            f"{expert_json}: {len(experts)} modules, the model has {len(module_names)} adapted "
            "modules: the files are for another model or placement"
        )
    if unknown := sorted(set(experts) - set(module_names)):
        raise AllocationInputError(f"{expert_json}: modules not in the model: {unknown[:3]}")
    ranks: dict[tuple[str, int], int] = {}
    for key, value in ranks_raw.items():
        if not (m := _RANK_KEY.match(key.removeprefix(_PREFIX))):
            raise AllocationInputError(
                f"{rank_json}: key {key!r} is not '<module>.expertlora_E_vector_<j>'"
            )
        ranks[(m["module"], int(m["j"]))] = value
    for name in module_names:
        if not isinstance(n := experts[name], int) or n < 1:
            raise AllocationInputError(
                f"{expert_json}: {name}: expert count must be an integer >= 1, got {n!r}"
            )
    try:
        check_top_k(top_k, {m: experts[m] for m in module_names}, more="give it more experts")
    except ValueError as exc:
        raise AllocationInputError(f"{expert_json}: {exc}") from None
    modules = {}
    for name in module_names:
        if missing := [j for j in range(experts[name]) if (name, j) not in ranks]:
            raise AllocationInputError(
                f"{rank_json}: no rank for {name}.expertlora_E_vector_{missing[0]}"
            )
        rs = [ranks[(name, j)] for j in range(experts[name])]
        try:
            modules[name] = ModuleAllocation(experts=experts[name], top_k=top_k, ranks=rs)
        except ValueError as exc:
            raise AllocationInputError(f"{rank_json}: {name}: {exc}") from None
    return Allocation(base_model=base_model, modules=modules)


def allocation_from_state(
    state_dir: Path,
    *,
    budget: int | None = None,
    module_shapes: dict[str, tuple[int, int]] | None = None,
) -> tuple[Allocation, int]:
    """The allocation a search state selects and its trainable-parameter count; with
    `module_shapes` (the target model's adapted modules), one searched on another is refused."""
    from ..artifacts.search_state import check_state_fits, gsvs, read_state

    doc, tensors = read_state(Path(state_dir))
    shapes = {n: tuple(s) for n, s in doc["shapes"].items()}
    if module_shapes is not None:
        check_state_fits(doc, Path(state_dir), base_model=None, shapes=module_shapes)
    try:
        alloc = extract_allocation(
            gsvs(doc, tensors),
            base_model=doc["base_model"],
            top_k=doc["config"]["top_k"],
            shapes=shapes,
            budget=budget,
            # states from before the estimator choice used the reference's argmax rule
            estimator=doc["config"].get("estimator", "reference"),
            tau=doc["config"].get("tau", 1.0),
        )
    except ValueError as exc:
        raise AllocationInputError(f"{state_dir}: {exc}") from None
    return alloc, allocation_parameters(alloc, shapes)


def model_modules(base_model: str) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Module names and linear shapes of a base model, built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import resolve_model

    cfg = AutoConfig.from_pretrained(resolve_model(base_model))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    modules = dict(model.named_modules())
    linear = {n: m for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    return list(modules), {n: (m.in_features, m.out_features) for n, m in linear.items()}


def _from_state(config: AllocateConfig, search: Path) -> tuple[Allocation, int]:
    """The allocation a SearchState selects (under the budget, if any), and its parameters."""
    from ..artifacts import read_artifact
    from ..artifacts.search_state import KIND as SEARCH_STATE
    from ..artifacts.search_state import read_state

    read_artifact(search, kind=SEARCH_STATE)
    doc, _ = read_state(search)
    if problem := config.contradicts({"placement": "all"} | doc["config"]):
        raise AllocationInputError(problem.replace("search.", "the search's "))
    budget = config.budget
    if config.budget_like is not None:
        try:
            budget = preset_parameters(
                config.budget_like,
                {n: tuple(s) for n, s in doc["shapes"].items()},
                top_k=doc["config"]["top_k"],
                placement=doc["config"].get("placement", "all"),
            )
        except ValueError as exc:
            raise AllocationInputError(f"budget_like (--budget-like): {exc}") from None
    return allocation_from_state(search, budget=budget)


def _hand_made(
    config: AllocateConfig, reference: tuple[Path, Path] | None
) -> tuple[Allocation, int | None]:
    """The MoLA preset, or the reference code's expert.json / rank.json, on the base model's
    modules; its parameter count when every module is a linear layer."""
    names, linear = model_modules(config.base_model)
    if config.preset is not None:
        alloc = build_allocation(
            base_model=config.base_model,
            module_names=names,
            preset=config.preset,
            experts=config.experts,
            top_k=config.top_k,
            rank=config.rank,
            placement=config.placement,
        )
    else:
        targets = [n for n in names if n.rsplit(".", 1)[-1] in ALL_PROJECTIONS and n in linear]
        alloc = import_reference_json(
            *reference, base_model=config.base_model, module_names=targets, top_k=config.top_k
        )
    linear_only = all(n in linear for n in alloc.modules)
    return alloc, allocation_parameters(alloc, linear) if linear_only else None


def run_allocate(
    config: AllocateConfig,
    out: Path,
    *,
    search: Path | None = None,
    reference: tuple[Path, Path] | None = None,
    overwrite: bool = False,
    parents: Sequence[str] | None = None,
) -> tuple[Allocation, int | None]:
    """Exactly one source: `search` (a SearchState artifact), `config.preset`, or `reference`.
    `parents`: the inputs' URIs for the manifest (default: the local paths given)."""
    from ..plots import allocation_heatmaps

    if sum(s is not None for s in (search, config.preset, reference)) != 1:
        raise AllocationInputError(
            "give exactly one of --search, --preset or --reference-expert/--reference-rank"
        )
    if search is None and (config.budget is not None or config.budget_like is not None):
        raise AllocationInputError("--budget and --budget-like apply to --search only")
    alloc, params = _from_state(config, search) if search else _hand_made(config, reference)
    found = [str(search)] if search else [str(p) for p in reference or ()]
    write_allocation(
        out,
        alloc,
        parameters=params,
        config=config,
        parents=found if parents is None else list(parents),
        overwrite=overwrite,
        extra=lambda folder: allocation_heatmaps(alloc, folder / "plots"),
    )
    return alloc, params


def run(config: AllocateConfig, inputs: dict, out: Path, context: Context) -> Metrics:
    ref = config.reference_expert is not None
    reference = (Path(config.reference_expert), Path(config.reference_rank)) if ref else None
    alloc, params = run_allocate(
        config,
        out,
        search=inputs.get("state"),
        reference=reference,
        overwrite=context.overwrite,
        parents=list(context.parents) or None,
    )
    s = alloc.summary()
    metrics = {k: float(v) for k, v in s.items() if isinstance(v, (int, float))}
    if params is None:
        context.say(f"{s}")
        return metrics
    context.say(
        f"{s['modules']} modules, {s['experts']} experts, total rank {s['total_rank']}, "
        f"{params:,} trainable parameters"
    )
    return metrics | {"trainable_parameters": float(params)}
