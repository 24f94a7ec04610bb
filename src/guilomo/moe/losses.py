"""Auxiliary router losses, computed outside the layers from their routing records.

All of them ignore padded tokens. Per module m with E_m experts (ALGORITHM.md section 1-2):

- balance (Switch/Mixtral): f_i = share of the routed slots that went to expert i,
  P_i = mean router probability of expert i; aux_m = E_m * sum_i f_i P_i (1 when balanced);
- z-loss (ST-MoE / MixLoRA switch): mean over tokens of logsumexp(logits)^2;
- localized balancing (LoRAMoE): experts split into groups, each example has a task type;
  I[b,e] = 1 + beta for experts of the example's group, 1 - beta otherwise;
  Q[b,e] = sum over the example's tokens of the gate; loss = CV^2(I * Q) = Var / mean^2.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .config import LossConfig
from .layer import RoutingRecord


def _valid(record: RoutingRecord) -> torch.Tensor:
    """(N, 1) float weights: 1 for real tokens, 0 for padding."""
    w = record.routing.probs
    if record.token_mask is None:
        return w.new_ones(w.shape[0], 1)
    return record.token_mask.to(w.dtype)[:, None]


def balance_loss(record: RoutingRecord) -> torch.Tensor:
    """E * sum_i f_i P_i, E the number of active experts (the search masks some out)."""
    r = record.routing
    valid = _valid(record)
    sel = r.selected.to(r.probs.dtype) * valid  # (N, E)
    f = sel.sum(dim=0) / sel.sum().clamp_min(1.0)  # (E,) share of routed slots
    p = (r.probs * valid).sum(dim=0) / valid.sum().clamp_min(1.0)  # (E,) mean probability
    e = r.active if r.active is not None else r.probs.shape[1]
    return e * (f * p).sum()


def z_loss(record: RoutingRecord) -> torch.Tensor:
    valid = _valid(record)[:, 0]
    lse = torch.logsumexp(record.routing.logits, dim=-1)  # (N,)
    return (lse.square() * valid).sum() / valid.sum().clamp_min(1.0)


def expert_groups(experts: int, groups: int) -> torch.Tensor:
    """(E,) group of each expert: contiguous, as equal as possible."""
    return torch.arange(experts) * groups // experts


def localized_balance_loss(
    record: RoutingRecord, task_types: torch.Tensor, *, groups: int, beta: float
) -> torch.Tensor:
    """LoRAMoE's localized balancing constraint for one module."""
    r = record.routing
    if len(record.batch_shape) != 2:
        raise ValueError("localized balancing needs (batch, tokens) inputs")
    b, t = record.batch_shape
    e = r.weights.shape[1]
    if task_types.shape != (b,):
        raise ValueError(f"task_types must have shape ({b},), got {tuple(task_types.shape)}")
    gates = (r.weights * _valid(record)).view(b, t, e)  # (B, T, E)
    q = gates.sum(dim=1)  # (B, E)
    same = expert_groups(e, groups).to(task_types.device)[None, :] == task_types[:, None]
    importance = torch.where(same, 1.0 + beta, 1.0 - beta).to(q.dtype)  # (B, E)
    iq = (importance * q).flatten()
    return iq.var() / iq.mean().square().clamp_min(1e-10)


def aux_loss(
    records: Iterable[RoutingRecord],
    config: LossConfig,
    task_types: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The weighted sum of the enabled auxiliary losses over modules, or None if none apply."""
    total: torch.Tensor | None = None
    for rec in records:
        parts = []
        if config.balance_coef > 0:
            parts.append(config.balance_coef * balance_loss(rec))
        if config.z_loss_coef > 0:
            parts.append(config.z_loss_coef * z_loss(rec))
        if config.localized_coef > 0:
            if task_types is None:
                raise ValueError(
                    "losses.localized_coef > 0 needs each example's task type: call "
                    "adapter.set_task_types(...) before the forward"
                )
            parts.append(
                config.localized_coef
                * localized_balance_loss(
                    rec, task_types, groups=config.localized_groups, beta=config.localized_beta
                )
            )
        for p in parts:
            total = p if total is None else total + p
    return total
