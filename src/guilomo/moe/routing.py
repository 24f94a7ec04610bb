"""Routers: from router logits to dense per-token expert weights.

Every router returns a `Routing` with dense (tokens, experts) tensors: the weights (zero for
experts a token does not use), which experts were selected, the logits and the softmax
probabilities. Dense outputs let the layer gate its experts with one matmul and no host
sync; there is no `.item()`, `.tolist()` or `nonzero` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import RouterConfig


@dataclass
class Routing:
    weights: torch.Tensor  # (N, E) fp32, zero where not selected
    selected: torch.Tensor  # (N, E) bool
    logits: torch.Tensor  # (N, E) fp32
    probs: torch.Tensor  # (N, E) fp32 softmax of logits (masked experts get 0)
    active: torch.Tensor | None = None  # () number of unmasked experts, None = all


def topk_route(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the probabilities, renormalised over the k chosen (Mixtral convention).

    With k = 1 the weight is exactly 1 and carries no gradient: p / p has derivative zero,
    but autograd's 1/p - p/p^2 leaves rounding noise (about 1e-10) that Adam, which divides
    by the gradient's own size, would turn into router steps of the full learning rate.
    """
    top_p, top_i = probs.topk(k, dim=-1)  # (N, k)
    if k == 1:
        top_p = torch.ones_like(top_p)
    else:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(1, top_i, top_p)  # (N, E)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_i, True)
    return weights, selected


def switch_route(
    probs: torch.Tensor, capacity_factor: float, token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 with expert capacity: tokens past an expert's capacity are dropped (weight 0).

    The weight of the kept expert is its probability (Switch Transformer). Capacity is
    ceil(capacity_factor * valid tokens / experts) with the token count taken from the
    shape when there is no mask, so no host sync; padded tokens neither use nor count
    towards capacity. Tokens claim capacity in order.
    """
    n, e = probs.shape
    top_p, top_i = probs.max(dim=-1)  # (N,)
    onehot = F.one_hot(top_i, e).to(probs.dtype)  # (N, E)
    if token_mask is not None:
        onehot = onehot * token_mask[:, None].to(probs.dtype)
        valid = token_mask.sum().to(probs.dtype)
    else:
        valid = torch.tensor(float(n), dtype=probs.dtype, device=probs.device)
    capacity = torch.ceil(capacity_factor * valid / e)
    position = onehot.cumsum(dim=0)  # (N, E): 1-based slot of each token in its expert
    selected = (onehot > 0) & (position <= capacity)
    weights = torch.where(selected, top_p[:, None].expand(n, e), torch.zeros_like(probs))
    return weights, selected


def top_p_route(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of experts whose probability mass reaches `top_p`, renormalised."""
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (N, E)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the experts ranked above
    keep_sorted = mass_before < top_p  # the first expert is always kept
    selected = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    kept = probs * selected
    weights = kept / kept.sum(dim=-1, keepdim=True)
    return weights, selected


def threshold_route(
    probs: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts whose probability exceeds the token's threshold, weights relu(p - tau) renormalised.

    `threshold` is (N, 1). Since tau <= 1/E <= max p, at least one expert clears it.
    """
    excess = F.relu(probs - threshold)  # (N, E)
    selected = excess > 0
    weights = excess / (excess.sum(dim=-1, keepdim=True) + 1e-9)
    return weights, selected


class Router(nn.Module):
    """Linear router (no bias) plus the routing rule of `config.kind`."""

    def __init__(self, *, in_features: int, experts: int, top_k: int, config: RouterConfig) -> None:
        super().__init__()
        self.experts = experts
        self.top_k = top_k
        self.config = config
        self.weight = nn.Parameter(torch.empty(experts, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if config.kind == "threshold":
            self.threshold = nn.Linear(in_features, 1)
        self.max_threshold = config.max_threshold or 1.0 / experts

    def jitters(self) -> bool:
        cfg = self.config
        return cfg.kind == "switch" and self.training and cfg.jitter_noise > 0

    def forward(
        self,
        x: torch.Tensor,
        *,
        token_mask: torch.Tensor | None = None,
        logit_mask: torch.Tensor | None = None,
        count_probs: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
    ) -> Routing:
        """x: (N, d_in). `logits` (N, E), when the caller computed x @ W_r^T already (see
        `takes_logits`), skips that matmul. The search's GSVs come in one of two ways:

        - `logit_mask` (E,), added to the logits (the reference estimator: +0.5 for active
          experts, -1e4 for the others);
        - `count_probs` (E,) q_n, the probability that the module has n experts (the
          expected estimator): the weights are sum_n q_n route(softmax over experts 1..n),
          the expectation over the count; `probs` likewise, `selected` every expert some
          count selects, `active` E[n].
        """
        cfg = self.config
        if self.jitters():
            x = x * torch.empty_like(x).uniform_(1 - cfg.jitter_noise, 1 + cfg.jitter_noise)
        # fp32 at least (bf16 softmax and top-k are too coarse), fp64 for fp64 models
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        if logits is None:
            logits = F.linear(x.to(self.weight.dtype), self.weight)
        logits = logits.to(acc)  # (N, E)
        if logit_mask is not None:
            logits = logits + logit_mask.to(acc)
        if count_probs is None:
            probs = logits.softmax(dim=-1)
            weights, selected = self._rule(probs, x, token_mask)
            # experts the mask does not push to -inf take part (the balance loss's E)
            active = None if logit_mask is None else (logit_mask >= 0).sum()
            return Routing(
                weights=weights, selected=selected, logits=logits, probs=probs, active=active
            )
        q = count_probs.to(acc)
        e = logits.shape[1]
        active = q @ self._counts(e, q)  # E[n]
        if cfg.kind == "topk":  # every count at once: (M, N, E) for the M counts >= top_k
            return self._expected_topk(logits, q, active)
        weights = probs = selected = None
        for n in range(self.top_k, e + 1):  # q_n = 0 below top_k
            p_n = logits[:, :n].softmax(dim=-1)
            if n < e:
                p_n = F.pad(p_n, (0, e - n))
            w_n, s_n = self._rule(p_n, x, token_mask)
            weights = q[n - 1] * w_n if weights is None else weights + q[n - 1] * w_n
            probs = q[n - 1] * p_n if probs is None else probs + q[n - 1] * p_n
            selected = s_n if selected is None else selected | s_n
        return Routing(
            weights=weights, selected=selected, logits=logits, probs=probs, active=active
        )

    def _expected_topk(
        self, logits: torch.Tensor, q: torch.Tensor, active: torch.Tensor
    ) -> Routing:
        """sum_n q_n TopK(softmax over experts 1..n), n = top_k..E, in one batched pass.

        Each count's picks come from the logits masked once per count into (tokens, counts,
        experts), without gradient; the picked logits are then gathered from (tokens,
        experts). The renormalised top-k weights of a softmax are the softmax of the k largest
        logits (for k = 2 the sigmoid of their gap), so top-k needs no softmax over all
        experts, and the k picks of every count are scatter-added into one (tokens, experts)
        tensor. The expected probabilities (for the balance loss) are
        e_i * sum_{n >= i} q_n / S_n with e = exp(logits - max) and S_n the sum of the first
        n of them (q_n = 0 below top_k, as `count_probs` folds it): one product with a
        triangular 0/1 matrix, five times cheaper on CPU than a (tokens, counts, experts)
        softmax. In fp64 with the
        exponent clamped at -700, so a prefix whose logits all lie far below the maximum
        cannot underflow to 0 / 0 (beyond 700 its experts count as equal, where fp32 would
        give NaN)."""
        k, (n, e) = self.top_k, logits.shape
        beyond = self._beyond(e, logits.device)
        qm = q[k - 1 :, None]  # (M, 1): q_n of each count n = top_k..E
        with torch.no_grad():  # which experts: no gradient; their logits are gathered below
            masked = logits.detach()[:, None, :].masked_fill(beyond, float("-inf"))
            top_i = masked.topk(k, -1).indices  # (N, M, k), each count's picks, sorted
        # the picked logits straight from (N, E): the backward is one small scatter-add
        # instead of a (tokens, counts, experts) scatter, masked fill and sum
        top_l = logits.gather(1, top_i.reshape(n, -1)).view(n, -1, k)  # (N, M, k)
        if k == 1:
            top_w = torch.ones_like(top_l) * qm
        elif k == 2:  # the softmax of two sorted logits: sigmoid of their gap (one cheap op)
            s = torch.sigmoid(top_l[..., :1] - top_l[..., 1:]) * qm  # (N, M, 1)
            top_w = torch.cat([s, qm - s], -1)
        else:
            top_w = top_l.softmax(-1) * qm
        weights = torch.zeros_like(logits).scatter_add(
            1, top_i.reshape(n, -1), top_w.reshape(n, -1)
        )  # (N, E)
        top = top_l[:, -1, :1].detach()  # the largest logit: count E's first pick
        shifted = (logits - top).double()
        ex = shifted.clamp_min(-700.0).exp()  # (N, E)
        r = q.double() / ex.cumsum(-1)  # (N, E): q_n / S_n
        # sum_{n >= i} r_n, by a triangular 0/1 matrix (a total minus a prefix sum would
        # cancel catastrophically where an early S_n is tiny; flip-cumsum-flip is slower)
        probs = (ex * (r @ self._upper(e, logits.device))).to(q.dtype)
        # every count has q_n > 0 (a softmax), so an expert some count picks has weight > 0
        return Routing(
            weights=weights, selected=weights > 0, logits=logits, probs=probs, active=active
        )

    def _counts(self, e: int, q: torch.Tensor) -> torch.Tensor:
        """(E,) the counts 1..E in q's dtype (cached)."""
        if getattr(self, "_counts_key", None) != (e, q.dtype, q.device):
            self._counts_cache = torch.arange(1, e + 1, dtype=q.dtype, device=q.device)
            self._counts_key = (e, q.dtype, q.device)
        return self._counts_cache

    def _upper(self, e: int, device: torch.device) -> torch.Tensor:
        """(E, E) fp64 0/1 matrix U[n, i] = 1 where count n + 1 includes expert i (cached)."""
        if getattr(self, "_upper_key", None) != (e, device):
            experts = torch.arange(e, device=device)
            self._upper_mask = (experts[:, None] >= experts[None, :]).double()
            self._upper_key = (e, device)
        return self._upper_mask

    def _beyond(self, e: int, device: torch.device) -> torch.Tensor:
        """(M, E) True beyond the first n experts, for the M counts n = top_k..E (cached)."""
        if getattr(self, "_beyond_key", None) != (e, device):
            counts = torch.arange(self.top_k, e + 1, device=device)
            self._beyond_mask = torch.arange(e, device=device)[None, :] >= counts[:, None]
            self._beyond_key = (e, device)
        return self._beyond_mask

    def _rule(
        self, probs: torch.Tensor, x: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if cfg.kind == "topk":
            return topk_route(probs, self.top_k)
        if cfg.kind == "switch":
            return switch_route(probs, cfg.capacity_factor, token_mask)
        if cfg.kind == "soft":
            return probs, probs > 0
        if cfg.kind == "top_p":
            return top_p_route(probs, cfg.top_p)
        # threshold
        tau = self.max_threshold * torch.sigmoid(self.threshold(x.to(self.weight.dtype))).float()
        return threshold_route(probs, tau)
