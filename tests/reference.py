"""Independent per-token references for routing and the LoRA-MoE layers.

Written token by token with Python control flow, from the formulas in ALGORITHM.md, sharing
no code with guilomo.moe beyond reading the layer's parameters. Autograd flows through them,
so gradients can be compared too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert_weights(
    layer, h: torch.Tensor, token_mask: torch.Tensor | None
) -> list[dict[int, torch.Tensor]]:
    """Per token, {expert: weight} for the experts it uses, per the router kind."""
    router = layer.router
    n = h.shape[0]
    if router is None:
        return [{0: h.new_ones(())} for _ in range(n)]
    cfg = router.config
    e_count = router.weight.shape[0]
    valid = [True] * n if token_mask is None else [bool(v) for v in token_mask]
    capacity = math.ceil(cfg.capacity_factor * sum(valid) / e_count)
    used = [0] * e_count
    out = []
    for t in range(n):
        logits = router.weight.float() @ h[t].float()  # (E,)
        p = torch.softmax(logits, dim=0)
        order = sorted(range(e_count), key=lambda i: -float(p[i].detach()))
        if cfg.kind == "topk":
            chosen = order[: router.top_k]
            z = sum(p[i] for i in chosen)
            out.append({i: p[i] / z for i in chosen})
        elif cfg.kind == "switch":
            best = order[0]
            if valid[t]:
                used[best] += 1
            keep = valid[t] and used[best] <= capacity
            out.append({best: p[best]} if keep else {})
        elif cfg.kind == "soft":
            out.append({i: p[i] for i in range(e_count)})
        elif cfg.kind == "top_p":
            chosen, mass = [], 0.0
            for i in order:
                if mass >= cfg.top_p:
                    break
                chosen.append(i)
                mass += float(p[i])
            z = sum(p[i] for i in chosen)
            out.append({i: p[i] / z for i in chosen})
        elif cfg.kind == "threshold":
            tau = router.max_threshold * torch.sigmoid(
                router.threshold.weight[0] @ h[t] + router.threshold.bias[0]
            )
            ex = {i: p[i] - tau for i in range(e_count) if float(p[i] - tau) > 0}
            z = sum(ex.values())
            out.append({i: v / (z + 1e-9) for i, v in ex.items()})
        else:
            raise AssertionError(cfg.kind)
    return out


def _slices(a: torch.Tensor, b: torch.Tensor, ranks: list[int]):
    start = 0
    for r in ranks:
        yield a[start : start + r], b[:, start : start + r]
        start += r


def linear_reference(layer, x: torch.Tensor, alpha: float, token_mask=None) -> torch.Tensor:
    """y_t = W0 x_t + sum_{e used by t} w_e * alpha/r_e * B_e A_e x_t, token by token."""
    h = x.reshape(-1, x.shape[-1])
    routes = expert_weights(layer, h, token_mask)
    experts = list(_slices(layer.lora_A, layer.lora_B, layer.ranks))
    rows = []
    for t in range(h.shape[0]):
        y = layer.base_layer(h[t])
        for e, w in routes[t].items():
            a, b = experts[e]
            y = y + w * (alpha / layer.ranks[e]) * (b @ (a @ h[t]))
        rows.append(y)
    return torch.stack(rows).view(*x.shape[:-1], -1)


def mixlora_reference(layer, x: torch.Tensor, alpha: float, token_mask=None) -> torch.Tensor:
    """y_t = sum_e w_e FFN_e(x_t), FFN_e the base MLP with expert e's LoRA on gate/up/down."""
    base = layer.base_layer
    h = x.reshape(-1, x.shape[-1])
    routes = expert_weights(layer, h, token_mask)
    gate = list(_slices(layer.gate_lora_A, layer.gate_lora_B, layer.ranks))
    up = list(_slices(layer.up_lora_A, layer.up_lora_B, layer.ranks))
    down = list(_slices(layer.down_lora_A, layer.down_lora_B, layer.ranks))
    rows = []
    for t in range(h.shape[0]):
        xt = h[t]
        y = torch.zeros_like(xt)
        for e, w in routes[t].items():
            s = alpha / layer.ranks[e]
            g = base.gate_proj.weight @ xt + s * gate[e][1] @ (gate[e][0] @ xt)
            u = base.up_proj.weight @ xt + s * up[e][1] @ (up[e][0] @ xt)
            hid = F.silu(g) * u
            y = y + w * (base.down_proj.weight @ hid + s * down[e][1] @ (down[e][0] @ hid))
        rows.append(y)
    return torch.stack(rows).view_as(x)
