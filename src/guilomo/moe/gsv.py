"""GuidedSelection vectors (GSVs): learnable selectors of each module's expert count and ranks.

Per module, an expert GSV g_E (N_max,) and, per expert j, a rank GSV g_R,j (R_max,). Two
estimators read them (ALGORITHM.md sections 3 and 3b):

``expected`` (the default). Each GSV holds the logits of a categorical distribution over a
count: p_R,j = softmax(g_R,j / tau) over ranks 1..R_max, p_E = softmax(g_E / tau) over
expert counts 1..N_max with the mass of counts below top_k folded into top_k (q_n). The
layer uses expectations, so plain autograd differentiates them:

- rank gate m_j,t = P(r_j >= t) = sum_{r >= t} p_R,j,r, in place of the 0/1 mask (the layer
  is linear in it: the output is the expected output over r);
- routing weights sum_n q_n TopK_k(softmax of the router logits over experts 1..n), the
  expectation over the count (see `Router.forward`'s `count_probs`).

``reference`` (the paper's code, for users who want its behaviour). With s = sigmoid(g) and
n = argmax(s) + 1 (experts: at least top_k), the expert mask is *added* to the router logits
(+0.5 for the first n experts, -1e4 beyond) and the rank mask scales rank components by 1
(first r) or 1e-4 (beyond). Their backward is the straight-through rule: the whole gradient
goes to the argmax index i*,

    dL/ds_i* = sum_{t < n} dL/dm_t * s_t          (prefix sum weighted by s)

then through the sigmoid; rank GSVs also leak 1e-4 * dL/dm_i to every other index.

Extraction takes the mode of each distribution (`choice`); for ``expected`` that is the mode
of q (folded) and the argmax of each g_R,j, for ``reference`` the argmax of sigmoid(g).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import ESTIMATORS, Estimator

RANK_LEAK = 1e-4  # reference: the gradient leak to other rank indices, and the "off" scale
EXPERT_ON, EXPERT_OFF = 0.5, -1e4  # reference: added to the router logits
REFERENCE_INIT_STD = 0.02  # reference: A and B ~ N(0, 0.02) in the search stage


class PrefixMask(torch.autograd.Function):
    """(..., N) logits -> (..., N) prefix mask, `on` for the first n, `off` beyond, with the
    GuiLoMo straight-through gradient (n = max(min_n, argmax(sigmoid(g)) + 1))."""

    @staticmethod
    def forward(ctx, g, min_n, leak, on, off):  # noqa: ANN001
        s = torch.sigmoid(g)
        idx = s.argmax(dim=-1, keepdim=True)  # (..., 1)
        n = (idx + 1).clamp_min(min_n)  # (..., 1)
        positions = torch.arange(g.shape[-1], device=g.device)
        active = positions < n  # (..., N)
        ctx.save_for_backward(s, idx, active)
        ctx.leak = leak
        return torch.where(active, on, off).to(g.dtype)

    @staticmethod
    def backward(ctx, grad_mask):  # noqa: ANN001
        s, idx, active = ctx.saved_tensors
        prefix = (grad_mask * s * active).sum(dim=-1, keepdim=True)  # (..., 1)
        grad_s = (ctx.leak * grad_mask).scatter(-1, idx, prefix)  # whole sum to argmax index
        return grad_s * s * (1 - s), None, None, None, None


def prefix_mask(
    g: torch.Tensor, min_n: int = 1, leak: float = 0.0, on: float = 1.0, off: float = 0.0
) -> torch.Tensor:
    return PrefixMask.apply(g, min_n, leak, on, off)


def fold_counts(p: torch.Tensor, top_k: int) -> torch.Tensor:
    """(..., N) distribution over counts 1..N -> the same with the mass of counts below
    top_k moved onto top_k (a module never has fewer experts than a token uses)."""
    if top_k <= 1:
        return p
    low = p[..., :top_k].sum(dim=-1, keepdim=True)
    return torch.cat([torch.zeros_like(p[..., : top_k - 1]), low, p[..., top_k:]], dim=-1)


def at_least(p: torch.Tensor) -> torch.Tensor:
    """(..., N) distribution over counts 1..N -> (..., N) P(count >= t) for t = 1..N."""
    return p.flip(-1).cumsum(-1).flip(-1)


def count_distributions(
    expert: torch.Tensor, rank: torch.Tensor, *, top_k: int, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSVs (..., N) and (..., N, R) -> q over expert counts (..., N) and p over each
    expert's rank (..., N, R) (the ``expected`` estimator's reading)."""
    q = fold_counts(torch.softmax(expert / tau, dim=-1), top_k)
    return q, torch.softmax(rank / tau, dim=-1)


def expected_choice(
    expert: torch.Tensor, rank: torch.Tensor, *, top_k: int, tau: float, estimator: Estimator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The expected expert count (...,) and the expected rank per expert (..., N) under the
    estimator's distribution; for ``reference`` (a point choice) its counts as floats.
    Works on stacked GSVs, e.g. a search's history (steps, modules, N)."""
    if estimator == "reference":
        n = (torch.sigmoid(expert).argmax(-1) + 1).clamp_min(top_k)
        r = torch.sigmoid(rank).argmax(-1) + 1
        return n.to(expert.dtype), r.to(rank.dtype)
    q, p = count_distributions(expert, rank, top_k=top_k, tau=tau)
    counts = torch.arange(1, expert.shape[-1] + 1, dtype=q.dtype, device=q.device)
    ranks = torch.arange(1, rank.shape[-1] + 1, dtype=p.dtype, device=p.device)
    return (q * counts).sum(-1), (p * ranks).sum(-1)


class ModuleGsv(nn.Module):
    """The GSVs of one search-mode module: N_max experts of rank R_max each."""

    def __init__(
        self,
        *,
        max_experts: int,
        max_rank: int,
        top_k: int,
        estimator: Estimator = "expected",
        tau: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if top_k > max_experts:
            raise ValueError(f"top_k ({top_k}) is larger than max_experts ({max_experts})")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")
        if not tau > 0:
            raise ValueError(f"tau ({tau}) must be > 0")
        self.top_k, self.estimator, self.tau = top_k, estimator, tau
        # The method's initialisation: softmax of a standard normal draw. The expected
        # estimator starts the expert GSV flat (every count equally likely), so that every
        # expert gets routed tokens and trains before the count is decided: from a peaked
        # start, experts past the mode get almost no weight and the count cannot grow.
        expert = torch.randn(max_experts, generator=generator).softmax(-1)
        if estimator == "expected":
            expert = torch.zeros(max_experts)
        self.expert = nn.Parameter(expert)
        self.rank = nn.Parameter(
            torch.randn(max_experts, max_rank, generator=generator).softmax(-1)
        )
        self._reading: tuple[torch.Tensor, torch.Tensor] | None = None  # see `read_together`

    # -- what the layer uses -------------------------------------------------------------
    def count_probs(self) -> torch.Tensor:
        """``expected``: (N_max,) q_n, the probability that the module has n experts."""
        if self._reading is not None:
            return self._reading[0]
        return count_distributions(self.expert, self.rank, top_k=self.top_k, tau=self.tau)[0]

    def logit_mask(self) -> torch.Tensor:
        """``reference``: (N_max,) +0.5 for the first max(top_k, argmax+1) experts, -1e4
        beyond, added to the router logits, with the straight-through gradient."""
        return prefix_mask(self.expert, self.top_k, 0.0, EXPERT_ON, EXPERT_OFF)

    def rank_gates(self) -> torch.Tensor:
        """(N_max, R_max) per-rank-component gates: P(r_j >= t) (``expected``), or 1 for the
        first argmax+1 components and 1e-4 beyond (``reference``)."""
        if self.estimator == "reference":
            return prefix_mask(self.rank, 1, RANK_LEAK, 1.0, RANK_LEAK)
        if self._reading is not None:
            return self._reading[1]
        return at_least(torch.softmax(self.rank / self.tau, dim=-1))

    # -- what the search reads -----------------------------------------------------------
    def expected_parameters(self, d_in: int, d_out: int) -> torch.Tensor:
        """E[trainable parameters] of the module (``expected``), see `expected_size`."""
        return expected_size(self.count_probs(), self.rank_gates(), d_in, d_out)

    @torch.no_grad()
    def choice(self) -> tuple[int, list[int]]:
        """(experts, ranks of the active experts) this GSV selects now: each mode."""
        return choose(
            self.expert, self.rank, top_k=self.top_k, estimator=self.estimator, tau=self.tau
        )


def expected_size(
    q: torch.Tensor, gates: torch.Tensor, d_in: torch.Tensor | int, d_out: torch.Tensor | int
) -> torch.Tensor:
    """E[trainable parameters] from q (..., N) and the rank gates (..., N, R), batched over
    leading dims: sum_j P(n >= j) * (d_in + d_out) * E[r_j], plus the router's d_in per
    expert when n > 1 (E[r_j] is the sum of its gates P(r_j >= t))."""
    keep = at_least(q)  # (..., N) P(n >= j)
    counts = torch.arange(1, q.shape[-1] + 1, dtype=q.dtype, device=q.device)
    router = (q * counts).sum(-1) - q[..., 0]  # E[n * 1(n > 1)]
    return (d_in + d_out) * (keep * gates.sum(-1)).sum(-1) + d_in * router


def read_together(gsvs: Sequence[ModuleGsv]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Compute the q and rank gates of many ``expected`` GSVs of one shape in one batched
    pass (stacked, so a few ops for the whole model instead of about ten per module); each
    module's `count_probs` and `rank_gates` return its row until `forget` clears them. The
    search calls it before every forward of the model, so the values are those of the
    parameters at that time. Returns the stacked q (M, N) and gates (M, N, R), or None
    when the GSVs differ in shape or estimator (then each module reads its own)."""
    first = gsvs[0] if gsvs else None
    if first is None or any(
        (g.estimator, g.top_k, g.tau, g.rank.shape)
        != ("expected", first.top_k, first.tau, first.rank.shape)
        for g in gsvs
    ):
        return None
    q, p = count_distributions(
        torch.stack([g.expert for g in gsvs]),
        torch.stack([g.rank for g in gsvs]),
        top_k=first.top_k,
        tau=first.tau,
    )
    gates = at_least(p)
    for g, q_m, gates_m in zip(gsvs, q.unbind(0), gates.unbind(0), strict=True):
        g._reading = (q_m, gates_m)
    return q, gates


def forget(gsvs: Sequence[ModuleGsv]) -> None:
    for g in gsvs:
        g._reading = None


def modes(
    expert: torch.Tensor, rank: torch.Tensor, *, top_k: int, estimator: Estimator, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mode of each distribution, batched over leading dims: expert counts (...,) and
    the rank of every expert slot (..., N) (slots past the count are not selected).
    experts = the most likely count of q (``expected``, counts below top_k folded into
    top_k) or max(top_k, argmax + 1) (``reference``); rank_j = argmax g_R,j + 1 (softmax
    and sigmoid keep the argmax)."""
    if estimator == "expected":
        n = fold_counts(torch.softmax(expert.double() / tau, -1), top_k).argmax(-1) + 1
    else:
        n = (expert.argmax(-1) + 1).clamp_min(top_k)
    return n, rank.argmax(-1) + 1


def choose(
    expert: torch.Tensor, rank: torch.Tensor, *, top_k: int, estimator: Estimator, tau: float
) -> tuple[int, list[int]]:
    """One module's mode (see `modes`) as (experts, ranks of the selected experts)."""
    n, ranks = modes(expert, rank, top_k=top_k, estimator=estimator, tau=tau)
    return int(n), ranks[: int(n)].tolist()
