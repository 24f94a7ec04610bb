"""The LoRA-MoE layers: one compute path with no loop over experts, plus the eager reference.

`LoraMoeLinear` wraps a frozen `nn.Linear` W0 (d_out x d_in):

    y = W0 x + sum_e w_e(x) * (alpha / r_e) * B_e A_e dropout(x)

All experts' A are stored concatenated along the rank (R = sum_e r_e rows, no padding) and
all B likewise (R columns). The router's dense weights (N, E) are spread over the rank
columns by one tiny matmul with a fixed (E, R) matrix that also holds alpha / r_e, so the
experts cost two thin matmuls whatever E, the ranks or the routing rule.

`MixLoraMlp` wraps a LLaMA-style MLP block: each expert is the whole feed-forward network
with its own LoRA on gate, up and down, and one router per layer picks the experts
(MixLoRA). The base projections run once per token; only the rank-R LoRA parts run per
selected expert slot.

Router outputs leave through a side channel (`RoutingState`), not the return value, so the
wrapped model keeps its signature and the trainer adds the auxiliary losses.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModuleAllocation, MoeConfig
from .gsv import ModuleGsv
from .routing import Router, Routing

ExpertImpl = Literal["fused", "eager"]


@dataclass
class RoutingRecord:
    routing: Routing
    token_mask: torch.Tensor | None  # (N,) bool, None = all tokens valid
    batch_shape: tuple[int, ...]  # leading shape of the input, e.g. (B, T)


@dataclass
class RoutingState:
    """Shared by every MoE layer of one adapted model: the side channel in and out.

    In: the padding mask of the current batch (set by a pre-hook from `attention_mask`)
    and, for LoRAMoE's localized balancing, each example's task type. Out: each layer's
    routing record of the last forward, and running per-expert token counts.
    """

    attention_mask: torch.Tensor | None = None  # (B, T_total) as given to the model
    task_types: torch.Tensor | None = None  # (B,) long
    records: dict[str, RoutingRecord] = field(default_factory=dict)
    collect_stats: bool = True
    counts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (E,) selections
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> () valid tokens
    recomputing: bool = False  # inside activation checkpointing's recomputation

    @contextmanager
    def recomputation(self) -> Iterator[None]:
        """The backward's re-run of a checkpointed forward: its routing was recorded (and its
        losses counted) by the forward already, so nothing is recorded again."""
        self.recomputing = True
        try:
            yield
        finally:
            self.recomputing = False

    def token_mask(self, lead_shape: tuple[int, ...]) -> torch.Tensor | None:
        """The padding mask flattened to match an input of leading shape `lead_shape`."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or len(lead_shape) != 2:
            return None
        b, t = lead_shape
        if mask.shape[0] != b or mask.shape[1] < t:
            return None
        return mask[:, -t:].reshape(-1).bool()  # the last t positions (generation with cache)

    def record(self, name: str, routing: Routing, mask: torch.Tensor | None, lead: tuple) -> None:
        if self.recomputing:
            return
        self.records[name] = RoutingRecord(routing, mask, lead)
        if self.collect_stats:
            sel = routing.selected.detach()
            valid = sel.new_ones(sel.shape[0]) if mask is None else mask
            count = (sel & valid[:, None]).sum(dim=0)
            n = valid.sum()
            if name in self.counts:
                self.counts[name] = self.counts[name] + count
                self.tokens[name] = self.tokens[name] + n
            else:
                self.counts[name], self.tokens[name] = count, n


class _SharedInput(torch.autograd.Function):
    """y0 = x W0^T + b (W0 frozen) and z = x C^T (C = [A; W_router], trainable) from one x.

    The backward builds the input gradient once, grad_y0 W0 with grad_z C added in place by
    addmm_, instead of two products summed by autograd (a full (N, d_in) add saved).
    """

    @staticmethod
    def forward(ctx, x, w0, bias, c):  # noqa: ANN001
        ctx.save_for_backward(x, w0, c)
        return F.linear(x, w0, bias), F.linear(x, c)  # (N, d_out), (N, R + E)

    @staticmethod
    def backward(ctx, grad_y0, grad_z):  # noqa: ANN001
        x, w0, c = ctx.saved_tensors
        grad_x = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y0 @ w0).addmm_(grad_z, c)  # (N, d_in)
        if ctx.needs_input_grad[3]:
            grad_c = (x.t() @ grad_z).t()  # (R + E, d_in); this layout is the faster GEMM
        return grad_x, None, None, grad_c


class _SharedInputDropout(torch.autograd.Function):
    """With dropout: y0 = x W0^T + b, router logits x W_r^T and u = drop(x) A^T from one x.

    `keep` is the dropout mask as bool. Only it and x are kept for the backward: one byte per
    input element for the mask, where one in the input's dtype takes 2 or 4, and drop(x) is
    rebuilt for grad_A. The 1/(1-p) scale is applied to A (R x d_in) rather than to the
    (N x d_in) input. The backward gathers dropout's backward and the three input-gradient
    terms into one (N, d_in) buffer, where autograd would sum three separate products.
    """

    @staticmethod
    def forward(ctx, x, w0, bias, a, w_router, keep, scale):  # noqa: ANN001
        ctx.save_for_backward(x, w0, a, w_router, keep)
        ctx.scale = scale
        u = F.linear(x * keep.to(x.dtype), a * scale)  # (N, R)
        return F.linear(x, w0, bias), F.linear(x, w_router), u

    @staticmethod
    def backward(ctx, grad_y0, grad_logits, grad_u):  # noqa: ANN001
        x, w0, a, w_router, keep = ctx.saved_tensors
        keep = keep.to(x.dtype)  # 0/1
        grad_x = grad_a = grad_router = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y0 @ w0).addmm_(grad_logits, w_router)  # (N, d_in)
            grad_x.addcmul_(grad_u @ a, keep, value=ctx.scale)
        if ctx.needs_input_grad[3]:
            grad_a = (grad_u.t() @ (x * keep)).mul_(ctx.scale)  # (R, d_in)
        if ctx.needs_input_grad[4]:
            # (E, d_in) directly: x^T grad_logits with only E columns is a far slower GEMM
            grad_router = grad_logits.t() @ x
        return grad_x, None, None, grad_a, grad_router, None, None


class LoraDropout(nn.Module):
    """Dropout on the experts' input (identity in eval mode or with p = 0).

    The keep mask is drawn as 16 random bits per element, four from each 64-bit draw of the
    generator, kept where they reach a threshold: 2.4 ms for 2048 x 1024 on 2 CPU cores,
    where `torch.rand(...) >= p` takes 6.2 ms and `nn.Dropout`'s Bernoulli draw 11.4 ms (the
    CPU generator is serial, so its draws are the cost). p is therefore rounded to a
    multiple of 2^-16 (0.05 becomes 0.0500031); kept inputs are scaled by 1 / (1 - that p),
    so the expected output is the input exactly.
    """

    BITS = 16

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        levels = 1 << self.BITS
        self.dropped_levels = min(round(p * levels), levels - 1)  # of the 2^16 bit patterns
        self.p_effective = self.dropped_levels / levels

    def active(self) -> bool:
        return self.training and self.dropped_levels > 0

    def keep(self, h: torch.Tensor) -> torch.Tensor:
        """The keep mask shaped like h, as bool; draws from the global RNG."""
        n = h.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=h.device)
        words.random_(-(1 << 63), None)  # all 64 bits uniform
        bits = words.view(torch.int16)[:n].view(h.shape)  # uniform over -2^15 .. 2^15 - 1
        return bits.ge(self.dropped_levels - (1 << (self.BITS - 1)))

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p_effective)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return h
        return h * self.keep(h).to(h.dtype) * self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _gate_to_cols(ranks: list[int], alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """(E, R) matrix: row e holds alpha / r_e on expert e's rank columns, 0 elsewhere."""
    total = sum(ranks)
    m = torch.zeros(len(ranks), total, dtype=dtype)
    start = 0
    for e, r in enumerate(ranks):
        m[e, start : start + r] = alpha / r
        start += r
    return m


def _offsets(ranks: list[int]) -> list[int]:
    out = [0]
    for r in ranks:
        out.append(out[-1] + r)
    return out


class _MoeBase(nn.Module):
    """What the two layer kinds share: allocation, router, dropout, side channel."""

    def __init__(
        self,
        *,
        base_layer: nn.Module,
        name: str,
        allocation: ModuleAllocation,
        config: MoeConfig,
        state: RoutingState | None = None,
        expert_impl: ExpertImpl = "fused",
    ) -> None:
        super().__init__()
        first = self._input_linear(base_layer)
        in_features, dtype = first.in_features, _adapter_dtype(first.weight)
        self.name = name
        self.allocation = allocation
        self.ranks = list(allocation.ranks)
        self.num_experts = allocation.experts
        self.expert_impl: ExpertImpl = expert_impl
        self.state = state
        self.gsv: ModuleGsv | None = None  # set in search mode (see guilomo.moe.search)
        self.dropout = LoraDropout(config.lora_dropout)
        # One expert needs no router: its gate is 1 (plain LoRA).
        self.router = (
            Router(
                in_features=in_features,
                experts=allocation.experts,
                top_k=allocation.top_k,
                config=config.router,
            ).to(dtype)
            if allocation.experts > 1
            else None
        )
        self.register_buffer(
            "gate_to_cols",
            _gate_to_cols(self.ranks, config.lora_alpha, dtype),
            persistent=False,
        )
        self.base_layer = base_layer
        self._add_lora(config, dtype, first.weight.device)
        self.to(first.weight.device)

    @staticmethod
    def _input_linear(base_layer: nn.Module) -> nn.Linear:
        """The linear layer the input enters (its width, dtype and device are the layer's)."""
        raise NotImplementedError

    def _add_lora(self, config: MoeConfig, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def _route(
        self, h: torch.Tensor, lead: tuple[int, ...], logits: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Dense routing weights (N, E) in fp32, or None for a single expert."""
        if self.router is None:
            return None
        mask = self.state.token_mask(lead) if self.state is not None else None
        gsv = {}
        if self.gsv is not None and self.gsv.estimator == "reference":
            gsv["logit_mask"] = self.gsv.logit_mask()
        elif self.gsv is not None:
            gsv["count_probs"] = self.gsv.count_probs()
        routing = self.router(h, token_mask=mask, logits=logits, **gsv)
        if self.state is not None:
            self.state.record(self.name, routing, mask, lead)
        return routing.weights

    def _lora_params(self, prefix: str) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, f"{prefix}lora_A"), getattr(self, f"{prefix}lora_B")

    def _expert_slices(self, prefix: str) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """Eager reference only: each expert's (A_e, B_e, scale_e) as views."""
        a, b = self._lora_params(prefix)
        off = _offsets(self.ranks)
        return [
            (a[off[e] : off[e + 1]], b[:, off[e] : off[e + 1]], float(self.gate_to_cols[e, off[e]]))
            for e in range(len(self.ranks))
        ]


def _new_lora(rows: int, in_features: int, out_features: int, dtype: torch.dtype, device):  # noqa: ANN001
    """A (R, d_in) kaiming-uniform like PEFT's lora_A; B (d_out, R) zero: delta starts at 0.

    A is drawn on the CPU, then moved: the same seed gives the same adapter on any device
    (CPU and CUDA generators differ), e.g. FSDP, which injects on the CPU, and DDP on GPUs."""
    a = torch.empty(rows, in_features, dtype=dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # bound depends on d_in only: per-expert init
    b = torch.zeros(out_features, rows, dtype=dtype, device=device)
    return nn.Parameter(a.to(device)), nn.Parameter(b)


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


class LoraMoeLinear(_MoeBase):
    """A frozen `nn.Linear` plus a mixture of LoRA experts with per-expert ranks."""

    @staticmethod
    def _input_linear(base_layer: nn.Module) -> nn.Linear:
        return base_layer

    def _add_lora(self, config: MoeConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.in_features = self.base_layer.in_features
        self.out_features = self.base_layer.out_features
        self.lora_A, self.lora_B = _new_lora(
            sum(self.ranks), self.in_features, self.out_features, dtype, device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = tuple(x.shape[:-1])
        h = x.reshape(-1, self.in_features)  # (N, d_in)
        base_out = None  # (N, d_out) when the shared-input function computed it
        # search mode: (R,) gates of the rank components (see guilomo.moe.gsv)
        ranks = self.gsv.rank_gates().flatten() if self.gsv is not None else None
        if self.expert_impl == "eager":
            result = self.base_layer(x)
            weights = self._route(h, lead)  # (N, E) or None
            delta = self._eager(self.dropout(h).to(self.lora_A.dtype), weights, ranks)
            return result + delta.view(*lead, self.out_features).to(result.dtype)
        a, base = self.lora_A, self.base_layer
        # a frozen nn.Linear base shares the input (and its gradient) with experts and router
        shared = type(base) is nn.Linear and not base.weight.requires_grad and h.dtype == a.dtype
        plain_router = self.router is not None and not self.router.jitters()
        if plain_router and not self.dropout.active():
            # no dropout: experts and router read the same input, so one matmul serves both
            c = torch.cat([a, self.router.weight])  # (R + E, d_in)
            if shared:
                base_out, z = _SharedInput.apply(h, base.weight, base.bias, c)  # (N, d_out)
            else:
                z = F.linear(h.to(a.dtype), c)  # (N, R + E)
            u, logits = z[:, : a.shape[0]], z[:, a.shape[0] :]
            weights = self._route(h, lead, logits)
        elif plain_router and shared:
            keep = self.dropout.keep(h)  # (N, d_in) bool
            base_out, logits, u = _SharedInputDropout.apply(
                h, base.weight, base.bias, a, self.router.weight, keep, self.dropout.scale
            )
            weights = self._route(h, lead, logits)
        else:
            weights = self._route(h, lead)
            u = F.linear(self.dropout(h).to(a.dtype), a)  # (N, R)
        if weights is None:
            g = self.gate_to_cols[0]  # (R,): one expert, gate 1
        else:
            g = weights.to(u.dtype) @ self.gate_to_cols  # (N, E) @ (E, R) -> (N, R)
        if ranks is not None:
            g = g * ranks.to(g.dtype)
        if base_out is None and type(self.base_layer) is nn.Linear:
            base_out = self.base_layer(h)  # (N, d_out)
        if base_out is not None and base_out.dtype == u.dtype:
            # The experts are added into the base output in place: neither nn.Linear's nor
            # _SharedInput's backward reads that output, and an out-of-place addmm would
            # first copy all N x d_out of it.
            return base_out.addmm_(u * g, self.lora_B.t()).view(*lead, self.out_features)
        result = self.base_layer(x) if base_out is None else base_out.view(*lead, -1)
        flat = result.reshape(-1, self.out_features)  # (N, d_out)
        if flat.dtype == u.dtype:  # add the experts into the base output in the same kernel
            return torch.addmm(flat, u * g, self.lora_B.t()).view_as(result)
        return result + F.linear(u * g, self.lora_B).view_as(result).to(result.dtype)

    def _eager(
        self, h: torch.Tensor, weights: torch.Tensor | None, ranks: torch.Tensor | None
    ) -> torch.Tensor:
        """Reference: a loop over experts, every expert on every token, weighted by its gate."""
        out = h.new_zeros(h.shape[0], self.out_features)
        off = _offsets(self.ranks)
        ranks = ranks.to(h.dtype) if ranks is not None else None
        for e, (a, b, scale) in enumerate(self._expert_slices("")):  # eager reference loop
            u = F.linear(h, a)
            if ranks is not None:
                u = u * ranks[off[e] : off[e + 1]]
            y = F.linear(u, b) * scale
            out = out + (y if weights is None else weights[:, e : e + 1].to(y.dtype) * y)
        return out


def is_llama_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) and all(
        isinstance(getattr(module, n), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")
    )


class MixLoraMlp(_MoeBase):
    """MixLoRA: experts are whole feed-forward networks sharing the frozen MLP weights.

    expert_e(x) = (W_d + dB_e) (act((W_g + dG_e) x) * (W_u + dU_e) x), each d* a LoRA of
    rank r_e scaled by alpha / r_e; y = sum_e w_e(x) expert_e(x) with one router per layer.
    """

    @staticmethod
    def _input_linear(base_layer: nn.Module) -> nn.Linear:
        return base_layer.gate_proj

    def _add_lora(self, config: MoeConfig, dtype: torch.dtype, device: torch.device) -> None:
        gate: nn.Linear = self.base_layer.gate_proj
        self.hidden, self.intermediate = gate.in_features, gate.out_features
        rows = sum(self.ranks)
        self.gate_lora_A, self.gate_lora_B = _new_lora(
            rows, self.hidden, self.intermediate, dtype, device
        )
        self.up_lora_A, self.up_lora_B = _new_lora(
            rows, self.hidden, self.intermediate, dtype, device
        )
        self.down_lora_A, self.down_lora_B = _new_lora(
            rows, self.intermediate, self.hidden, dtype, device
        )
        # Slots per token: experts a token can use at once under this routing rule.
        slots = {"topk": self.allocation.top_k, "switch": 1}
        self.slots = slots.get(config.router.kind, self.allocation.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = tuple(x.shape[:-1])
        h = x.reshape(-1, self.hidden)  # (N, d)
        weights = self._route(h, lead)
        if weights is None:
            weights = h.new_ones(h.shape[0], 1, dtype=torch.float32)  # one expert: gate 1
        if self.expert_impl == "fused":
            y = self._fused(h, weights)
        else:
            y = self._eager(h, weights)
        return y.view(*lead, self.hidden)

    def _fused(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        dt = self.gate_lora_A.dtype
        slot_w, slot_i = weights.topk(min(self.slots, weights.shape[1]), dim=-1)  # (N, k)
        # (N, k, R): the rank columns of each slot's expert, holding alpha / r_e
        cols = F.one_hot(slot_i, self.num_experts).to(dt) @ self.gate_to_cols
        hd = self.dropout(h).to(dt)
        g0 = base.gate_proj(h)[:, None, :]  # (N, 1, F), shared by all slots
        u0 = base.up_proj(h)[:, None, :]
        dg = F.linear(
            F.linear(hd, self.gate_lora_A)[:, None, :] * cols, self.gate_lora_B
        )  # (N, k, F)
        du = F.linear(F.linear(hd, self.up_lora_A)[:, None, :] * cols, self.up_lora_B)
        hid = base.act_fn(g0 + dg) * (u0 + du)  # (N, k, F)
        sw = slot_w.to(hid.dtype)[..., None]  # (N, k, 1)
        # W_d is linear: sum_k w_k W_d hid_k = W_d (sum_k w_k hid_k), one base matmul per token.
        down = base.down_proj
        y = F.linear((sw * hid).sum(dim=1), down.weight)  # (N, d)
        if down.bias is not None:
            y = y + down.bias * slot_w.sum(dim=-1, keepdim=True).to(y.dtype)
        a = F.linear(self.dropout(hid).to(dt), self.down_lora_A) * cols * sw  # (N, k, R)
        return y + F.linear(a.sum(dim=1), self.down_lora_B)

    def _eager(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Reference: every expert's whole FFN on every token, weighted by its gate."""
        base = self.base_layer
        hd = self.dropout(h)
        out = h.new_zeros(h.shape[0], self.hidden)
        experts = zip(
            self._expert_slices("gate_"),
            self._expert_slices("up_"),
            self._expert_slices("down_"),
            strict=True,
        )
        for e, ((ga, gb, s), (ua, ub, _), (da, db, _)) in enumerate(experts):  # eager reference
            g = base.gate_proj(h) + F.linear(F.linear(hd, ga), gb) * s
            u = base.up_proj(h) + F.linear(F.linear(hd, ua), ub) * s
            hid = base.act_fn(g) * u
            y = base.down_proj(hid) + F.linear(F.linear(self.dropout(hid), da), db) * s
            out = out + weights[:, e : e + 1].to(y.dtype) * y
        return out

    @property
    def in_features(self) -> int:
        return self.hidden
