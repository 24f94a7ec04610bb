"""Auxiliary losses against hand calculations."""

import math

import pytest
import torch

from guilomo.moe import LossConfig, aux_loss, balance_loss, localized_balance_loss, z_loss
from guilomo.moe.layer import RoutingRecord
from guilomo.moe.routing import Routing, topk_route


def record(logits, k=1, mask=None, batch_shape=None):
    probs = logits.softmax(-1)
    w, sel = topk_route(probs, k)
    return RoutingRecord(Routing(w, sel, logits, probs), mask, batch_shape or (logits.shape[0],))


def test_balance_loss_by_hand():
    # 3 tokens, 2 experts, top-1. probs: t0=(.8,.2) t1=(.6,.4) t2=(.3,.7)
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    rec = record(probs.log())
    f = [2 / 3, 1 / 3]
    p = [(0.8 + 0.6 + 0.3) / 3, (0.2 + 0.4 + 0.7) / 3]
    expected = 2 * (f[0] * p[0] + f[1] * p[1])
    assert balance_loss(rec).item() == pytest.approx(expected, rel=1e-6)


def test_balance_loss_ignores_padding():
    logits = torch.randn(6, 4)
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    masked = balance_loss(record(logits, 2, mask))
    only_valid = balance_loss(record(logits[mask], 2))
    torch.testing.assert_close(masked, only_valid)
    garbage = logits.clone()
    garbage[~mask] = 100 * torch.randn(2, 4)
    torch.testing.assert_close(balance_loss(record(garbage, 2, mask)), masked)


def test_z_loss_by_hand_and_masked():
    logits = torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, -1.0]])
    mask = torch.tensor([True, True, False])
    expected = (math.log(math.e + math.e**2) ** 2 + math.log(2.0) ** 2) / 2
    assert z_loss(record(logits, mask=mask)).item() == pytest.approx(expected, rel=1e-6)


def test_localized_balance_by_hand():
    # 2 examples x 2 tokens, 4 experts in 2 groups; soft gates given directly
    gates = torch.tensor(
        [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]
    )
    mask = torch.tensor([True, True, True, False])  # last token is padding
    rec = RoutingRecord(Routing(gates, gates > 0, gates.log(), gates), mask, (2, 2))
    task = torch.tensor([0, 1])
    beta = 0.2
    q = [[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]]
    imp = [[1.2, 1.2, 0.8, 0.8], [0.8, 0.8, 1.2, 1.2]]
    v = [imp[b][e] * q[b][e] for b in range(2) for e in range(4)]
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / (len(v) - 1)
    got = localized_balance_loss(rec, task, groups=2, beta=beta)
    assert got.item() == pytest.approx(var / mean**2, rel=1e-5)


def test_aux_loss_sums_enabled_terms_and_needs_task_types():
    recs = [record(torch.randn(5, 3), 2, batch_shape=(1, 5)) for _ in range(3)]
    cfg = LossConfig(balance_coef=0.01, z_loss_coef=0.001)
    expected = sum(0.01 * balance_loss(r) + 0.001 * z_loss(r) for r in recs)
    torch.testing.assert_close(aux_loss(recs, cfg), expected)
    assert aux_loss(recs, LossConfig(balance_coef=0.0)) is None
    with pytest.raises(ValueError, match="task type"):
        aux_loss(recs, LossConfig(localized_coef=0.1))
