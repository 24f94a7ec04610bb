"""The search stage: bilevel GSV search on a train split, GSVs judged on a held-out split.

`SearchRun` drives `BilevelSearch` over token batches in a seeded order per epoch and saves
everything a resume needs every `checkpoint_every` steps (layout: `artifacts/search_state.py`),
so an interrupted and resumed search equals an uninterrupted one. Under torchrun every
process builds the same batches and takes its own rows (see `bilevel.shard`), so the GSVs
and weights stay identical everywhere; rank 0 writes the state and the artifact.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts.search_state import (
    STATE_JSON,
    SearchStateError,
    check_state_fits,
    gsv_key,
    gsvs,
    publish_state,
    read_state,
    write_state,
)
from ..checkpoint import optimizer_state, optimizer_state_dict
from ..config import SearchConfig
from ..distributed import all_reduce_sum, world
from ..moe.config import LossConfig
from ..moe.model import MoeAdapter
from ..moe.search import inject_search, module_shapes, preset_parameters, size_range
from ..remote import mirror_checkpoints
from ..training import run_steps, save_point
from . import Context, Metrics, StepHook
from .bilevel import Batch, BilevelSearch, SizeControl

OPTIMIZERS = ("opt_w", "opt_alpha")  # BilevelSearch's, by attribute: their tensor prefixes


@dataclass
class SearchResult:
    steps: int
    resumed_from: int
    losses: list[dict[str, float]]


def _batch_at(data: Sequence[Batch], step: int, seed: int) -> Batch:
    """The batch of `step` in a seeded permutation of `data` per epoch."""
    epoch, i = divmod(step, len(data))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return data[torch.randperm(len(data), generator=g).tolist()[i]]


def router_load(adapter: MoeAdapter) -> dict[str, list[float]]:
    """Per module, each expert's share of the routed token slots, over every process (every
    routed module, counted or not, so all processes reduce the same list)."""
    names = sorted(n for n, layer in adapter.layers.items() if layer.router is not None)
    device = next(adapter.parameters()).device
    counts = [
        adapter.state.counts.get(n, torch.zeros(adapter.layers[n].num_experts, device=device))
        for n in names
    ]
    counts = all_reduce_sum([c.double() for c in counts])
    return {n: (c / c.sum().clamp_min(1)).tolist() for n, c in zip(names, counts, strict=True)}


def gsv_stacks(adapter: MoeAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """All modules' expert GSVs (modules, N) and rank GSVs (modules, N, R), copied."""
    layers = adapter.layers.values()
    return (
        torch.stack([layer.gsv.expert.detach() for layer in layers]),
        torch.stack([layer.gsv.rank.detach() for layer in layers]),
    )


class SearchRun:
    """One search: the model in search mode, its optimiser, its state on disk."""

    def __init__(self, model: nn.Module, config: SearchConfig, *, base_model: str) -> None:
        processes = world()[1]
        if config.batch_size < processes:
            raise ValueError(
                f"batch_size ({config.batch_size}) is smaller than the number of processes "
                f"({processes}): each process takes every {processes}-th row of a batch, so "
                f"some would get none; use batch_size >= {processes} or fewer processes"
            )
        self.config = config
        self.base_model = base_model
        torch.manual_seed(config.seed)  # LoRA / router init and dropout: a rerun is identical
        self.adapter = inject_search(
            model,
            base_model=base_model,
            max_experts=config.max_experts,
            max_rank=config.max_rank,
            top_k=config.top_k,
            placement=config.placement,
            seed=config.seed,
            estimator=config.estimator,
            tau=config.tau,
            lora_dropout=config.lora_dropout,
            losses=LossConfig(balance_coef=config.balance_coef),
        )
        if config.gradient_checkpointing:
            self.adapter.enable_checkpointing()
        self.shapes = module_shapes(self.adapter)
        self.target, size = self._size_control()
        self.search = BilevelSearch(
            model,
            self.adapter,
            total_steps=config.steps,
            order=config.order,
            lora_lr=config.lora_lr,
            warmup_steps=config.warmup,
            gsv_lr=config.gsv_lr,
            gsv_betas=config.gsv_betas,
            size=size,
            gsv_start=config.gsv_start,
            gsv_decay=config.gsv_decay,
        )
        self.losses: list[dict[str, float]] = []
        #: (step, expert GSVs, rank GSVs) every `history_every` steps, as `gsv_stacks` gives
        self.history: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def _size_control(self) -> tuple[int | None, SizeControl | None]:
        """The size target (None: untargeted), checked, and what steers E[params] (the
        expected estimator only; None without a target or penalty)."""
        cfg = self.config
        low, high = size_range(
            self.shapes, top_k=cfg.top_k, max_experts=cfg.max_experts, max_rank=cfg.max_rank
        )
        target = self._target(low, high) if cfg.targeted else None
        if cfg.estimator != "expected" or (target is None and cfg.size_penalty == 0):
            return target, None
        return target, SizeControl(
            p_max=high, penalty=cfg.size_penalty, ramp=cfg.penalty_ramp, target=target
        )

    def _target(self, low: int, high: int) -> int:
        cfg = self.config
        if cfg.target_like is not None:
            target = preset_parameters(
                cfg.target_like, self.shapes, top_k=cfg.top_k, placement=cfg.placement
            )
            what = f"target_like {cfg.target_like!r} ({target:,} parameters)"
        else:
            target = cfg.target_params
            what = f"target_params (--target-params) {target:,}"
        if not low <= target <= high:
            raise ValueError(
                f"{what} is outside what this search can select: from {low:,} (top_k = "
                f"{cfg.top_k} experts of rank 1 in each of {len(self.shapes)} modules) to "
                f"{high:,} ({cfg.max_experts} experts of rank {cfg.max_rank} everywhere); "
                "choose a target in that range or change --max-experts / --max-rank"
            )
        return target

    # -- persistence -------------------------------------------------------------------
    def save(self, out_dir: Path) -> None:
        """Every process calls this (the router load is summed over them); rank 0 writes."""
        load = router_load(self.adapter)
        if self.search.rank != 0:
            return
        search = self.search
        tensors = {f"w.{name}": p.detach() for name, p in search.w.items()}
        for name, layer in self.adapter.layers.items():
            tensors[gsv_key(name, "expert")] = layer.gsv.expert.detach()
            tensors[gsv_key(name, "rank")] = layer.gsv.rank.detach()
        doc = {
            "version": 1,
            "base_model": self.base_model,
            "config": self.config.model_dump(mode="json"),
            "step": search.step_count,
            "modules": list(self.shapes),
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "losses": self.losses,
            "router_load": load,
            "scheduler": search.sched.state_dict(),
            "target_params": self.target,
            "size_multiplier": search.size.multiplier if search.size is not None else None,
        }
        for key in OPTIMIZERS:
            opt_tensors, doc[key] = optimizer_state(key, getattr(search, key).state_dict())
            tensors.update(opt_tensors)
        if self.history:
            steps, experts, ranks = zip(*self.history, strict=True)
            tensors["history.step"] = torch.tensor(steps)
            tensors["history.expert"] = torch.stack(experts)
            tensors["history.rank"] = torch.stack(ranks)
        write_state(out_dir, doc, tensors)

    def load(self, out_dir: Path) -> None:
        doc, tensors = read_state(out_dir)
        check_state_fits(doc, out_dir, base_model=self.base_model, shapes=self.shapes)
        if doc["config"] != self.config.model_dump(mode="json"):
            raise SearchStateError(
                f"{out_dir / STATE_JSON}: was written by a search with another config; "
                "resume with the same config or use a new output folder"
            )
        search = self.search
        with torch.no_grad():
            for name, (e, r) in gsvs(doc, tensors).items():
                self.adapter.layers[name].gsv.expert.copy_(e)
                self.adapter.layers[name].gsv.rank.copy_(r)
            for name, p in search.w.items():
                p.copy_(tensors[f"w.{name}"])
        for key in OPTIMIZERS:
            getattr(search, key).load_state_dict(optimizer_state_dict(key, tensors, doc[key]))
        search.sched.load_state_dict(doc["scheduler"])
        if search.size is not None:
            search.size.multiplier = doc.get("size_multiplier") or 0.0
        search.step_count = doc["step"]
        self.losses = list(doc["losses"])
        if "history.step" in tensors:
            e, r = tensors["history.expert"], tensors["history.rank"]
            self.history = list(zip(tensors["history.step"].tolist(), e, r, strict=True))

    # -- the loop ----------------------------------------------------------------------
    def run(
        self,
        train: Sequence[Batch],
        val: Sequence[Batch],
        out_dir: Path,
        *,
        stop_after: int | None = None,
        progress: bool = False,
        on_step: StepHook | None = None,
        on_checkpoint: Callable[[], None] | None = None,
    ) -> SearchResult:
        """Search to the end (or to `stop_after`), resuming from `out_dir`; `on_step(step,
        metrics)` follows every step, `on_checkpoint()` every save."""
        if not train or not val:
            raise ValueError("the search needs non-empty train and validation splits")
        out_dir, cfg = Path(out_dir), self.config
        if (out_dir / STATE_JSON).is_file():
            self.load(out_dir)
        start = self.search.step_count
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)

        def step(i: int) -> dict[str, float]:
            info = self.search.step(_batch_at(train, i, cfg.seed), _batch_at(val, i, cfg.seed + 1))
            self.losses.append({"step": i, **info})
            if i % cfg.history_every == 0 or i == cfg.steps - 1:
                self.history.append((i, *gsv_stacks(self.adapter)))
            return info

        save = functools.partial(self.save, out_dir)
        run_steps(
            step,
            start=start,
            end=end,
            seed=cfg.seed,
            desc="search",
            shown=("train_loss", "val_loss"),
            progress=progress,
            on_step=on_step,
            save=save,
            checkpoint_every=cfg.checkpoint_every,
            on_checkpoint=on_checkpoint,
        )
        if start >= end:  # nothing to do: the folder still gets (keeps) its state
            save_point(save, on_checkpoint)
        return SearchResult(steps=self.search.step_count, resumed_from=start, losses=self.losses)


def tokenized_batches(
    records: Sequence[dict],
    tokenizer: Any,
    config: SearchConfig,
    seed: int,
    device: torch.device,
) -> list[Batch]:
    """Fixed, length-grouped batches of tokenised records, on `device`."""
    from ..data.prompts import collate, length_grouped_batches, tokenize_example

    examples = [tokenize_example(r, tokenizer, cutoff=config.cutoff) for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    groups = length_grouped_batches(
        [len(e["input_ids"]) for e in examples], config.batch_size, seed=seed
    )
    batches = (collate([examples[i] for i in g], pad) for g in groups)
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def run_search_stage(
    config: SearchConfig,
    *,
    dataset: Path,
    out: Path,
    checkpoints: Path,
    checkpoint_uri: str | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    parents: Sequence[str] | None = None,
    progress: bool = True,
    on_step: StepHook | None = None,
) -> SearchResult:
    """Search on a PreparedDataset (train split for w, validation split for the GSVs) and
    publish the state, with GSV plots, as a SearchState artifact at `out`.

    `checkpoints` is resumed from when it holds a state; `checkpoint_uri` (`s3://bucket/prefix`
    or a folder) mirrors it: pulled before the search, pushed after every save. `parents`
    defaults to `dataset`. `on_step(step, losses)` follows every step (1-based)."""
    from ..artifacts.prepared import read_split
    from ..plots import gsv_trajectories

    train_records = read_split(Path(dataset), "train")
    val_records = read_split(Path(dataset), "validation")
    base = None  # the base model's identity, when this stage loads it
    if model is None:
        from ..models import default_device, load_model, model_identity

        base = model_identity(config.base_model)
        model, tokenizer = load_model(config.base_model, device=default_device())
    device = next(model.parameters()).device
    train = tokenized_batches(train_records, tokenizer, config, config.seed, device)
    val = tokenized_batches(val_records, tokenizer, config, config.seed + 1, device)
    run = SearchRun(model, config, base_model=config.base_model)
    push = mirror_checkpoints(checkpoint_uri, Path(checkpoints))
    result = run.run(
        train, val, Path(checkpoints), progress=progress, on_step=on_step, on_checkpoint=push
    )
    if run.search.rank != 0:
        return result  # rank 0 publishes
    meta = {
        "steps": result.steps,
        "modules": len(run.shapes),
        "final_val_loss": result.losses[-1]["val_loss"] if result.losses else None,
    } | ({"base_model": base} if base else {})
    publish_state(
        out,
        Path(checkpoints),
        config=config,
        parents=[str(dataset)] if parents is None else list(parents),
        metadata=meta,
        extra=lambda folder: gsv_trajectories(*read_state(folder), folder / "plots", where=folder),
    )
    return result


def planned_steps(config: SearchConfig, inputs: dict) -> int:
    return config.steps


def run(config: SearchConfig, inputs: dict, out: Path, context: Context) -> Metrics:
    r = run_search_stage(config, dataset=inputs["dataset"], out=out, **context.training())
    context.say(f"{r.steps} steps (resumed from {r.resumed_from})")
    return {"steps": float(r.steps)}  # the losses are per-step metrics (on_step)
