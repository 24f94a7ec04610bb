"""Activation checkpointing: the same loss, gradients and router statistics as without it.

Each case builds two identical adapted models (same weights, non-zero B so every LoRA
parameter gets a gradient), enables checkpointing on one, runs the same seeded training
forward and backward on both, and compares. Dropout is on, so a recomputation that drew
other masks would change the gradients; the router losses are on, so a recomputation that
recorded its routing again would change the counts.
"""

import pytest
import torch

from conftest import tiny_llama
from guilomo.moe import MoeConfig, build_allocation, inject_adapter
from guilomo.moe.config import LossConfig, RouterConfig
from guilomo.moe.search import gsv_parameters, inject_search

LOSSES = LossConfig(balance_coef=0.01, z_loss_coef=0.001)
ROUTERS = {
    "topk": RouterConfig(kind="topk"),
    "switch": RouterConfig(kind="switch", jitter_noise=0.1),
    "soft": RouterConfig(kind="soft"),
    "top_p": RouterConfig(kind="top_p"),
    "threshold": RouterConfig(kind="threshold"),
}


def batch(b=3, t=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[2, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def adapted(placement, router, losses=LOSSES, checkpointing=False):
    model = tiny_llama()
    alloc = build_allocation(
        base_model="tiny",
        module_names=[n for n, _ in model.named_modules()],
        preset="2468",
        placement=placement,
        rank=4,
    )
    config = MoeConfig(allocation=alloc, lora_dropout=0.1, router=router, losses=losses)
    return prepared(model, inject_adapter(model, config), checkpointing, seed=2)


def prepared(model, adapter, checkpointing, seed):
    """Non-zero B (every LoRA parameter gets a gradient), checkpointing if asked, train mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    if checkpointing:
        adapter.enable_checkpointing()
    model.train()
    return model, adapter


def step(model, adapter, task_types=None):
    adapter.set_task_types(task_types)
    torch.manual_seed(7)
    out = model(**batch())
    aux = adapter.aux_loss()
    loss = out.loss + aux
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    counts = {
        n: (c.tolist(), int(adapter.state.tokens[n])) for n, c in adapter.state.counts.items()
    }
    return loss.detach(), aux.detach(), grads, counts


def assert_same(plain, checked):
    loss, aux, grads, stats = plain
    c_loss, c_aux, c_grads, c_stats = checked
    torch.testing.assert_close(c_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(c_aux, aux, rtol=0, atol=0)
    assert grads.keys() == c_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(c_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert c_stats == stats and len(stats) > 0  # counted once, not again in the recomputation


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("placement", ["all", "mixlora"])
def test_checkpointing_matches_plain_backward(placement, router):
    plain = step(*adapted(placement, ROUTERS[router]))
    checked = step(*adapted(placement, ROUTERS[router], checkpointing=True))
    assert_same(plain, checked)


def test_checkpointing_with_localized_balancing():
    losses = LossConfig(balance_coef=0.0, localized_coef=0.1, localized_groups=2)
    soft = RouterConfig(kind="soft")
    types = torch.tensor([0, 1, 1])
    plain = step(*adapted("mlp", soft, losses), task_types=types)
    checked = step(*adapted("mlp", soft, losses, checkpointing=True), task_types=types)
    assert_same(plain, checked)


def test_checkpointing_is_active():
    """The equality above would hold trivially if checkpointing never ran: count the
    recomputed routing calls through the side channel's flag."""
    model, adapter = adapted("all", ROUTERS["topk"], checkpointing=True)
    seen = []
    original = adapter.state.record

    def spy(name, *args):
        seen.append(adapter.state.recomputing)
        original(name, *args)

    adapter.state.record = spy
    step(model, adapter)
    assert seen.count(False) == len(adapter.layers)  # the forward records every layer once
    assert seen.count(True) == len(adapter.layers)  # the backward re-ran them, unrecorded


@pytest.mark.parametrize("estimator", ["expected", "reference"])
def test_checkpointing_in_search_matches_gsv_gradients(estimator):
    def search(checkpointing):
        model = tiny_llama()
        adapter = inject_search(
            model,
            base_model="tiny",
            max_experts=4,
            max_rank=4,
            top_k=2,
            estimator=estimator,
            lora_dropout=0.1,
            losses=LOSSES,
        )
        result = step(*prepared(model, adapter, checkpointing, seed=3))
        gsv = {n: p.grad for n, p in gsv_parameters(adapter).items()}
        return result, gsv

    (plain, gsv), (checked, c_gsv) = search(False), search(True)
    assert_same(plain, checked)
    assert gsv.keys() == c_gsv.keys() and any(g.abs().sum() > 0 for g in gsv.values())
    for name, g in gsv.items():
        torch.testing.assert_close(c_gsv[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_second_order_search_refuses_checkpointing():
    from guilomo.config import SearchConfig
    from guilomo.stages.bilevel import BilevelSearch

    with pytest.raises(ValueError, match="gradient_checkpointing supports order 'first' only"):
        SearchConfig(order="second", gradient_checkpointing=True)
    model = tiny_llama()
    adapter = inject_search(model, base_model="tiny", max_experts=2, max_rank=2, top_k=1)
    adapter.enable_checkpointing()
    BilevelSearch(model, adapter, total_steps=4, order="first")  # first order is fine
    with pytest.raises(ValueError, match="recompute at the real weights"):
        BilevelSearch(model, adapter, total_steps=4, order="second")
