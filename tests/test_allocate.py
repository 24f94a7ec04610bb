"""Allocation extraction from GSVs, parameter budgets, and the reference's JSON files."""

import functools
import json

import pytest
import torch

from guilomo.moe.search import allocation_parameters, extract_allocation, module_parameters
from guilomo.stages.allocate import AllocationInputError, import_reference_json

SHAPES = {"a.q_proj": (8, 8), "b.q_proj": (8, 16)}


def onehot(n, i, high=3.0):
    v = torch.zeros(n)
    v[i] = high
    return v


def test_extract_by_argmax_with_top_k_floor():
    gsvs = {
        "a.q_proj": (
            onehot(4, 2),
            torch.stack([onehot(3, 0), onehot(3, 2), onehot(3, 1), onehot(3, 0)]),
        ),
        "b.q_proj": (onehot(4, 0), torch.stack([onehot(3, 1)] * 4)),  # argmax 0 -> floor at top_k
    }
    alloc = extract_allocation(gsvs, base_model="m", top_k=2, shapes=SHAPES, estimator="reference")
    assert alloc.modules["a.q_proj"].experts == 3
    assert alloc.modules["a.q_proj"].ranks == [1, 3, 2]
    assert alloc.modules["b.q_proj"].experts == 2 and alloc.modules["b.q_proj"].ranks == [2, 2]
    # parameters by hand: ranks * (d_in + d_out) + router experts * d_in
    assert allocation_parameters(alloc, SHAPES) == (6 * 16 + 3 * 8) + (4 * 24 + 2 * 8)


def test_budget_drops_smallest_values_first():
    g_e = torch.tensor([0.0, 0.0, 2.0])  # 3 experts, sigmoid values .5 .5 .88
    g_r = torch.tensor([[0.0, 5.0], [0.0, 4.0], [-1.0, 1.0]])  # ranks 2, 2, 2
    gsvs = {"a.q_proj": (g_e, g_r)}
    extract = functools.partial(extract_allocation, estimator="reference")
    full = extract(gsvs, base_model="m", top_k=1, shapes=SHAPES)
    assert full.modules["a.q_proj"].ranks == [2, 2, 2]
    size = allocation_parameters(full, SHAPES)
    # one step down: the candidates are expert 3 (s=.88), and rank 2 of experts 1..3
    # (s = sigmoid(5), sigmoid(4), sigmoid(1) = .73): expert 3's rank drops first
    cut = extract(gsvs, base_model="m", top_k=1, shapes=SHAPES, budget=size - 1)
    assert cut.modules["a.q_proj"].ranks == [2, 2, 1]
    # further: then expert 3 itself (s=.88) before the ranks of experts 1, 2 (s=.98, .99)
    cut2 = extract(gsvs, base_model="m", top_k=1, shapes=SHAPES, budget=size - 17)
    assert cut2.modules["a.q_proj"].experts == 2 and cut2.modules["a.q_proj"].ranks == [2, 2]
    assert allocation_parameters(cut2, SHAPES) <= size - 17


def test_budget_drops_least_likely_choice_first_expected():
    """expected (tau 1): P(n >= 3) = e^2 / (2 + e^2) = .79 is below every rank's
    P(r_j >= 2) = sigmoid(5), sigmoid(4), sigmoid(2) = .99, .98, .88: expert 3 goes first."""
    g_e = torch.tensor([0.0, 0.0, 2.0])
    g_r = torch.tensor([[0.0, 5.0], [0.0, 4.0], [-1.0, 1.0]])
    gsvs = {"a.q_proj": (g_e, g_r)}
    full = extract_allocation(gsvs, base_model="m", top_k=1, shapes=SHAPES, tau=1.0)
    assert full.modules["a.q_proj"].experts == 3 and full.modules["a.q_proj"].ranks == [2, 2, 2]
    size = allocation_parameters(full, SHAPES)
    cut = extract_allocation(gsvs, base_model="m", top_k=1, shapes=SHAPES, tau=1.0, budget=size - 1)
    assert cut.modules["a.q_proj"].experts == 2 and cut.modules["a.q_proj"].ranks == [2, 2]
    # candidates are expert 2 (P(n >= 2) = (1 + e^2) / (2 + e^2) = .89) and ranks .99, .98
    cut2 = extract_allocation(
        gsvs,
        base_model="m",
        top_k=1,
        shapes=SHAPES,
        tau=1.0,
        budget=allocation_parameters(cut, SHAPES) - 1,
    )
    assert cut2.modules["a.q_proj"].experts == 1 and cut2.modules["a.q_proj"].ranks == [2]


def test_budget_below_minimum_is_refused():
    gsvs = {n: (onehot(4, 3), torch.stack([onehot(4, 3)] * 4)) for n in SHAPES}
    minimal = sum(module_parameters(s, 2, [1, 1]) for s in SHAPES.values())
    alloc = extract_allocation(gsvs, base_model="m", top_k=2, shapes=SHAPES, budget=minimal)
    assert allocation_parameters(alloc, SHAPES) == minimal
    with pytest.raises(ValueError, match="smaller than the minimal allocation"):
        extract_allocation(gsvs, base_model="m", top_k=2, shapes=SHAPES, budget=minimal - 1)


def write_reference(tmp_path, experts, ranks):
    (tmp_path / "expert.json").write_text(json.dumps(experts))
    (tmp_path / "rank.json").write_text(json.dumps(ranks))
    return tmp_path / "expert.json", tmp_path / "rank.json"


def test_import_reference_json(tmp_path):
    e, r = write_reference(
        tmp_path,
        {"base_model.model.a.q_proj": 3, "base_model.model.b.q_proj": 2},
        {
            **{f"base_model.model.a.q_proj.expertlora_E_vector_{j}": j + 1 for j in range(3)},
            **{f"base_model.model.b.q_proj.expertlora_E_vector_{j}": 4 for j in range(2)},
        },
    )
    alloc = import_reference_json(e, r, base_model="m", module_names=list(SHAPES), top_k=2)
    assert alloc.modules["a.q_proj"].ranks == [1, 2, 3]
    assert alloc.modules["b.q_proj"].ranks == [4, 4]


def test_import_reference_json_bad_input(tmp_path):
    e, r = write_reference(
        tmp_path, {"a.q_proj": 2}, {f"a.q_proj.expertlora_E_vector_{j}": 2 for j in range(2)}
    )
    with pytest.raises(AllocationInputError, match=r"expert.json: 1 modules, the model has 2"):
        import_reference_json(e, r, base_model="m", module_names=list(SHAPES), top_k=1)
    e, r = write_reference(
        tmp_path,
        {"a.q_proj": 2, "b.q_proj": 2},
        {f"a.q_proj.expertlora_E_vector_{j}": 2 for j in range(2)},
    )
    with pytest.raises(
        AllocationInputError, match=r"rank.json: no rank for b.q_proj.expertlora_E_vector_0"
    ):
        import_reference_json(e, r, base_model="m", module_names=list(SHAPES), top_k=1)
    (tmp_path / "expert.json").write_text("{oops")
    with pytest.raises(AllocationInputError, match=r"expert.json: not valid JSON \(line 1"):
        import_reference_json(e, r, base_model="m", module_names=list(SHAPES), top_k=1)


def test_import_reference_json_refuses_top_k_above_a_modules_experts(tmp_path):
    experts = {"a.q_proj": 3, "b.q_proj": 2}
    ranks = {f"{m}.expertlora_E_vector_{j}": 4 for m, n in experts.items() for j in range(n)}
    e, r = write_reference(tmp_path, experts, ranks)
    with pytest.raises(
        AllocationInputError,
        match=r"expert.json: top_k \(--top-k\) is 3, but b.q_proj has only 2 expert\(s\): lower "
        r"--top-k to 2 or less, or give it more experts",
    ):
        import_reference_json(e, r, base_model="m", module_names=list(SHAPES), top_k=3)
    alloc = import_reference_json(e, r, base_model="m", module_names=list(SHAPES), top_k=2)
    assert [m.top_k for m in alloc.modules.values()] == [2, 2]
