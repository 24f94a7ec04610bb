"""Bilevel search gradients against naive references and autograd's exact HVP."""

import copy

import pytest
import torch

from conftest import search_model
from guilomo.moe import RouterConfig
from guilomo.moe.search import gsv_parameters, weight_parameters
from guilomo.stages.bilevel import BilevelSearch


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 6), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def naive_loss(model, adapter, batch):
    out = model(**batch)
    return out.loss + adapter.aux_loss()


def test_first_order_gradient_and_step_equal_naive_reference():
    model, adapter = search_model()
    train, val = batches()
    ref_model = copy.deepcopy(model)
    search = BilevelSearch(model, adapter, total_steps=10, warmup_steps=2, order="first")
    # the reference: the same adapter in a copied model, driven by .backward() and .grad
    ref_adapter = copy.copy(adapter)
    ref_adapter.layers = {n: ref_model.get_submodule(n) for n in adapter.layers}
    ref_adapter.state = next(iter(ref_adapter.layers.values())).state
    ref_model.register_forward_pre_hook(ref_adapter._capture_mask, with_kwargs=True)
    alpha_ref = gsv_parameters(ref_adapter)
    w_ref = weight_parameters(ref_adapter)

    g_alpha, _ = search.upper_gradient(train, val)
    naive_loss(ref_model, ref_adapter, val).backward()
    for g, p in zip(g_alpha, alpha_ref.values(), strict=True):
        torch.testing.assert_close(g, p.grad)

    # one full step against the hand-driven optimisers
    opt_a = torch.optim.AdamW(alpha_ref.values(), lr=3e-3, betas=(0.5, 0.999), weight_decay=0.0)
    opt_w = torch.optim.AdamW(w_ref.values(), lr=3e-4 * 0.5, weight_decay=0.0)  # warm-up 1/2
    for p in w_ref.values():
        p.grad = None
    opt_a.step()
    opt_a.zero_grad()
    for p in w_ref.values():
        p.grad = None
    naive_loss(ref_model, ref_adapter, train).backward()
    opt_w.step()
    search.step(train, val)
    for (k, p), q in zip(
        {**search.alpha, **search.w}.items(), [*alpha_ref.values(), *w_ref.values()], strict=True
    ):
        torch.testing.assert_close(p, q, msg=lambda m, k=k: f"{k}: {m}")


def test_second_order_gradient_matches_exact_hessian_vector_product():
    # soft routing: top-k choices would flip under the finite-difference perturbation
    model, adapter = search_model(torch.float64, router=RouterConfig(kind="soft"))
    train, val = batches(1)
    # fd_scale 1e-3 instead of the method's 0.01: the central difference's O(eps^2) error
    # then sits well below the tolerance (at 0.01 it is a few % of the term, by design)
    search = BilevelSearch(
        model, adapter, total_steps=10, warmup_steps=1, order="second", lora_lr=0.05, fd_scale=1e-3
    )
    xi = search.sched.get_last_lr()[0]
    w = list(search.w.values())
    alpha = list(search.alpha.values())

    g_alpha, _ = search.upper_gradient(train, val)

    # exact: term1 at w' (naively, by setting the weights), minus xi * H v by double backward
    saved = [p.detach().clone() for p in w]
    g_train = torch.autograd.grad(naive_loss(model, adapter, train), w)
    with torch.no_grad():
        for p, g in zip(w, g_train, strict=True):
            p.sub_(xi * g)
    grads = torch.autograd.grad(naive_loss(model, adapter, val), w + alpha)
    v, term1 = grads[: len(w)], grads[len(w) :]
    with torch.no_grad():
        for p, s in zip(w, saved, strict=True):
            p.copy_(s)
    g_w = torch.autograd.grad(naive_loss(model, adapter, train), w, create_graph=True)
    dot = sum((g * d).sum() for g, d in zip(g_w, v, strict=True))
    hvp = torch.autograd.grad(dot, alpha, allow_unused=True)
    hvp = [torch.zeros_like(a) if h is None else h for a, h in zip(alpha, hvp, strict=True)]
    expected = [t - xi * h for t, h in zip(term1, hvp, strict=True)]
    assert sum(float(h.abs().sum()) for h in hvp) > 0  # the second-order term is not trivial
    # finite differences vs exact: close, and far closer than the size of the term itself
    err = sum(float((g - e).abs().sum()) for g, e in zip(g_alpha, expected, strict=True))
    second = sum(float((xi * h).abs().sum()) for h in hvp)
    assert err < 0.01 * second, (err, second)
    for got, want in zip(g_alpha, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("order", ["first", "second"])
def test_virtual_step_leaves_optimiser_state_alone(order):
    model, adapter = search_model()
    train, val = batches()
    search = BilevelSearch(model, adapter, total_steps=10, order=order)
    before = {k: p.detach().clone() for k, p in search.w.items()}
    search.upper_gradient(train, val)
    assert not search.opt_w.state and not search.opt_alpha.state
    for k, p in search.w.items():
        assert torch.equal(p, before[k]) and p.grad is None
    info = search.step(train, val)
    assert set(info) == {"val_loss", "train_loss"}


def test_gsv_learning_rate_decays_over_the_last_share_of_steps():
    model, adapter = search_model()
    train, val = batches()
    search = BilevelSearch(model, adapter, total_steps=10, gsv_lr=3e-3, gsv_decay=0.3)
    lrs = []
    for _ in range(10):
        search.step(train, val)
        lrs.append(search.opt_alpha.param_groups[0]["lr"])
    # decay from step 7 = (1 - 0.3) * 10: factors (10 - s) / 3 for s = 7, 8, 9
    want = [3e-3] * 7 + [3e-3 * 3 / 3, 3e-3 * 2 / 3, 3e-3 * 1 / 3]
    assert lrs == pytest.approx(want)
    flat = BilevelSearch(model, adapter, total_steps=10, gsv_decay=0.0)
    assert [flat.gsv_factor(s) for s in range(12)] == [1.0] * 12
