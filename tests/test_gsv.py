"""GuidedSelection vectors: the straight-through gradient by hand, masking, full-size equality."""

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
from guilomo.moe.gsv import RANK_LEAK, ModuleGsv, prefix_mask


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
    a = ModuleGsv(max_experts=6, max_rank=4, top_k=2, generator=torch.Generator().manual_seed(3))
    b = ModuleGsv(max_experts=6, max_rank=4, top_k=2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.expert, b.expert)
    torch.testing.assert_close(a.expert.sum(), torch.tensor(1.0))
    torch.testing.assert_close(a.rank.sum(-1), torch.ones(6))
    with pytest.raises(ValueError, match="top_k"):
        ModuleGsv(max_experts=2, max_rank=4, top_k=3)


def search_layer(experts=4, rank=3, top_k=2, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(10, 7).requires_grad_(False)
    alloc = ModuleAllocation(experts=experts, top_k=top_k, ranks=[rank] * experts)
    cfg = MoeConfig(allocation=Allocation(base_model="t", modules={"m": alloc}), lora_dropout=0.0)
    layer = LoraMoeLinear(
        base_layer=base, name="m", allocation=alloc, config=cfg, state=RoutingState()
    )
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.gsv = ModuleGsv(max_experts=experts, max_rank=rank, top_k=top_k)
    return layer


def test_masked_experts_get_no_routing_mass_and_no_balance_loss():
    layer = search_layer(experts=5, top_k=2)
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


def test_inactive_rank_components_are_off():
    layer = search_layer(experts=2, rank=4, top_k=1)
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
    e0 = (x @ a[0:1].T) @ b[:, 0:1].T * s
    e1 = (x @ a[4:7].T) @ b[:, 4:7].T * s
    expected = layer.base_layer(x) + w[:, :1] * e0 + w[:, 1:] * e1
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_gsv_at_maximum_equals_plain_layer(impl):
    plain = search_layer(experts=4, rank=3)
    plain.gsv = None
    search = search_layer(experts=4, rank=3)
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


def test_gsv_receives_gradient_through_layer():
    layer = search_layer(experts=4, rank=3, top_k=2)
    x = torch.randn(16, 10)
    layer(x).square().sum().backward()
    assert layer.gsv.expert.grad is not None and layer.gsv.expert.grad.abs().sum() > 0
    assert layer.gsv.rank.grad.abs().sum() > 0
