"""The LoRA-MoE layers against PEFT, the eager reference and a per-token reference."""

import itertools

import pytest
import torch
from torch import nn

from guilomo.moe import (
    Allocation,
    LoraMoeLinear,
    MixLoraMlp,
    ModuleAllocation,
    MoeConfig,
    RouterConfig,
    RoutingState,
)
from reference import linear_reference, mixlora_reference

D_IN, D_OUT = 12, 10
ALPHA = 16.0


def make_linear(ranks, top_k, router="topk", impl="fused", state=None, seed=0, **router_kw):
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    alloc = ModuleAllocation(experts=len(ranks), top_k=top_k, ranks=ranks)
    cfg = MoeConfig(
        allocation=Allocation(base_model="t", modules={"m": alloc}),
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        router=RouterConfig(kind=router, **router_kw),
    )
    layer = LoraMoeLinear(
        base_layer=base, name="m", allocation=alloc, config=cfg, state=state, expert_impl=impl
    )
    with torch.no_grad():  # B is zero at init; make the experts do something
        layer.lora_B.normal_(0, 0.5)
    return layer


def grads(layer, x):
    """Every trainable parameter's gradient; one autograd never reached is zero (a top-1
    router gets none from the task loss, whichever path computed it)."""
    named = {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in layer.named_parameters()
        if p.requires_grad
    }
    named["x"] = x.grad.clone()
    return named


def run(layer, x, fn=None, mask=None):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    if layer.state is not None:
        layer.state.attention_mask = mask
    y = layer(x) if fn is None else fn(layer, x)
    g = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * g).sum().backward()
    return y.detach(), grads(layer, x)


def assert_close_all(a, b, atol=1e-5):
    ya, ga = a
    yb, gb = b
    torch.testing.assert_close(ya, yb, atol=atol, rtol=1e-4)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(
            ga[k], gb[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"grad {k}: {m}"
        )


# -------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_one_expert_equals_peft_lora(rank):
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(D_IN, D_OUT)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(1)
    net = Net()
    ours = make_linear([rank], top_k=1)
    with torch.no_grad():
        ours.base_layer.load_state_dict(net.proj.state_dict())
    pm = peft.get_peft_model(
        net, peft.LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"])
    )
    lora = pm.base_model.model.proj
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(ours.lora_A)
        lora.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(3, 5, D_IN)

    y_ours, g_ours = run(ours, x)
    xp = x.clone().requires_grad_(True)
    y_peft = pm(xp)
    (y_peft * torch.linspace(-1, 1, y_peft.numel()).view_as(y_peft)).sum().backward()
    torch.testing.assert_close(y_ours, y_peft.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_ours["x"], xp.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        g_ours["lora_A"], lora.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        g_ours["lora_B"], lora.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-5
    )


# --------------------------------------------------- fused == eager == per-token reference

RANKS = {"uniform": [4, 4, 4, 4], "hetero": [1, 3, 5, 8]}
CASES = [
    *[("topk", r, k) for r, k in itertools.product(RANKS, [1, 2, 3, 4])],
    *[
        (kind, r, 1)
        for kind, r in itertools.product(["switch", "soft", "top_p", "threshold"], RANKS)
    ],
]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("kind,ranks,top_k", CASES)
def test_linear_fast_paths_equal_references(kind, ranks, top_k, padded):
    kw = {"capacity_factor": 0.6} if kind == "switch" else {}
    x = torch.randn(3, 7, D_IN)
    mask = None
    if padded:
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[0, :3] = 0  # left padding
        mask[2, 5:] = 0  # right padding
    flat = None if mask is None else mask.reshape(-1).bool()
    results = {}
    for impl in ("fused", "eager"):
        layer = make_linear(RANKS[ranks], top_k, kind, impl, state=RoutingState(), **kw)
        results[impl] = run(layer, x, mask=mask)
    layer = make_linear(RANKS[ranks], top_k, kind, "fused", state=RoutingState(), **kw)
    results["reference"] = run(
        layer, x, lambda m, xx: linear_reference(m, xx, ALPHA, flat), mask=mask
    )
    assert_close_all(results["fused"], results["eager"])
    assert_close_all(results["fused"], results["reference"])


def test_switch_capacity_drops_tokens_and_ignores_padding():
    layer = make_linear([4, 4], 1, "switch", state=RoutingState(), capacity_factor=0.5)
    x = torch.randn(1, 8, D_IN)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    layer.state.attention_mask = mask
    layer(x)
    sel = layer.state.records["m"].routing.selected
    # capacity = ceil(0.5 * 6 valid / 2) = 2 per expert: at most 2 tokens each, none padded
    assert sel.sum(0).le(2).all()
    assert not sel[:2].any()


def make_mlp(ranks, top_k, router="topk", impl="fused", state=None):
    torch.manual_seed(0)

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(D_IN, 16, bias=False)
            self.up_proj = nn.Linear(D_IN, 16, bias=False)
            self.down_proj = nn.Linear(16, D_IN, bias=False)
            self.act_fn = nn.SiLU()

    base = Mlp().requires_grad_(False)
    alloc = ModuleAllocation(experts=len(ranks), top_k=top_k, ranks=ranks)
    cfg = MoeConfig(
        allocation=Allocation(base_model="t", modules={"mlp": alloc}),
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        router=RouterConfig(kind=router),
    )
    layer = MixLoraMlp(
        base_layer=base, name="mlp", allocation=alloc, config=cfg, state=state, expert_impl=impl
    )
    with torch.no_grad():
        for n in ("gate_lora_B", "up_lora_B", "down_lora_B"):
            getattr(layer, n).normal_(0, 0.5)
    return layer


@pytest.mark.parametrize(
    "kind,ranks,top_k",
    [
        ("topk", [4, 4, 4], 1),
        ("topk", [2, 3, 6], 2),
        ("topk", [2, 3, 6], 3),
        ("soft", [2, 3, 6], 1),
        ("top_p", [4, 4, 4], 1),
        ("switch", [2, 3, 6], 1),
        ("topk", [5], 1),
    ],
)
def test_mixlora_fast_path_equals_references(kind, ranks, top_k):
    x = torch.randn(2, 5, D_IN)
    results = {impl: run(make_mlp(ranks, top_k, kind, impl), x) for impl in ("fused", "eager")}
    results["reference"] = run(
        make_mlp(ranks, top_k, kind), x, lambda m, xx: mixlora_reference(m, xx, ALPHA)
    )
    assert_close_all(results["fused"], results["eager"])
    assert_close_all(results["fused"], results["reference"])


# ------------------------------------------------------------------ init, dropout, jitter


def test_zero_b_init_gives_base_output():
    layer = make_linear([2, 6], 2)
    with torch.no_grad():
        layer.lora_B.zero_()
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)
    fresh = LoraMoeLinear(
        base_layer=layer.base_layer,
        name="m",
        allocation=layer.allocation,
        config=MoeConfig(allocation=Allocation(base_model="t", modules={"m": layer.allocation})),
    )
    assert torch.count_nonzero(fresh.lora_B) == 0
    bound = (1 / D_IN) ** 0.5  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert fresh.lora_A.abs().max() <= bound and fresh.lora_A.std() > bound / 4


def test_dropout_on_expert_path_only_and_off_in_eval():
    alloc = ModuleAllocation(experts=2, top_k=1, ranks=[4, 4])
    cfg = MoeConfig(allocation=Allocation(base_model="t", modules={"m": alloc}), lora_dropout=0.5)
    base = nn.Linear(D_IN, D_OUT).requires_grad_(False)
    layer = LoraMoeLinear(
        base_layer=base, name="m", allocation=alloc, config=cfg, state=RoutingState()
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(64, D_IN)
    layer.train()
    y1, logits1 = layer(x), layer.state.records["m"].routing.logits
    y2, logits2 = layer(x), layer.state.records["m"].routing.logits
    assert not torch.allclose(y1, y2)  # dropout changes the expert path
    torch.testing.assert_close(logits1, logits2)  # ... but never the router's input
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_switch_jitter_only_in_training():
    layer = make_linear(
        [4, 4], 1, "switch", state=RoutingState(), jitter_noise=0.3, capacity_factor=4.0
    )
    x = torch.randn(32, D_IN)
    layer.train()
    a = layer.router(x).logits
    b = layer.router(x).logits
    assert not torch.allclose(a, b)
    layer.eval()
    torch.testing.assert_close(layer.router(x).logits, layer.router(x).logits)


def test_router_stats_count_shares_of_valid_tokens():
    state = RoutingState()
    layer = make_linear([2, 2, 2], 2, state=state)
    x = torch.randn(2, 6, D_IN)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    state.attention_mask = mask
    layer(x)
    layer(x)
    h = x.reshape(-1, D_IN)
    top = (h @ layer.router.weight.T).topk(2, dim=-1).indices  # hand: top-2 by logits
    valid = mask.reshape(-1).bool()
    counts = torch.zeros(3)
    for t in range(h.shape[0]):
        if valid[t]:
            for e in top[t]:
                counts[e] += 2  # two identical forwards
    assert torch.equal(state.counts["m"].float(), counts)
    assert int(state.tokens["m"]) == 2 * int(valid.sum())


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["topk", "switch", "threshold"])
def test_fused_path_with_dropout_equals_eager(kind, mode):
    """Dropout on: the router and the experts read different inputs (no shared matmul).

    In training both paths draw the dropout mask at the same point from the same seed.
    """
    x = torch.randn(2, 6, D_IN)
    results = []
    for impl in ("fused", "eager"):
        torch.manual_seed(0)
        base = nn.Linear(D_IN, D_OUT).requires_grad_(False)
        alloc = ModuleAllocation(experts=3, top_k=2, ranks=[2, 3, 4])
        cfg = MoeConfig(
            allocation=Allocation(base_model="t", modules={"m": alloc}),
            lora_dropout=0.3,
            router=RouterConfig(kind=kind),
        )
        layer = LoraMoeLinear(
            base_layer=base, name="m", allocation=alloc, config=cfg, expert_impl=impl
        )
        with torch.no_grad():
            layer.lora_B.normal_()
        layer.train(mode == "train")
        torch.manual_seed(1)
        results.append(run(layer, x))
    assert_close_all(*results)


def _graph_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_frozen_linear_base_takes_the_shared_input_path(p):
    """The fast paths the eager comparisons above are meant to cover are the ones taken."""
    base = nn.Linear(D_IN, D_OUT).requires_grad_(False)
    alloc = ModuleAllocation(experts=3, top_k=2, ranks=[2, 3, 4])
    cfg = MoeConfig(allocation=Allocation(base_model="t", modules={"m": alloc}), lora_dropout=p)
    layer = LoraMoeLinear(base_layer=base, name="m", allocation=alloc, config=cfg).train()
    nodes = _graph_nodes(layer(torch.randn(5, D_IN, requires_grad=True)))
    assert ("_SharedInputDropoutBackward" if p else "_SharedInputBackward") in nodes


@pytest.mark.parametrize(
    "p,n,dtype",
    [
        (0.05, 1_000_000, torch.float32),
        (0.05, 1_000_000, torch.bfloat16),
        # one kept bit pattern in 2^16: a threshold off by one keeps twice as many or none
        (65535 / 65536, 1 << 24, torch.float32),
    ],
)
def test_lora_dropout_keeps_each_input_with_probability_1_minus_p(p, n, dtype):
    """Over n inputs the kept share is within 5 standard deviations of 1 - p, the kept
    values are scaled by 1 / (1 - p') with p' = p rounded to a multiple of 2^-16 (the mask's
    resolution), and eval mode is the identity."""
    from guilomo.moe.layer import LoraDropout

    drop = LoraDropout(p).train()
    x = torch.ones(n, dtype=dtype)
    y = drop(x)
    kept = y != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    p_rounded = round(p * 65536) / 65536
    assert abs(p_rounded - p) <= 2**-17
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p_rounded)))
    assert drop.eval()(x) is x


def test_dropout_path_keeps_only_a_bool_mask_beside_the_input():
    """Activation memory: with dropout on, what the layer keeps for the backward at the
    input's size is the input itself plus the mask as bool (1 byte per element)."""
    base = nn.Linear(D_IN, D_OUT).requires_grad_(False)
    alloc = ModuleAllocation(experts=3, top_k=2, ranks=[2, 3, 4])
    cfg = MoeConfig(allocation=Allocation(base_model="t", modules={"m": alloc}), lora_dropout=0.3)
    layer = LoraMoeLinear(base_layer=base, name="m", allocation=alloc, config=cfg).train()
    x = torch.randn(7, D_IN, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    at_input_size = [t for t in saved if t.numel() == x.numel()]
    others = [t for t in at_input_size if t.data_ptr() != x.data_ptr()]
    assert len(at_input_size) > len(others)  # the input itself is kept
    assert others and all(t.dtype == torch.bool for t in others), [t.dtype for t in others]


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_top1_router_gets_exactly_no_gradient_and_adam_leaves_it(impl):
    """Top-1 renormalised routing weighs the chosen expert by p / p = 1, whose derivative is
    zero (by hand), so the task loss gives the router no gradient: exactly zero, not the
    ~1e-10 rounding of autograd's 1/p - p/p^2, which Adam (dividing by the gradient's own
    size) would turn into router steps of the whole learning rate. Top-2 gets a real one."""
    layer = make_linear([2, 2, 2], 1, impl=impl)
    before = layer.router.weight.detach().clone()
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    _, g = run(layer, torch.randn(16, D_IN))
    assert torch.count_nonzero(g["router.weight"]) == 0
    assert torch.count_nonzero(g["lora_B"]) > 0
    opt.step()
    assert torch.equal(layer.router.weight, before)
    _, g2 = run(make_linear([2, 2, 2], 2, impl=impl), torch.randn(16, D_IN))
    assert g2["router.weight"].abs().min() > 1e-6
