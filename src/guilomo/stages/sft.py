"""SFT stage: train a LoRA-MoE built from an Allocation (fresh weights) on a PreparedDataset.

Loss = CE + the adapter's auxiliary router losses, micro-batches accumulated into the
configured batch. Data order and dropout are seeded functions of the step (and rank) and
checkpoints hold the adapter, optimiser and LR schedule, so a killed run restarted with the
same arguments continues to the same result. Under `torchrun`, `parallel: ddp` all-reduces
the adapter gradients and `parallel: fsdp` shards base and adapter (FSDP2) for bases that do
not fit one GPU; checkpoints hold full tensors either way, so one resumes under either mode.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..artifacts import config_hash
from ..artifacts.adapter import write_adapter
from ..artifacts.prepared import dataset_info, read_split
from ..checkpoint import optimizer_state, optimizer_state_dict, save_checkpoint
from ..config import SftConfig
from ..data.prompts import collate, length_grouped_batches, tokenize_example
from ..distributed import all_reduce_sum, world
from ..moe.config import Allocation, MoeConfig
from ..moe.model import MoeAdapter, inject_adapter
from ..remote import mirror_checkpoints
from ..training import linear_schedule, run_steps
from . import Context, Metrics, StepHook

CKPT_TENSORS = "trainer_state.safetensors"
CKPT_JSON = "trainer_state.json"
ADAPTER_TENSORS = "adapter_model.safetensors"


@dataclass
class SftResult:
    steps: int
    resumed_from: int
    losses: list[float]
    tokens_per_second: float


def checkpoint_hash(config: SftConfig) -> str:
    """The hash of all config fields but `parallel` (how processes share the work, not the
    result): a DDP checkpoint resumes under FSDP and back, and older ones keep their hash."""
    return config_hash(config.model_dump(mode="json", exclude={"parallel"}))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP shards one by one: the classes a transformers model lists in
    `_no_split_modules` (its decoder layers), else the modules of `model.model.layers`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    inner = getattr(getattr(model, "model", None), "layers", None)
    if not layers and isinstance(inner, torch.nn.ModuleList):
        layers = list(inner)
    if not layers:
        listed = ", ".join(sorted(names)) or "none listed"
        raise ValueError(
            f"parallel: fsdp shards the model one decoder layer at a time, but found no layers "
            f"in {type(model).__name__}: no module of a class in its `_no_split_modules` "
            f"({listed}) and no `model.layers`; use parallel: ddp for this model"
        )
    return layers


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 over all processes: one unit per decoder layer, the root holds the rest. CPU
    parameters move to `device` layer by layer, so the base never sits whole on one GPU."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # torch < 2.6: FSDP2 was not public yet
        raise ValueError(
            f"parallel: fsdp needs torch>=2.6 (torch.distributed.fsdp.fully_shard); this is "
            f"torch {torch.__version__}: use parallel: ddp or upgrade torch"
        ) from exc
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP2 gathers on the current device
    mesh = init_device_mesh(device.type, (world()[1],))
    for layer in reversed(decoder_layers(model)):  # inner units before outer ones
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def task_types(config: SftConfig, records: Sequence[dict], dataset: Path) -> list[int] | None:
    """Each record's task type for LoRAMoE's localized balancing, one type per expert group
    (None when it is off)."""
    losses = config.losses
    if losses.localized_coef == 0:
        return None
    types = dataset_info(dataset).get("task_types") or []
    if len(types) < 2:
        raise ValueError(
            f"losses.localized_coef is {losses.localized_coef}, but {dataset} has "
            f"{len(types)} task type(s) {types}: localized balancing needs data from two or "
            "more sources (e.g. preprocess datasets=[sciq,arc_easy]), or set "
            "losses.localized_coef=0"
        )
    if len(types) != losses.localized_groups:
        raise ValueError(
            f"losses.localized_groups is {losses.localized_groups}, but {dataset} has "
            f"{len(types)} task types {types}: set losses.localized_groups={len(types)}"
        )
    per_record = [int(r.get("task_type", -1)) for r in records]
    if min(per_record) < 0:
        raise ValueError(
            "losses.localized_coef > 0 needs each record's task_type: preprocess the data "
            "again (it records one per data set)"
        )
    return per_record


def micro_batch_schedule(
    lengths: Sequence[int], config: SftConfig, steps: int
) -> list[list[list[int]]]:
    """For every optimiser step, its micro-batches (lists of example indices), all ranks."""
    size, accum = config.micro_batch_size, config.batch_size // config.micro_batch_size
    micro: list[list[int]] = []
    epoch = 0
    while len(micro) < steps * accum:
        seed = config.seed * 7919 + epoch
        if config.group_by_length:
            micro.extend(length_grouped_batches(lengths, size, seed=seed))
        else:
            order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
            micro.extend(order[i : i + size].tolist() for i in range(0, len(order), size))
        epoch += 1
    return [micro[s * accum : (s + 1) * accum] for s in range(steps)]


def total_steps(n_examples: int, config: SftConfig) -> int:
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = math.ceil(n_examples / config.micro_batch_size)
    return max(1, int(per_epoch * config.epochs) // (config.batch_size // config.micro_batch_size))


class SftTrainer:
    def __init__(
        self,
        config: SftConfig,
        allocation: Allocation,
        model: torch.nn.Module,
        tokenizer: Any,
        records: Sequence[dict],
        task_types: list[int] | None = None,
    ) -> None:
        self.config = config
        self.rank, self.world = world()
        accum = config.batch_size // config.micro_batch_size
        if accum % self.world:
            raise ValueError(
                f"batch_size / micro_batch_size = {accum} micro-batches per step cannot be split "
                f"over {self.world} processes; make it a multiple of {self.world}"
            )
        self.examples = [
            tokenize_example(
                r, tokenizer, cutoff=config.cutoff, train_on_inputs=config.train_on_inputs
            )
            for r in records
        ]
        pad = tokenizer.pad_token_id
        self.pad_id = tokenizer.eos_token_id if pad is None else pad
        self.task_types = task_types  # each example's, for localized balancing (None: off)
        self.model = model
        torch.manual_seed(config.seed)  # fresh adapter weights, the same on every process
        moe = MoeConfig(
            allocation=allocation,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            router=config.router,
            losses=config.losses,
        )
        self.adapter: MoeAdapter = inject_adapter(model, moe)
        if config.gradient_checkpointing:  # before FSDP wraps the layers
            self.adapter.enable_checkpointing()
        #: parameter names in optimiser order: the keys of the adapter file and checkpoints
        self.param_names = list(self.adapter.state_dict())
        self.fsdp = config.parallel == "fsdp" and self.world > 1
        if self.fsdp:  # before the optimiser: it must hold the sharded parameters
            from ..models import default_device

            shard_model(model, default_device())
        self.params = list(self.adapter.parameters())
        self.steps = total_steps(len(self.examples), config)
        self.schedule = micro_batch_schedule(
            [len(e["input_ids"]) for e in self.examples], config, self.steps
        )
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        warmup = min(config.warmup_steps, max(1, self.steps // 10))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, linear_schedule(warmup, self.steps)
        )
        self.step = 0
        self.losses: list[float] = []

    # -- checkpoints -------------------------------------------------------------------
    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The adapter's full tensors by name and the optimiser state dict, parameters
        numbered as in one process, on rank 0 (None elsewhere). Under FSDP every process
        must call this: the shards are all-gathered (onto rank 0's CPU)."""
        if not self.fsdp:
            return (self.adapter.state_dict(), self.opt.state_dict()) if self.rank == 0 else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
        )
        weights, osd = get_state_dict(self.model, self.opt, options=options)
        if self.rank != 0:
            return None
        index = {name: i for i, name in enumerate(self.param_names)}  # FQN -> number
        numbered = {
            "state": dict(sorted((index[k], v) for k, v in osd["state"].items())),
            "param_groups": [
                {**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]
            ],
        }
        return {k: weights[k] for k in self.param_names}, numbered

    def save_checkpoint(self, ckpt_dir: Path) -> None:
        """Rank 0 writes; under FSDP every process must call this (see `full_state`)."""
        state = self.full_state()
        if state is None:
            return  # not the writing process
        tensors, meta = optimizer_state("opt", state[1])
        doc = {
            "step": self.step,
            "optimizer": meta,
            "scheduler": self.sched.state_dict(),
            "losses": self.losses,
            "config_hash": checkpoint_hash(self.config),
        }
        files = {ADAPTER_TENSORS: state[0], CKPT_TENSORS: tensors}
        save_checkpoint(ckpt_dir, documents={CKPT_JSON: doc}, tensors=files)

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        if not (ckpt_dir / CKPT_JSON).is_file():
            return
        doc = json.loads((ckpt_dir / CKPT_JSON).read_text())
        if doc["config_hash"] != checkpoint_hash(self.config):
            raise ValueError(
                f"{ckpt_dir}: checkpoint of a run with another config; use the same config to "
                "resume or another checkpoint folder"
            )
        weights = load_file(str(ckpt_dir / ADAPTER_TENSORS))
        osd = optimizer_state_dict("opt", load_file(str(ckpt_dir / CKPT_TENSORS)), doc["optimizer"])
        if self.fsdp:  # every process read the same files; each keeps its shard (collective)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            names = self.param_names  # number -> FQN, as torch.distributed.checkpoint wants
            osd = {
                "state": {names[i]: v for i, v in osd["state"].items()},
                "param_groups": [
                    {**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]
                ],
            }
            # strict=False: the file holds the adapter, the frozen base is the model's own
            opts = StateDictOptions(full_state_dict=True, strict=False)
            set_state_dict(
                self.model, self.opt, model_state_dict=weights, optim_state_dict=osd, options=opts
            )
        else:  # the adapter's own names: a missing tensor is an error, DDP's prefix no matter
            with torch.no_grad():
                for k, p in self.adapter.state_dict().items():
                    p.copy_(weights[k])
            self.opt.load_state_dict(osd)
        self.sched.load_state_dict(doc["scheduler"])
        self.step, self.losses = doc["step"], list(doc["losses"])

    def publish(
        self, out: Path, result: SftResult, parents: Sequence[str], base: dict | None
    ) -> None:
        """Write the Adapter artifact: the adapter, its loss log and loss curve, the metadata
        (rank 0; under FSDP every process must call this, see `full_state`)."""
        from ..plots import loss_curve

        state = self.full_state()
        if state is None:
            return  # not the writing process
        meta = {
            "steps": self.step,
            "final_loss": self.losses[-1] if self.losses else None,
            "trainable_parameters": self.adapter.num_parameters(),
            "tokens_per_second": round(result.tokens_per_second, 1),
        } | ({"base_model": base} if base else {})

        def save(folder: Path) -> None:
            self.adapter.save(folder, state[0])
            loss_curve(self.losses, folder / "plots" / "sft_loss.png")

        write_adapter(
            out, save, losses=self.losses, metadata=meta, config=self.config, parents=parents
        )

    # -- training ----------------------------------------------------------------------
    def _accumulate(self, micro: list[list[int]], device: torch.device) -> tuple[torch.Tensor, int]:
        """Forward and backward over this process's micro-batches of one step, gradients
        averaged over all processes; returns the step's mean CE and this process's tokens."""
        tokens, step_loss = 0, torch.zeros((), device=device)
        for n, idx in enumerate(micro, start=1):
            if self.fsdp:  # reduce-scatter the summed gradients once, on the last backward
                self.model.set_requires_gradient_sync(n == len(micro))
            examples = [self.examples[i] for i in idx]
            batch = {k: v.to(device) for k, v in collate(examples, self.pad_id).items()}
            if self.task_types is not None:
                types = [self.task_types[i] for i in idx]
                self.adapter.set_task_types(torch.tensor(types, device=device))
            out = self.model(**batch)
            aux = self.adapter.aux_loss()
            loss = out.loss if aux is None else out.loss + aux
            (loss / len(micro)).backward()
            step_loss += out.loss.detach() / len(micro)
            tokens += int(batch["attention_mask"].sum())
        if self.world > 1:
            if self.fsdp:  # its reduce-scatter has averaged the gradients already
                (step_loss,) = all_reduce_sum([step_loss])
            else:  # one collective for every adapter gradient and the loss
                *grads, step_loss = all_reduce_sum([*(p.grad for p in self.params), step_loss])
                for p, g in zip(self.params, grads, strict=True):
                    p.grad = g.div_(self.world)
            step_loss /= self.world
        return step_loss, tokens

    def train(
        self,
        ckpt_dir: Path | None,
        *,
        stop_after: int | None = None,
        progress: bool = True,
        on_step: StepHook | None = None,
        on_checkpoint: Callable[[], None] | None = None,
    ) -> SftResult:
        """Train to the end (or to `stop_after`). On rank 0, `on_step(step, metrics)` follows
        every optimiser step and `on_checkpoint()` every checkpoint save."""
        start = self.step
        end = self.steps if stop_after is None else min(self.steps, stop_after)
        self.model.train()
        device = next(self.model.parameters()).device
        tokens, t0 = 0, time.perf_counter()

        def step(i: int) -> dict[str, float]:
            nonlocal tokens
            lr = float(self.opt.param_groups[0]["lr"])  # the rate this step applies
            t_step = time.perf_counter()
            loss, step_tokens = self._accumulate(self.schedule[i][self.rank :: self.world], device)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step = i + 1
            self.losses.append(float(loss))
            tokens += step_tokens
            rate = step_tokens * self.world / max(time.perf_counter() - t_step, 1e-9)
            return {"loss": self.losses[-1], "lr": lr, "step_tokens_per_second": rate}

        run_steps(
            step,
            start=start,
            end=end,
            seed=self.config.seed,
            desc="sft",
            shown=("loss", "step_tokens_per_second"),
            progress=progress,
            on_step=on_step,
            save=None if ckpt_dir is None else lambda: self.save_checkpoint(ckpt_dir),
            checkpoint_every=self.config.checkpoint_every,
            on_checkpoint=on_checkpoint,
        )
        rate = tokens * self.world / max(time.perf_counter() - t0, 1e-9)
        return SftResult(
            steps=self.step, resumed_from=start, losses=self.losses, tokens_per_second=rate
        )


def run_sft(
    config: SftConfig,
    *,
    dataset: Path,
    allocation: Allocation,
    out: Path,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    checkpoints: Path | None = None,
    checkpoint_uri: str | None = None,
    parents: Sequence[str] = (),
    stop_after: int | None = None,
    progress: bool = True,
    on_step: StepHook | None = None,
) -> SftResult:
    """Train and write the Adapter artifact to `out`, resuming from `checkpoints` (mirrored
    by `checkpoint_uri`, `s3://bucket/prefix` or a folder: pulled first, pushed after every
    save). `parents`: the dataset's and allocation's URIs, for the manifest. `on_step(step,
    {"loss", "lr", "step_tokens_per_second"})` follows every optimiser step on rank 0."""
    if checkpoint_uri is not None and checkpoints is None:
        raise ValueError("checkpoint_uri mirrors a local folder: give `checkpoints` as well")
    records = read_split(Path(dataset), "train")
    types = task_types(config, records, Path(dataset))
    base = None  # the base model's identity, when this stage loads it
    if model is None:
        from ..models import model_identity

        base = model_identity(config.base_model)
        model, tokenizer = _load_base(config)
    trainer = SftTrainer(config, allocation, model, tokenizer, records, types)
    push = mirror_checkpoints(checkpoint_uri, checkpoints)
    if checkpoints is not None:
        trainer.load_checkpoint(Path(checkpoints))
    result = trainer.train(
        Path(checkpoints) if checkpoints else None,
        stop_after=stop_after,
        progress=progress,
        on_step=on_step,
        on_checkpoint=push,
    )
    if trainer.step >= trainer.steps:  # else interrupted on purpose
        trainer.publish(Path(out), result, parents, base)
    return result


def _load_base(config: SftConfig) -> tuple[torch.nn.Module, Any]:
    """The base model on this process's device in the configured dtype; under FSDP on the
    CPU, as sharding moves it to the GPU one layer at a time (so a base larger than one GPU
    fits), in the dtype the GPU would get."""
    from ..models import default_device, load_model

    device = default_device()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(config.dtype)
    if config.parallel == "fsdp" and world()[1] > 1:
        if dtype is None and device.type == "cuda":
            dtype = torch.bfloat16
        device = torch.device("cpu")
    return load_model(config.base_model, dtype=dtype, device=device)


def planned_steps(config: SftConfig, inputs: dict) -> int:
    return total_steps(len(read_split(inputs["dataset"], "train")), config)


def run(config: SftConfig, inputs: dict, out: Path, context: Context) -> Metrics:
    from ..artifacts.allocation import read_allocation

    allocation = read_allocation(inputs["allocation"])
    r = run_sft(
        config, dataset=inputs["dataset"], allocation=allocation, out=out, **context.training()
    )
    context.say(
        f"{r.steps} steps (resumed from {r.resumed_from}), final loss {r.losses[-1]:.4f}, "
        f"{r.tokens_per_second:,.0f} tokens/s"
    )
    return {
        "steps": float(r.steps),
        "final_loss": r.losses[-1],
        "tokens_per_second": r.tokens_per_second,
    }
