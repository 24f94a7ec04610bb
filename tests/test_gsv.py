"""GuidedSelection vectors: both estimators by hand, by enumeration, and at full size."""

import itertools

import pytest
import torch
from torch import nn

from guilomo.moe import (
    Allocation,
    LoraMoeLinear,
    ModuleAllocation,
    MoeConfig,
    RoutingState,
    balance_loss,
)
from guilomo.moe.gsv import RANK_LEAK, ModuleGsv, choose, prefix_mask
from guilomo.moe.search import module_parameters


def test_prefix_mask_forward_and_min_n():
    g = torch.tensor([0.1, 0.9, 0.3, -1.0])  # argmax 1 -> n = 2
    assert prefix_mask(g).tolist() == [1, 1, 0, 0]
    assert prefix_mask(g, min_n=3).tolist() == [1, 1, 1, 0]
    rows = torch.tensor([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    assert prefix_mask(rows).tolist() == [[1, 1, 1], [1, 0, 0]]


def test_prefix_mask_backward_by_hand():
    g = torch.tensor([0.2, -0.5, 1.5, 0.1], requires_grad=True)  # argmax 2 -> n = 3
    upstream = torch.tensor([0.3, -2.0, 0.7, 4.0])  # dL/dmask
    prefix_mask(g).backward(upstream)
    s = torch.sigmoid(g.detach())
    total = 0.3 * s[0] - 2.0 * s[1] + 0.7 * s[2]  # t < n only
    expected = torch.zeros(4)
    expected[2] = total * s[2] * (1 - s[2])
    torch.testing.assert_close(g.grad, expected)


def test_rank_mask_backward_leaks_to_other_indices():
    g = torch.tensor([[0.2, 1.0, -0.3]], requires_grad=True)  # argmax 1 -> r = 2
    upstream = torch.tensor([[1.0, 2.0, 3.0]])
    prefix_mask(g, 1, RANK_LEAK).backward(upstream)
    s = torch.sigmoid(g.detach())[0]
    ds = torch.tensor([RANK_LEAK * 1.0, 1.0 * s[0] + 2.0 * s[1], RANK_LEAK * 3.0])
    torch.testing.assert_close(g.grad[0], ds * s * (1 - s))


def test_gsv_init_is_seeded_softmax():
    def make(estimator):
        gen = torch.Generator().manual_seed(3)
        return ModuleGsv(max_experts=6, max_rank=4, top_k=2, estimator=estimator, generator=gen)

    a, b = make("reference"), make("reference")
    torch.testing.assert_close(a.expert, b.expert)
    torch.testing.assert_close(a.expert.sum(), torch.tensor(1.0))
    torch.testing.assert_close(a.rank.sum(-1), torch.ones(6))
    # expected: the same rank draws, the expert GSV flat (every count equally likely)
    e = make("expected")
    torch.testing.assert_close(e.rank, a.rank)
    assert e.expert.tolist() == [0.0] * 6
    with pytest.raises(ValueError, match="top_k"):
        ModuleGsv(max_experts=2, max_rank=4, top_k=3)
    with pytest.raises(ValueError, match="estimator 'gumbel' is not one of expected, reference"):
        ModuleGsv(max_experts=2, max_rank=4, top_k=1, estimator="gumbel")
    with pytest.raises(ValueError, match="tau"):
        ModuleGsv(max_experts=2, max_rank=4, top_k=1, tau=0.0)


def search_layer(experts=4, rank=3, top_k=2, seed=0, estimator="expected", tau=0.1):
    torch.manual_seed(seed)
    base = nn.Linear(10, 7).requires_grad_(False)
    alloc = ModuleAllocation(experts=experts, top_k=top_k, ranks=[rank] * experts)
    cfg = MoeConfig(allocation=Allocation(base_model="t", modules={"m": alloc}), lora_dropout=0.0)
    layer = LoraMoeLinear(
        base_layer=base, name="m", allocation=alloc, config=cfg, state=RoutingState()
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.gsv = ModuleGsv(
        max_experts=experts, max_rank=rank, top_k=top_k, estimator=estimator, tau=tau
    )
    return layer


def hard_output(layer, x, n, ranks):
    """The layer with a hard choice: n experts (router softmax over the first n, top-k
    renormalised), expert j keeping its first ranks[j] components; written per token."""
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    scale = 16.0 / layer.gsv.rank.shape[1]  # search mode: alpha / R_max for every component
    r_max = layer.gsv.rank.shape[1]
    out = []
    for t in range(x.shape[0]):
        p = torch.softmax(layer.router.weight[:n].detach() @ x[t], 0)
        top = sorted(range(n), key=lambda i: -float(p[i]))[: layer.router.top_k]
        z = sum(p[i] for i in top)
        y = layer.base_layer(x[t])
        for j in top:
            rows = slice(j * r_max, j * r_max + ranks[j])
            y = y + (p[j] / z) * scale * (b[:, rows] @ (a[rows] @ x[t]))
        out.append(y)
    return torch.stack(out)


def test_expected_estimator_is_the_expectation_over_counts_and_ranks():
    """The layer's output equals the sum over every (n, r_1..r_n) of its probability times
    the output of that hard allocation: q_n from softmax(g_E / tau) with counts below top_k
    folded into top_k, each r_j ~ softmax(g_R,j / tau)."""
    layer = search_layer(experts=3, rank=2, top_k=2, tau=0.7)
    with torch.no_grad():
        layer.gsv.expert.copy_(torch.tensor([0.3, -0.2, 0.4]))
        layer.gsv.rank.copy_(torch.tensor([[0.1, 0.5], [-0.3, 0.2], [0.6, 0.0]]))
    x = torch.randn(5, 10)
    p_e = torch.softmax(layer.gsv.expert.detach() / 0.7, 0)
    q = {2: float(p_e[0] + p_e[1]), 3: float(p_e[2])}  # top_k = 2: n = 1 folds into 2
    p_r = torch.softmax(layer.gsv.rank.detach() / 0.7, -1)
    expected = torch.zeros(5, 7)
    for n, qn in q.items():
        for ranks in itertools.product([1, 2], repeat=n):
            prob = qn * float(torch.prod(torch.stack([p_r[j, r - 1] for j, r in enumerate(ranks)])))
            expected += prob * hard_output(layer, x, n, list(ranks))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    e_params = sum(
        qn
        * float(torch.prod(torch.stack([p_r[j, r - 1] for j, r in enumerate(ranks)])))
        * module_parameters((10, 7), n, list(ranks))
        for n, qn in q.items()
        for ranks in itertools.product([1, 2], repeat=n)
    )
    assert float(layer.gsv.expected_parameters(10, 7).detach()) == pytest.approx(e_params, rel=1e-6)


def test_expected_estimator_mode_folds_counts_below_top_k():
    g = torch.log(torch.tensor([0.3, 0.3, 0.4]))  # argmax is 3 experts, but with top_k = 2
    n, _ = choose(g, torch.zeros(3, 2), top_k=2, estimator="expected", tau=1.0)
    assert n == 2  # P(n = 2) = 0.3 + 0.3 > P(n = 3) = 0.4
    assert choose(g, torch.zeros(3, 2), top_k=2, estimator="reference", tau=1.0)[0] == 3
    # the mode depends on tau: sharper, the single largest count wins
    assert choose(g, torch.zeros(3, 2), top_k=2, estimator="expected", tau=0.1)[0] == 3


def test_expected_estimator_needs_no_custom_backward():
    """Gradients reach every GSV entry (inactive counts and ranks included) by autograd."""
    layer = search_layer(experts=4, rank=3, top_k=2)
    x = torch.randn(16, 10)
    layer(x).square().sum().backward()
    assert (layer.gsv.rank.grad != 0).all()
    assert (layer.gsv.expert.grad != 0).all()


def test_reference_rule_as_algorithm_md_states_it():
    """ALGORITHM.md section 3: n = argmax(sigmoid(g)) + 1 (>= top_k); +0.5 / -1e4 added to
    the router logits; rank components scaled by 1 / 1e-4; straight-through gradients."""
    layer = search_layer(experts=4, rank=3, top_k=2, estimator="reference")
    with torch.no_grad():
        layer.gsv.expert.copy_(torch.tensor([0.1, 0.2, 0.9, 0.3]))  # n = 3
        layer.gsv.rank.copy_(
            torch.tensor([[0.5, 0.1, 0.0], [0.0, 0.0, 0.7], [0.2, 0.8, 0.1], [0.9, 0.0, 0.0]])
        )  # r = 1, 3, 2, (1)
    x = torch.randn(6, 10)
    # by hand, with leaf masks so that autograd gives dL/dmask
    e_mask = torch.tensor([0.5, 0.5, 0.5, -1e4], requires_grad=True)
    r_mask = torch.tensor(
        [[1, RANK_LEAK, RANK_LEAK], [1, 1, 1], [1, 1, RANK_LEAK], [1, RANK_LEAK, RANK_LEAK]],
        requires_grad=True,
    )
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    logits = x @ layer.router.weight.detach().T + e_mask
    p = logits.softmax(-1)
    top = p.topk(2, dim=-1)
    w = torch.zeros_like(p).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    u = (x @ a.T) * r_mask.flatten() * (16.0 / 3)  # (N, 12)
    cols = w.repeat_interleave(3, dim=1)  # each expert's weight on its 3 columns
    y = layer.base_layer(x) + (u * cols) @ b.T
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    out = layer(x)
    torch.testing.assert_close(out, y.detach(), rtol=1e-5, atol=1e-5)
    (out * upstream).sum().backward()
    # expert GSV: the whole prefix sum to the argmax index (2), through the sigmoid
    s = torch.sigmoid(layer.gsv.expert.detach())
    ds = torch.zeros(4)
    ds[2] = (e_mask.grad[:3] * s[:3]).sum()
    torch.testing.assert_close(layer.gsv.expert.grad, ds * s * (1 - s))
    # rank GSVs: prefix sum to the argmax index, 1e-4 * dL/dmask to every other index
    s_r = torch.sigmoid(layer.gsv.rank.detach())
    idx = s_r.argmax(-1)
    n_r = idx + 1
    ds_r = RANK_LEAK * r_mask.grad.clone()
    for j in range(4):
        ds_r[j, idx[j]] = (r_mask.grad[j, : n_r[j]] * s_r[j, : n_r[j]]).sum()
    torch.testing.assert_close(layer.gsv.rank.grad, ds_r * s_r * (1 - s_r))


def test_reference_estimator_starts_lora_at_normal_002():
    from conftest import tiny_llama
    from guilomo.moe.search import inject_search

    adapter = inject_search(
        tiny_llama(), base_model="t", max_experts=4, max_rank=8, estimator="reference"
    )
    a = torch.cat([layer.lora_A.detach().flatten() for layer in adapter.layers.values()])
    b = torch.cat([layer.lora_B.detach().flatten() for layer in adapter.layers.values()])
    for w in (a, b):
        assert abs(float(w.mean())) < 2e-3 and float(w.std()) == pytest.approx(0.02, rel=0.05)
    default = inject_search(tiny_llama(), base_model="t", max_experts=4, max_rank=8)
    assert all(float(layer.lora_B.abs().max()) == 0 for layer in default.layers.values())


def test_reference_masked_experts_get_no_routing_mass_and_no_balance_loss():
    layer = search_layer(experts=5, top_k=2, estimator="reference")
    with torch.no_grad():
        layer.gsv.expert.copy_(torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0]))  # 3 experts active
    x = torch.randn(40, 10)
    layer(x)
    rec = layer.state.records["m"]
    assert rec.routing.probs[:, 3:].abs().max() == 0
    assert rec.routing.weights[:, 3:].abs().max() == 0
    torch.testing.assert_close(rec.routing.probs.sum(-1), torch.ones(40))
    # the balance loss is the one of a 3-expert router on the same logits
    logits3 = x @ layer.router.weight[:3].T
    p = logits3.softmax(-1)
    top = p.topk(2, dim=-1).indices
    f = torch.zeros(3).index_add_(0, top.flatten(), torch.ones(80)) / 80
    expected = 3 * (f * p.mean(0)).sum()
    torch.testing.assert_close(balance_loss(rec), expected)


@pytest.mark.parametrize("estimator", ["expected", "reference"])
def test_inactive_rank_components_are_off(estimator):
    layer = search_layer(experts=2, rank=4, top_k=1, estimator=estimator)
    with torch.no_grad():
        layer.gsv.expert.copy_(torch.tensor([0.0, 5.0]))
        layer.gsv.rank.copy_(torch.tensor([[5.0, 0, 0, 0], [0, 0, 5.0, 0]]))  # ranks 1 and 3
        layer.lora_A[1:4].mul_(1000)  # expert 0's components 1..3 must not matter
        layer.lora_A[7].mul_(1000)  # expert 1's component 3 likewise
    x = torch.randn(6, 10)
    probs = layer.router(x).probs
    w = torch.zeros_like(probs).scatter(1, probs.argmax(-1, keepdim=True), 1.0)
    a, b = layer.lora_A, layer.lora_B
    s = 16.0 / 4
    off = RANK_LEAK if estimator == "reference" else 0.0  # the reference scales, not zeroes
    e0 = (x @ a[0:1].T) @ b[:, 0:1].T * s + off * (x @ a[1:4].T) @ b[:, 1:4].T * s
    e1 = (x @ a[4:7].T) @ b[:, 4:7].T * s + off * (x @ a[7:8].T) @ b[:, 7:8].T * s
    expected = layer.base_layer(x) + w[:, :1] * e0 + w[:, 1:] * e1
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("estimator", ["expected", "reference"])
@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_gsv_at_maximum_equals_plain_layer(impl, estimator):
    plain = search_layer(experts=4, rank=3)
    plain.gsv = None
    search = search_layer(experts=4, rank=3, estimator=estimator)
    search.expert_impl = impl
    with torch.no_grad():
        search.gsv.expert.copy_(torch.tensor([0.0, 0.0, 0.0, 9.0]))
        search.gsv.rank.copy_(torch.tensor([0.0, 0.0, 9.0]).expand(4, 3))
    x = torch.randn(2, 5, 10, requires_grad=True)
    torch.testing.assert_close(search(x), plain(x))
    gx_s = torch.autograd.grad(search(x).sum(), [x, search.lora_A, search.router.weight])
    gx_p = torch.autograd.grad(plain(x).sum(), [x, plain.lora_A, plain.router.weight])
    for a, b in zip(gx_s, gx_p, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("estimator", ["expected", "reference"])
def test_gsv_receives_gradient_through_layer(estimator):
    layer = search_layer(experts=4, rank=3, top_k=2, estimator=estimator)
    x = torch.randn(16, 10)
    layer(x).square().sum().backward()
    assert layer.gsv.expert.grad is not None and layer.gsv.expert.grad.abs().sum() > 0
    assert layer.gsv.rank.grad.abs().sum() > 0


def test_expected_routing_for_other_router_kinds_is_the_expectation_too():
    """soft routing (weights = probabilities): sum_n q_n softmax(logits over experts 1..n)."""
    from guilomo.moe import RouterConfig
    from guilomo.moe.routing import Router

    torch.manual_seed(0)
    router = Router(in_features=6, experts=4, top_k=2, config=RouterConfig(kind="soft"))
    x = torch.randn(5, 6)
    q = torch.tensor([0.0, 0.5, 0.2, 0.3])
    got = router(x, count_probs=q).weights
    logits = x @ router.weight.detach().T
    want = torch.zeros(5, 4)
    for n in (2, 3, 4):
        want[:, :n] += q[n - 1] * logits[:, :n].softmax(-1)
    torch.testing.assert_close(got.detach(), want)


def test_expected_topk_probabilities_are_the_expected_softmax():
    """The balance loss's probabilities under the expected estimator: sum_n q_n softmax over
    experts 1..n (and selected: every expert some count's top-k picks)."""
    from guilomo.moe import RouterConfig
    from guilomo.moe.routing import Router

    torch.manual_seed(1)
    router = Router(in_features=6, experts=4, top_k=2, config=RouterConfig(kind="topk"))
    x = torch.randn(7, 6)
    q = torch.tensor([0.0, 0.1, 0.6, 0.3])
    r = router(x, count_probs=q)
    logits = x @ router.weight.detach().T
    probs = torch.zeros(7, 4)
    selected = torch.zeros(7, 4, dtype=torch.bool)
    for n in (2, 3, 4):
        probs[:, :n] += q[n - 1] * logits[:, :n].softmax(-1)
        top = logits[:, :n].topk(2, -1).indices
        selected |= torch.zeros_like(selected).scatter(1, top, True)
    torch.testing.assert_close(r.probs.detach(), probs)
    assert torch.equal(r.selected, selected)
    torch.testing.assert_close(r.active, torch.tensor(0.1 * 2 + 0.6 * 3 + 0.3 * 4))

    # logits 300 apart: the first two experts' softmax underflows against the maximum in
    # fp32, but each prefix's softmax is still well defined (and finite in the backward)
    far = torch.tensor([[0.0, 1.0, 300.0, 299.0]], requires_grad=True)
    r = router(None, logits=far, count_probs=q)
    want = torch.zeros(1, 4, dtype=torch.float64)
    for n in (2, 3, 4):
        want[:, :n] += q[n - 1].double() * far.detach().double()[:, :n].softmax(-1)
    torch.testing.assert_close(r.probs.detach().double(), want, atol=1e-6, rtol=1e-5)
    grad = torch.autograd.grad((r.probs * torch.arange(4.0)).sum(), far)[0]
    assert torch.isfinite(grad).all() and grad[0, :2].abs().sum() > 0


def test_gsvs_read_together_equal_each_module_reading_its_own():
    """The search reads all GSVs in one stacked pass per forward; logits and every gradient
    (GSVs and weights) are those of each module computing its own distributions."""
    from conftest import tiny_llama
    from guilomo.moe.search import expected_parameters, inject_search

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for together in (True, False):
        model = tiny_llama(num_hidden_layers=2)
        adapter = inject_search(model, base_model="t", max_experts=4, max_rank=3, seed=1)
        with torch.no_grad():  # distinct GSVs and nonzero B, so every path carries a gradient
            for i, p in enumerate(adapter.model.parameters()):
                if p.requires_grad and p.dim() > 0:
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        if not together:
            for handle in adapter.search_hooks:
                handle.remove()
        out = model(input_ids=ids, labels=ids)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.loss + adapter.aux_loss(), params)
        assert all(layer.gsv._reading is None for layer in adapter.layers.values())
        results.append((out.logits, grads))
    # the size term, batched over modules, is the sum of each module's (checked by
    # enumeration in test_expected_estimator_is_the_expectation_over_counts_and_ranks)
    layers = adapter.layers.values()
    one_by_one = sum(m.gsv.expected_parameters(m.in_features, m.out_features) for m in layers)
    torch.testing.assert_close(expected_parameters(adapter), one_by_one)
    (logits_t, grads_t), (logits_o, grads_o) = results
    torch.testing.assert_close(logits_t, logits_o)
    assert len(grads_t) == len(grads_o) > 0
    for gt, go in zip(grads_t, grads_o, strict=True):
        assert torch.isfinite(gt).all() and torch.isfinite(go).all()
        torch.testing.assert_close(gt, go)
