"""GuidedSelection vectors (GSVs): learnable prefix selectors for expert counts and ranks.

Per module, an expert GSV g_E (N_max,) and, per expert j, a rank GSV g_R,j (R_max,).
Each selects a prefix: with s = sigmoid(g), n = argmax(s) + 1 (experts: at least top_k);
the mask is m_t = 1 for t < n, else 0. The argmax has no gradient, so the method's
straight-through rule sends the whole gradient to the argmax index i*:

    dL/ds_i* = sum_{t < n} dL/dm_t * s_t          (prefix sum weighted by s)

and then through the sigmoid. Rank GSVs also leak 1e-4 * dL/dm_i to every other index.
(ALGORITHM.md section 3.)
"""

from __future__ import annotations

import torch
from torch import nn

RANK_LEAK = 1e-4


class PrefixMask(torch.autograd.Function):
    """(..., N) logits -> (..., N) 0/1 prefix mask with the GuiLoMo straight-through gradient."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, min_n: int, leak: float) -> torch.Tensor:  # noqa: ANN001
        s = torch.sigmoid(g)
        idx = s.argmax(dim=-1, keepdim=True)  # (..., 1)
        n = (idx + 1).clamp_min(min_n)  # (..., 1)
        positions = torch.arange(g.shape[-1], device=g.device)
        mask = (positions < n).to(g.dtype)  # (..., N)
        ctx.save_for_backward(s, idx, mask)
        ctx.leak = leak
        return mask

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):  # noqa: ANN001
        s, idx, mask = ctx.saved_tensors
        prefix = (grad_mask * s * mask).sum(dim=-1, keepdim=True)  # (..., 1)
        grad_s = (ctx.leak * grad_mask).scatter(-1, idx, prefix)  # whole sum to argmax index
        return grad_s * s * (1 - s), None, None


def prefix_mask(g: torch.Tensor, min_n: int = 1, leak: float = 0.0) -> torch.Tensor:
    return PrefixMask.apply(g, min_n, leak)


class ModuleGsv(nn.Module):
    """The GSVs of one search-mode module: N_max experts of rank R_max each."""

    def __init__(
        self,
        *,
        max_experts: int,
        max_rank: int,
        top_k: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if top_k > max_experts:
            raise ValueError(f"top_k ({top_k}) is larger than max_experts ({max_experts})")
        self.top_k = top_k
        # The method's initialisation: softmax of a standard normal draw.
        self.expert = nn.Parameter(torch.randn(max_experts, generator=generator).softmax(-1))
        self.rank = nn.Parameter(
            torch.randn(max_experts, max_rank, generator=generator).softmax(-1)
        )

    def expert_mask(self) -> torch.Tensor:
        """(N_max,) 0/1: the first max(top_k, argmax+1) experts are active."""
        return prefix_mask(self.expert, self.top_k)

    def rank_mask(self) -> torch.Tensor:
        """(N_max, R_max) 0/1: expert j keeps its first argmax(g_R,j)+1 rank components."""
        return prefix_mask(self.rank, 1, RANK_LEAK)

    @torch.no_grad()
    def choice(self) -> tuple[int, list[int]]:
        """(experts, ranks of the active experts) this GSV selects now."""
        n = max(self.top_k, int(self.expert.argmax()) + 1)
        ranks = (self.rank.argmax(dim=-1) + 1)[:n].tolist()
        return n, ranks
