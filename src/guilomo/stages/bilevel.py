"""DARTS-style bilevel optimisation of GSVs (upper level) and LoRA weights (lower level).

Lower level: w (LoRA A, B, routers) minimise L_train. Upper level: the GSVs alpha
minimise L_val(w*(alpha)) on a held-out split. Both losses are CE + aux.

- first order (default): g_alpha = dL_val/dalpha at (w, alpha). Two passes per step.
- second order: w' = w - xi * dL_train/dw (a virtual SGD step, xi = the current LR),
  g_alpha = dL_val(w', alpha)/dalpha - xi * H_{alpha,w} v, v = dL_val(w', alpha)/dw',
  with the Hessian-vector product by central differences at w +/- eps v, eps = 0.01/||v||.
  Four passes: the train gradient of the first is reused for the real step of w.

Every gradient is an explicit `torch.autograd.grad` and the virtual / perturbed weights go
through `torch.func.functional_call`, so nothing leaks between passes and the real
optimisers' states are only touched by their own steps. (The reference code never zeroes
gradients between passes and mutates the optimiser state in its virtual step.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from ..moe.model import MoeAdapter
from ..moe.search import gsv_parameters, weight_parameters

Batch = Mapping[str, torch.Tensor]
Order = Literal["first", "second"]


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


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
    ) -> None:
        self.model, self.adapter, self.order = model, adapter, order
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

    # -- losses ---------------------------------------------------------------------
    def loss(
        self, batch: Batch, weights: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE + aux, CE) at the current weights or at `weights` (same order as self.w)."""
        if weights is None:
            out = self.model(**batch)
        else:
            out = functional_call(
                self.model, dict(zip(self.w_names, weights, strict=True)), (), dict(batch)
            )
        aux = self.adapter.aux_loss()
        total = out.loss if aux is None else out.loss + aux
        return total, out.loss.detach()

    # -- gradients ------------------------------------------------------------------
    def upper_gradient(self, train: Batch, val: Batch) -> tuple[list[torch.Tensor], dict]:
        """g_alpha for the configured order (does not change any parameter or optimiser)."""
        alpha = list(self.alpha.values())
        if self.order == "first":
            lv, ce = self.loss(val)
            return list(torch.autograd.grad(lv, alpha)), {"val_loss": ce}
        w = list(self.w.values())
        lt, train_ce = self.loss(train)
        g_train = torch.autograd.grad(lt, w)
        self._g_train = g_train  # reused by the real step
        xi = self.sched.get_last_lr()[0]
        w_virtual = [
            (p - xi * g).detach().requires_grad_(True) for p, g in zip(w, g_train, strict=True)
        ]
        lv, ce = self.loss(val, w_virtual)
        grads = torch.autograd.grad(lv, w_virtual + alpha)
        v, g_alpha = grads[: len(w)], grads[len(w) :]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in v))
        eps = self.fd_scale / norm.clamp_min(1e-12)
        with torch.no_grad():
            w_plus = [p + eps.to(p.dtype) * d for p, d in zip(w, v, strict=True)]
            w_minus = [p - eps.to(p.dtype) * d for p, d in zip(w, v, strict=True)]
        g_plus = torch.autograd.grad(self.loss(train, w_plus)[0], alpha)
        g_minus = torch.autograd.grad(self.loss(train, w_minus)[0], alpha)
        hvp = [(gp - gm) / (2 * eps.to(gp.dtype)) for gp, gm in zip(g_plus, g_minus, strict=True)]
        info = {"val_loss": ce, "train_loss": train_ce}
        return [g - xi * h for g, h in zip(g_alpha, hvp, strict=True)], info

    # -- one step -------------------------------------------------------------------
    def step(self, train: Batch, val: Batch) -> dict[str, float]:
        self.model.train()
        g_alpha, info = self.upper_gradient(train, val)
        for p, g in zip(self.alpha.values(), g_alpha, strict=True):
            p.grad = g
        self.opt_alpha.step()
        self.opt_alpha.zero_grad(set_to_none=True)
        if self.order == "first":
            lt, ce = self.loss(train)
            g_w = torch.autograd.grad(lt, list(self.w.values()))
            info["train_loss"] = ce
        else:
            g_w, self._g_train = self._g_train, None
        for p, g in zip(self.w.values(), g_w, strict=True):
            p.grad = g
        self.opt_w.step()
        self.opt_w.zero_grad(set_to_none=True)
        self.sched.step()
        self.step_count += 1
        return {k: float(v) for k, v in info.items()}
