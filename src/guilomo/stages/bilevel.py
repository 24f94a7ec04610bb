"""DARTS-style bilevel optimisation of GSVs (upper level) and LoRA weights (lower level).

Lower level: w (LoRA A, B, routers) minimise L_train. Upper level: the GSVs alpha
minimise L_val(w*(alpha)) on a held-out split. Both losses are CE + aux.

- first order (default): g_alpha = dL_val/dalpha at (w, alpha). Two passes per step.
- second order: w' = w - xi * dL_train/dw (a virtual SGD step, xi = the current LR),
  g_alpha = dL_val(w', alpha)/dalpha - xi * H_{alpha,w} v, v = dL_val(w', alpha)/dw',
  with the Hessian-vector product by central differences at w +/- eps v, eps = 0.01/||v||.
  Four passes: the train gradient of the first is reused for the real step of w.

Every gradient is an explicit `torch.autograd.grad` and the virtual / perturbed weights go
through `torch.func.functional_call`, so nothing leaks between passes and the optimisers'
states are only touched by their own steps (the reference code never zeroes gradients
between passes and mutates the optimiser state in its virtual step).

Under torchrun each process takes every world-th row of each batch and every gradient is
summed across processes. A process's CE is weighted by its share of the batch's label
tokens, so the summed CE gradient is exactly the whole batch's whatever the number of GPUs;
the auxiliary router losses (not sums over tokens) are averaged over the shards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from ..distributed import all_reduce_sum, world
from ..moe.gsv import count_distributions
from ..moe.model import MoeAdapter
from ..moe.search import expected_parameters, gsv_parameters, mode_parameters, weight_parameters
from ..training import linear_schedule

Batch = Mapping[str, torch.Tensor]
Order = Literal["first", "second"]


@dataclass(frozen=True)
class Shard:
    """This process's rows of a batch (None: it got none, its gradients are zeros) and the
    weights of its loss terms in the batch's loss."""

    batch: Batch | None
    ce_weight: float  # share of the batch's label tokens (HF's shifted causal-LM labels)
    aux_weight: float  # share of the batch's rows


def shard(batch: Batch, rank: int, world_size: int) -> Shard:
    """Rows rank, rank + world_size, ... of `batch` (all of it for one process)."""
    if world_size == 1:
        return Shard(batch, 1.0, 1.0)
    rows = batch["input_ids"].shape[0]
    mine = list(range(rank, rows, world_size))
    if not mine:
        return Shard(None, 0.0, 0.0)
    labelled = batch["labels"][:, 1:] != -100  # the tokens HF's loss averages over
    ce_weight = float(labelled[mine].sum()) / max(float(labelled.sum()), 1.0)
    return Shard({k: v[mine] for k, v in batch.items()}, ce_weight, len(mine) / rows)


class SizeControl:
    """What keeps the allocation's size in check.

    Without a target: the term coef_t * E[params] / P_max in the upper loss, coef_t =
    `penalty` ramped linearly from 0 over the first `ramp` share of the steps (full strength
    from the start collapses needed modules before their weights train).

    With `target` parameters: a price per parameter, outside the GSV optimiser. After every
    GSV step the selection's (the modes') relative gap to the target moves the price by
    `rate` * gap, and each count's logit by minus the price change times that count's cost
    (rank r: r * (d_in + d_out); n experts: their expected ranks' cost and routers), in ranks
    of an average module. The logits are then a Lagrangian relaxation, g - price * cost: as
    the price moves, modules flip one at a time, in the order of their margin per parameter,
    so the selection can land on the target (through Adam, all unneeded modules flip at once).
    """

    def __init__(
        self,
        *,
        p_max: int,
        penalty: float = 0.1,
        ramp: float = 0.6,
        target: int | None = None,
        rate: float = 0.015,
    ) -> None:
        self.p_max, self.penalty, self.ramp = p_max, penalty, ramp
        self.target, self.rate = target, rate
        self.multiplier = 0.0  # the price, in logits per rank of an average module

    def coefficient(self, step: int, total: int) -> float:
        """This step's penalty coefficient (no target)."""
        return self.penalty * min(1.0, (step + 1) / max(1.0, self.ramp * total))

    def gradient(self, search: BilevelSearch, alpha: list[torch.Tensor]) -> tuple[list, dict]:
        """d(coef_t * E[params] / P_max)/d alpha (no target)."""
        coef = self.coefficient(search.step_count, search.total_steps)
        with torch.enable_grad():
            expected = expected_parameters(search.adapter)
            grads = torch.autograd.grad(
                coef * expected / self.p_max, alpha, allow_unused=True, materialize_grads=True
            )
        info = {"expected_params": float(expected.detach()), "size_coef": coef}
        return list(grads), info

    @torch.no_grad()
    def price_step(self, adapter: MoeAdapter) -> dict[str, float]:
        """Move the price by `rate` * the selection's relative gap to the target and the
        logits by minus that change times each count's cost (a target only)."""
        mode = mode_parameters(adapter)
        step = self.rate * (mode - self.target) / self.target
        self.multiplier += step
        layers = list(adapter.layers.values())
        unit = sum(m.in_features + m.out_features for m in layers) / len(layers)
        for m in layers:
            g = m.gsv
            d_in, d_out = m.in_features, m.out_features
            ranks = torch.arange(1, g.rank.shape[-1] + 1, dtype=g.rank.dtype, device=g.rank.device)
            g.rank -= step * ranks * (d_in + d_out) / unit
            _, p_rank = count_distributions(g.expert, g.rank, top_k=g.top_k, tau=g.tau)
            per_expert = (d_in + d_out) * (p_rank * ranks).sum(-1) + d_in  # (N,)
            cost = per_expert.cumsum(-1)
            cost[: g.top_k] = cost[g.top_k - 1]  # counts below top_k are top_k (folded)
            g.expert -= step * cost / unit
        info = {"mode_params": float(mode), "expected_params": float(expected_parameters(adapter))}
        return info | {"size_price": self.multiplier}


class BilevelSearch:
    def __init__(
        self,
        model: nn.Module,
        adapter: MoeAdapter,
        *,
        total_steps: int,
        order: Order = "first",
        lora_lr: float = 3e-4,
        warmup_steps: int = 100,
        gsv_lr: float = 3e-3,
        gsv_betas: tuple[float, float] = (0.5, 0.999),
        fd_scale: float = 0.01,
        size: SizeControl | None = None,
        gsv_start: int = 0,
        gsv_decay: float = 0.3,
    ) -> None:
        checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        if order == "second" and checkpointed:
            raise ValueError(
                "second-order search with activation checkpointing: the backward would "
                "recompute at the real weights, not the virtual ones; use order 'first'"
            )
        self.model, self.adapter, self.order = model, adapter, order
        self.gsv_lr, self.gsv_decay = gsv_lr, gsv_decay
        self.size = size  # the E[params] term of the upper loss (expected estimator only)
        self.gsv_start = gsv_start  # steps of weights only before the GSVs move
        self.total_steps = total_steps
        self.w = weight_parameters(adapter)
        self.alpha = gsv_parameters(adapter)
        # names as `model.named_parameters()` has them, for functional_call
        ids = {id(p): n for n, p in model.named_parameters()}
        self.w_names = [ids[id(p)] for p in self.w.values()]
        self.opt_w = torch.optim.AdamW(self.w.values(), lr=lora_lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt_w, linear_schedule(min(warmup_steps, total_steps), total_steps)
        )
        self.opt_alpha = torch.optim.AdamW(
            self.alpha.values(), lr=gsv_lr, betas=gsv_betas, weight_decay=0.0
        )
        self.fd_scale = fd_scale  # eps = fd_scale / ||v|| (the method's 0.01)
        self.step_count = 0
        self.rank, self.world = world()

    def gsv_factor(self, step: int) -> float:
        """GSV learning-rate factor: 1, then a linear decay to 0 over the last `gsv_decay` share
        of the steps, so the selection (and a size target's price) settles instead of
        flickering between near-tied counts at the last step."""
        start = (1.0 - self.gsv_decay) * self.total_steps
        if step < start or self.gsv_decay == 0:
            return 1.0
        return max(0.0, (self.total_steps - step) / (self.total_steps - start))

    # -- losses and gradients ---------------------------------------------------------
    def grad(
        self, part: Shard, wrt: Sequence[torch.Tensor], weights: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """d(CE + aux)/d`wrt` of the whole batch and its CE, at the current weights or at
        `weights` (same order as self.w), summed over the processes' shards."""
        if part.batch is None:
            grads = [torch.zeros_like(p) for p in wrt]
            ce = torch.zeros((), device=wrt[0].device)
        else:
            with self._graph_for(wrt):
                if weights is None:
                    out = self.model(**part.batch)
                else:
                    named = dict(zip(self.w_names, weights, strict=True))
                    out = functional_call(self.model, named, (), dict(part.batch))
            aux = self.adapter.aux_loss()
            total = out.loss * part.ce_weight
            if aux is not None:
                total = total + aux * part.aux_weight
            # A parameter the loss does not reach (a top-1 router without a balance loss:
            # its weight p / p is constant) has a zero gradient, not an error.
            grads = list(
                torch.autograd.grad(total, list(wrt), allow_unused=True, materialize_grads=True)
            )
            wide = torch.promote_types(out.loss.dtype, torch.float32)  # bf16 CE: fp32 metric
            ce = out.loss.detach().to(wide) * part.ce_weight
        *grads, ce = all_reduce_sum([*grads, ce])
        return grads, ce

    @contextmanager
    def _graph_for(self, wrt: Sequence[torch.Tensor]) -> Iterator[None]:
        """Record autograd history only for `wrt`: the searched parameters not asked for
        (the weights in a GSV pass, the GSVs in a weight pass) are frozen for the forward,
        so the backward neither computes their gradients nor walks the gate chains (the
        fused layer's own backward cannot tell which of its inputs autograd.grad wants)."""
        wanted = {id(t) for t in wrt}
        searched = (*self.w.values(), *self.alpha.values())
        frozen = [p for p in searched if p.requires_grad and id(p) not in wanted]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    # -- the upper level --------------------------------------------------------------
    def upper_gradient(self, train: Batch, val: Batch) -> tuple[list[torch.Tensor], dict]:
        """g_alpha for the configured order (does not change any parameter or optimiser)."""
        return self._upper(shard(train, self.rank, self.world), shard(val, self.rank, self.world))

    def _upper(self, train: Shard, val: Shard) -> tuple[list[torch.Tensor], dict]:
        alpha = list(self.alpha.values())
        if self.order == "first":
            g_alpha, ce = self.grad(val, alpha)
            return g_alpha, {"val_loss": ce}
        w = list(self.w.values())
        g_train, train_ce = self.grad(train, w)
        self._g_train = g_train  # reused by the real step
        xi = self.sched.get_last_lr()[0]
        w_virtual = [
            (p - xi * g).detach().requires_grad_(True) for p, g in zip(w, g_train, strict=True)
        ]
        grads, ce = self.grad(val, w_virtual + alpha, w_virtual)
        v, g_alpha = grads[: len(w)], grads[len(w) :]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in v))
        eps = self.fd_scale / norm.clamp_min(1e-12)
        with torch.no_grad():
            w_plus = [p + eps.to(p.dtype) * d for p, d in zip(w, v, strict=True)]
            w_minus = [p - eps.to(p.dtype) * d for p, d in zip(w, v, strict=True)]
        g_plus = self.grad(train, alpha, w_plus)[0]
        g_minus = self.grad(train, alpha, w_minus)[0]
        hvp = [(gp - gm) / (2 * eps.to(gp.dtype)) for gp, gm in zip(g_plus, g_minus, strict=True)]
        info = {"val_loss": ce, "train_loss": train_ce}
        return [g - xi * h for g, h in zip(g_alpha, hvp, strict=True)], info

    # -- one step -------------------------------------------------------------------
    def step(self, train: Batch, val: Batch) -> dict[str, float]:
        """One bilevel step on a train and a validation batch (whole batches: under torchrun
        every process passes the same ones and takes its own rows)."""
        self.model.train()
        train_part = shard(train, self.rank, self.world)
        g_alpha, info = self._upper(train_part, shard(val, self.rank, self.world))
        if self.step_count >= self.gsv_start:  # (the size term too: no controller wind-up)
            if self.size is not None and self.size.target is None:
                g_size, size_info = self.size.gradient(self, list(self.alpha.values()))
                g_alpha = [g + d for g, d in zip(g_alpha, g_size, strict=True)]
                info.update(size_info)
            for p, g in zip(self.alpha.values(), g_alpha, strict=True):
                p.grad = g
            for group in self.opt_alpha.param_groups:  # a function of the step: resumes as is
                group["lr"] = self.gsv_lr * self.gsv_factor(self.step_count)
            self.opt_alpha.step()
            self.opt_alpha.zero_grad(set_to_none=True)
            if self.size is not None and self.size.target is not None:
                info.update(self.size.price_step(self.adapter))
        if self.order == "first":
            g_w, info["train_loss"] = self.grad(train_part, list(self.w.values()))
        else:
            g_w, self._g_train = self._g_train, None
        for p, g in zip(self.w.values(), g_w, strict=True):
            p.grad = g
        self.opt_w.step()
        self.opt_w.zero_grad(set_to_none=True)
        self.sched.step()
        self.step_count += 1
        return {k: float(v) for k, v in info.items()}
