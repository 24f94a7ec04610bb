"""The search stage: a run, resume after interruption, state checks, allocation from state."""

import pytest
import torch

from conftest import tiny_llama
from guilomo.artifacts.search_state import SearchStateError, read_state
from guilomo.moe.search import allocation_parameters, mode_parameters
from guilomo.stages.allocate import AllocationInputError, allocation_from_state
from guilomo.stages.search import SearchConfig, SearchRun

CFG = SearchConfig(
    max_experts=3,
    max_rank=2,
    top_k=1,
    steps=6,
    warmup_steps=2,
    lora_lr=1e-2,
    checkpoint_every=2,
    lora_dropout=0.1,
    seed=3,
)


def data(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def run(out, stop_after=None, model=None, config=CFG):
    torch.manual_seed(0)
    search = SearchRun(model or tiny_llama(num_hidden_layers=2), config, base_model="tiny")
    result = search.run(data(0), data(1), out, stop_after=stop_after)
    return search, result


def test_interrupted_search_resumes_to_the_same_state(tmp_path):
    _, full = run(tmp_path / "full")
    _, first = run(tmp_path / "resumed", stop_after=4)
    assert first.steps == 4
    _, second = run(tmp_path / "resumed")
    assert second.resumed_from == 4 and second.steps == 6
    doc_a, ta = read_state(tmp_path / "full")
    doc_b, tb = read_state(tmp_path / "resumed")
    assert ta.keys() == tb.keys()
    for k in ta:
        if k != "rng":
            torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert doc_a["losses"] == doc_b["losses"]
    assert tb["history.expert"].shape == (6, len(doc_b["modules"]), 3)


def test_a_search_from_scratch_is_the_same_whatever_the_callers_rng(tmp_path):
    states = []
    for i in range(2):
        model = tiny_llama(num_hidden_layers=2)
        torch.manual_seed(1000 + i)  # init and dropout must come from config.seed alone
        SearchRun(model, CFG, base_model="tiny").run(data(0), data(1), tmp_path / str(i))
        states.append(read_state(tmp_path / str(i))[1])
    for k in states[0]:
        if k != "rng":
            torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0)


def test_state_for_another_model_or_config_is_refused(tmp_path):
    run(tmp_path / "s", stop_after=2)
    with pytest.raises(SearchStateError, match="searched on another model"):
        run(tmp_path / "s", model=tiny_llama(num_hidden_layers=3))
    with pytest.raises(SearchStateError, match="another config"):
        run(tmp_path / "s", config=CFG.model_copy(update={"gsv_lr": 1e-2}))
    (tmp_path / "s" / "search_state.json").write_text("{")
    with pytest.raises(SearchStateError, match="not valid JSON"):
        read_state(tmp_path / "s")


def test_allocation_from_state(tmp_path):
    search, _ = run(tmp_path / "s")
    alloc, params = allocation_from_state(tmp_path / "s")
    assert set(alloc.modules) == set(search.adapter.layers)
    for name, layer in search.adapter.layers.items():
        experts, ranks = layer.gsv.choice()
        assert alloc.modules[name].experts == experts and alloc.modules[name].ranks == ranks
    assert params == allocation_parameters(alloc, search.shapes)
    assert mode_parameters(search.adapter) == params  # what the size controller steers is extracted
    smaller, p2 = allocation_from_state(tmp_path / "s", budget=params - 1)
    assert p2 <= params - 1
    with pytest.raises(AllocationInputError, match="smaller than the minimal allocation"):
        allocation_from_state(tmp_path / "s", budget=10)
    other = {n: (s[0] + 1, s[1]) for n, s in search.shapes.items()}
    with pytest.raises(SearchStateError, match="another model"):
        allocation_from_state(tmp_path / "s", module_shapes=other)


def test_config_errors():
    with pytest.raises(ValueError, match="top_k"):
        SearchConfig(max_experts=2, top_k=3)
    with pytest.raises(ValueError, match="mixlora"):
        SearchConfig(placement="mixlora")
    with pytest.raises(ValueError, match="Extra inputs"):
        SearchConfig(epochs=3)
