"""Allocation extraction: GSVs (or the reference code's JSON files) -> a typed `Allocation`.

The GSV -> allocation math lives in `guilomo.moe.search.extract_allocation`; this stage
adds the inputs users bring, with errors that name the file and the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from ..moe.config import Allocation, ModuleAllocation
from ..moe.search import allocation_parameters, extract_allocation

_PREFIXES = ("base_model.model.",)  # PEFT-style wrapping in the reference's module names
_RANK_KEY = re.compile(r"^(?P<module>.+)\.expertlora_E_vector_(?P<j>\d+)$")


class AllocationInputError(ValueError):
    """Bad allocation input; the message names the file and what to change."""


def _read_json_object(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise AllocationInputError(f"{path}: not found") from None
    except json.JSONDecodeError as exc:
        raise AllocationInputError(
            f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    if not isinstance(doc, dict):
        raise AllocationInputError(f"{path}: expected a JSON object mapping names to integers")
    return doc


def _strip(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


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
    experts = {_strip(k): v for k, v in _read_json_object(expert_json).items()}
    ranks_raw = _read_json_object(rank_json)
    if len(experts) != len(module_names):
        raise AllocationInputError(
            f"{expert_json}: {len(experts)} modules, the model has {len(module_names)} adapted "
            "modules: the files are for another model or placement"
        )
    unknown = sorted(set(experts) - set(module_names))
    if unknown:
        raise AllocationInputError(f"{expert_json}: modules not in the model: {unknown[:3]}")
    ranks: dict[tuple[str, int], int] = {}
    for key, value in ranks_raw.items():
        m = _RANK_KEY.match(_strip(key))
        if not m:
            raise AllocationInputError(
                f"{rank_json}: key {key!r} is not '<module>.expertlora_E_vector_<j>'"
            )
        ranks[(m["module"], int(m["j"]))] = value
    modules = {}
    for name in module_names:
        n = experts[name]
        if not isinstance(n, int) or n < 1:
            raise AllocationInputError(
                f"{expert_json}: {name}: expert count must be an integer >= 1, got {n!r}"
            )
        rs = []
        for j in range(n):
            if (name, j) not in ranks:
                raise AllocationInputError(
                    f"{rank_json}: no rank for {name}.expertlora_E_vector_{j}"
                )
            rs.append(ranks[(name, j)])
        try:
            modules[name] = ModuleAllocation(experts=n, top_k=min(top_k, n), ranks=rs)
        except ValueError as exc:
            raise AllocationInputError(f"{rank_json}: {name}: {exc}") from None
    return Allocation(base_model=base_model, modules=modules)


def allocation_from_state(
    state_dir: Path,
    *,
    budget: int | None = None,
    module_shapes: dict[str, tuple[int, int]] | None = None,
) -> tuple[Allocation, int]:
    """The allocation a search state selects and its trainable-parameter count.

    With `module_shapes` (the target model's adapted modules), a state searched on another
    model is refused.
    """
    from .search import check_state_fits, read_state

    doc, tensors = read_state(Path(state_dir))
    shapes = {n: tuple(s) for n, s in doc["shapes"].items()}
    if module_shapes is not None:
        check_state_fits(doc, Path(state_dir), base_model=None, shapes=module_shapes)
    gsvs = {n: (tensors[f"gsv.{n}.expert"], tensors[f"gsv.{n}.rank"]) for n in doc["modules"]}
    try:
        alloc = extract_allocation(
            gsvs,
            base_model=doc["base_model"],
            top_k=doc["config"]["top_k"],
            shapes=shapes,
            budget=budget,
        )
    except ValueError as exc:
        raise AllocationInputError(f"{state_dir}: {exc}") from None
    return alloc, allocation_parameters(alloc, shapes)
