import json

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from guilomo.artifacts.search_state import STATE_JSON, STATE_TENSORS, read_state
from guilomo.moe import Allocation, ModuleAllocation, build_allocation
from guilomo.moe.gsv import choose
from guilomo.plots import (
    SearchSettings,
    allocation_heatmaps,
    capacity_series,
    changed_shares,
    expected_capacity,
    experts_grid,
    final_grids,
    gsv_trajectories,
    ranks_grid,
    selected_modes,
    settle_step,
)

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def names(n_layers):
    out = []
    for i in range(n_layers):
        out += [f"model.layers.{i}.self_attn.{p}" for p in ATTN]
        out += [f"model.layers.{i}.mlp.{p}" for p in MLP]
    return out


def assert_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_allocation_heatmaps_data_and_pngs(tmp_path):
    alloc = build_allocation(
        base_model="m", module_names=names(4), preset="2468", top_k=2, rank=8, placement="all"
    )
    rows, cols, grid = experts_grid(alloc)
    assert rows == [*ATTN, *MLP]
    assert cols == ["0", "1", "2", "3"]
    expected = np.tile(np.array([2.0, 4.0, 6.0, 8.0]), (7, 1))
    np.testing.assert_array_equal(grid, expected)

    labels, rgrid = ranks_grid(alloc)
    assert len(labels) == 28 and rgrid.shape == (28, 8)
    assert labels[:8] == [f"L0.{p}" for p in (*ATTN, *MLP)] + ["L1.q_proj"]
    assert labels[-1] == "L3.down_proj"
    for r, label in enumerate(labels):
        n = [2, 4, 6, 8][int(label[1])]
        np.testing.assert_array_equal(rgrid[r, :n], 8.0)
        assert np.isnan(rgrid[r, n:]).all()

    out = tmp_path / "figs" / "nested"
    paths = allocation_heatmaps(alloc, out)
    assert [p.name for p in paths] == ["allocation_experts.png", "allocation_ranks.png"]
    for p in paths:
        assert_png(p)


def test_grids_with_uneven_ranks_and_modules_outside_layers(tmp_path):
    alloc = Allocation(
        base_model="m",
        modules={
            "model.layers.1.mlp.down_proj": ModuleAllocation(experts=3, top_k=1, ranks=[4, 2, 1]),
            "model.layers.0.self_attn.q_proj": ModuleAllocation(experts=1, top_k=1, ranks=[5]),
            "lm_head": ModuleAllocation(experts=2, top_k=1, ranks=[3, 6]),
        },
    )
    rows, cols, grid = experts_grid(alloc)
    assert rows == ["q_proj", "down_proj", "lm_head"]
    assert cols == ["0", "1", "lm_head"]
    nan = np.nan
    np.testing.assert_array_equal(
        grid, np.array([[1, nan, nan], [nan, 3, nan], [nan, nan, 2]], dtype=float)
    )
    labels, rgrid = ranks_grid(alloc)
    assert labels == ["L0.q_proj", "L1.down_proj", "lm_head"]
    np.testing.assert_array_equal(
        rgrid, np.array([[5, nan, nan], [4, 2, 1], [3, 6, nan]], dtype=float)
    )
    for p in allocation_heatmaps(alloc, tmp_path):
        assert_png(p)


def test_selected_modes_match_choose():
    gen = torch.Generator().manual_seed(0)
    expert = torch.randn(4, 5, 6, generator=gen)
    rank = torch.randn(4, 5, 6, 3, generator=gen)
    for estimator, tau in (("expected", 0.3), ("reference", 1.0)):
        settings = SearchSettings(top_k=2, estimator=estimator, tau=tau)
        n, ranks = selected_modes(expert, rank, settings)
        assert n.shape == (4, 5) and ranks.shape == (4, 5, 6)
        for s in range(4):
            for m in range(5):
                want_n, want_ranks = choose(
                    expert[s, m], rank[s, m], top_k=2, estimator=estimator, tau=tau
                )
                assert n[s, m] == want_n
                assert ranks[s, m, :want_n].tolist() == want_ranks


def test_expected_capacity_by_hand():
    # expected, tau 1: the GSVs are log-probabilities. top_k 2 folds P(1) into P(2):
    # q = [0, 0.3, 0.3, 0.4], E[n] = 3.1, P(n >= j) = [1, 1, 0.7, 0.4].
    expert = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    rank = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1], [0.1, 0.9]]))
    n, r = expected_capacity(expert, rank, SearchSettings(top_k=2, estimator="expected", tau=1))
    assert n == pytest.approx(3.1)
    assert r == pytest.approx((1.5 + 1.75 + 0.7 * 1.1 + 0.4 * 1.9) / 3.1)

    # reference: n = max(top_k, argmax + 1), mean of argmax + 1 over the first n experts
    expert = torch.tensor([[0.0, 0.1, 0.9, 0.2], [0.9, 0.1, 0.0, 0.2]])
    rank = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]).expand(2, 4, 2)
    n, r = expected_capacity(expert, rank, SearchSettings(top_k=2, estimator="reference", tau=1))
    np.testing.assert_allclose(n, [3, 2])
    np.testing.assert_allclose(r, [5 / 3, 1.5])


def test_changed_shares_and_settle_step():
    # 3 modules, N = 3; the last step is the final selection: n = [2, 1, 3], ranks below
    n = np.array([[1, 1, 3], [2, 1, 3], [2, 1, 3]])
    ranks = np.ones((3, 3, 3), dtype=int)
    ranks[0, 2, 2] = 4  # step 0, module 2: a selected expert's rank differs
    ranks[1, 1, 2] = 4  # step 1, module 1: an unselected expert (n = 1): no difference
    changed, count = changed_shares(n, ranks)
    np.testing.assert_allclose(changed, [2 / 3, 0, 0])
    np.testing.assert_allclose(count, [1 / 3, 0, 0])

    assert settle_step([0, 1, 2, 3], [0.5, 0.5, 0, 0]) == 2
    assert settle_step([0, 10, 20, 30], [1, 1, 0, 0]) == 20  # logged steps, not +1
    assert settle_step([0, 1, 2], [0, 0, 0]) == 0
    assert settle_step([4], [0]) == 4
    assert settle_step([0, 1, 2, 3], [0.5, 0, 0.5, 0]) is None  # changed at the last step
    assert settle_step([0, 1], [1, 0]) is None


STEPS = 6


def write_state(path, *, history=True, losses=True, estimator="expected", sizes=False):
    """A fake search state, N_max = 3, R_max = 2, top_k = 1, tau = 1, steps 0..5, whose GSVs
    are log-probabilities (softmax gives them back):

    A  L0.q_proj     p_E [.7 .2 .1] (mode 1) until step 2, then [.1 .2 .7] (mode 3); p_R of
                     every expert [.25 .75] (mode 2)
    B  L1.q_proj     p_E [.2 .6 .2] (mode 2); expert 0's p_R [.6 .4] (mode 1) until step 1,
                     then [.25 .75]; expert 1's [.8 .2] (mode 1); expert 2's [.25 .75]
    C  L0.down_proj  p_E [.6 .3 .1] (mode 1); expert 2 (never selected) p_R [.9 .1] at
                     step 1, else [.25 .75], like the others

    So the selection differs from the final one for A (count) at steps 0-2 and for B (a
    rank) at steps 0-1: it settles at step 3.
    """
    modules = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
    ]
    pe = torch.empty(STEPS, 3, 3)
    pe[:3, 0] = torch.tensor([0.7, 0.2, 0.1])
    pe[3:, 0] = torch.tensor([0.1, 0.2, 0.7])
    pe[:, 1] = torch.tensor([0.2, 0.6, 0.2])
    pe[:, 2] = torch.tensor([0.6, 0.3, 0.1])
    pr = torch.tensor([0.25, 0.75]).repeat(STEPS, 3, 3, 1)
    pr[:2, 1, 0] = torch.tensor([0.6, 0.4])
    pr[:, 1, 1] = torch.tensor([0.8, 0.2])
    pr[1, 2, 2] = torch.tensor([0.9, 0.1])
    tensors = {"rng": torch.zeros(4, dtype=torch.uint8)}
    if history:
        tensors |= {
            "history.step": torch.arange(STEPS),
            "history.expert": pe.log(),
            "history.rank": pr.log(),
        }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / STATE_TENSORS))
    config = {"top_k": 1, "max_experts": 3, "max_rank": 2}
    if estimator is not None:
        config |= {"estimator": estimator, "tau": 1.0}
    entries = []
    if losses:
        for k in range(STEPS):
            entries.append({"step": k, "train_loss": 3.0 - 0.2 * k, "val_loss": 3.1 - 0.15 * k})
            if sizes:
                entries[-1] |= {"expected_params": 900 - 20 * k, "mode_params": 1000 - 40 * k}
    doc = {
        "kind": "guilomo-search-state",
        "version": 1,
        "base_model": "m",
        "modules": modules,
        "shapes": {name: [8, 8] for name in modules},
        "config": config,
        "losses": entries,
        "target_params": 850 if sizes else None,
    }
    (path / STATE_JSON).write_text(json.dumps(doc))
    return doc


def read(path):
    return read_state(path)


def test_capacity_series_expected(tmp_path):
    write_state(tmp_path / "state")
    c = capacity_series(*read(tmp_path / "state"))
    np.testing.assert_array_equal(c.steps, np.arange(STEPS))
    assert c.kinds == ["q_proj", "down_proj"]
    # E[n]: A 1.4 then 2.6, B 2.0, C 1.5
    np.testing.assert_allclose(c.experts[0], [1.7] * 3 + [2.3] * 3, rtol=1e-5)
    np.testing.assert_allclose(c.experts[1], [1.5] * STEPS, rtol=1e-5)
    np.testing.assert_allclose(c.all_experts, [4.9 / 3] * 3 + [6.1 / 3] * 3, rtol=1e-5)
    # rank per expert, weighted by P(n >= j): A 1.75; B (1.4 or 1.75 + .8 * 1.2 + .2 * 1.75)
    # / 2.0; C (1.75 + .4 * 1.75 + .1 * (1.1 at step 1, else 1.75)) / 1.5
    np.testing.assert_allclose(c.rank[0], [(1.75 + 2.71 / 2) / 2] * 2 + [1.64] * 4, rtol=1e-5)
    down = [1.75] * STEPS
    down[1] = 2.56 / 1.5
    np.testing.assert_allclose(c.rank[1], down, rtol=1e-5)
    np.testing.assert_allclose(c.changed, [2 / 3, 2 / 3, 1 / 3, 0, 0, 0])
    np.testing.assert_allclose(c.count_changed, [1 / 3, 1 / 3, 1 / 3, 0, 0, 0])
    assert c.settled == 3

    layers, kinds, experts, mean_rank = final_grids(*read(tmp_path / "state"))
    assert layers == ["0", "1"] and kinds == ["q_proj", "down_proj"]
    nan = np.nan
    np.testing.assert_array_equal(experts, [[3, 1], [2, nan]])
    np.testing.assert_array_equal(mean_rank, [[2, 2], [1.5, nan]])


def test_capacity_series_old_state_is_reference(tmp_path):
    # no "estimator" in the config: the reference rule, n = max(top_k, argmax + 1)
    write_state(tmp_path / "state", estimator=None)
    c = capacity_series(*read(tmp_path / "state"))
    assert c.settings == SearchSettings(top_k=1, estimator="reference", tau=1.0)
    np.testing.assert_allclose(c.experts[0], [1.5] * 3 + [2.5] * 3)  # A 1 then 3, B 2
    np.testing.assert_allclose(c.experts[1], [1.0] * STEPS)
    # mean argmax rank over the first n: A 2; B [1, 1] then [2, 1]; C 2
    np.testing.assert_allclose(c.rank[0], [1.5] * 2 + [1.75] * 4)
    np.testing.assert_allclose(c.rank[1], [2.0] * STEPS)
    assert c.settled == 3


def test_gsv_trajectories(tmp_path):
    write_state(tmp_path / "state", sizes=True)
    paths = gsv_trajectories(*read(tmp_path / "state"), tmp_path / "out")
    assert [p.name for p in paths] == ["search_capacity.png", "search_final.png", "search_loss.png"]
    for p in paths:
        assert_png(p)
    # the loss figure gained the parameter panel
    write_state(tmp_path / "plain")
    plain = gsv_trajectories(*read(tmp_path / "plain"), tmp_path / "plain_out")[-1]
    assert mpimg.imread(paths[-1]).shape[0] > mpimg.imread(plain).shape[0]


def test_gsv_trajectories_without_losses(tmp_path):
    write_state(tmp_path / "state", losses=False)
    paths = gsv_trajectories(*read(tmp_path / "state"), tmp_path / "out")
    assert [p.name for p in paths] == ["search_capacity.png", "search_final.png"]


def test_gsv_trajectories_stay_compact_for_many_modules(tmp_path):
    modules = names(30)  # 210 modules
    s, n, r = 40, 8, 8
    gen = torch.Generator().manual_seed(1)
    state = tmp_path / "state"
    state.mkdir()
    save_file(
        {
            "history.step": torch.arange(0, 5 * s, 5),
            "history.expert": torch.randn(s, len(modules), n, generator=gen),
            "history.rank": torch.randn(s, len(modules), n, r, generator=gen),
        },
        str(state / STATE_TENSORS),
    )
    doc = {
        "kind": "guilomo-search-state",
        "modules": modules,
        "config": {"top_k": 2, "estimator": "expected", "tau": 0.5},
        "losses": [{"step": k, "train_loss": 1.0, "val_loss": 1.0} for k in range(5 * s)],
        "target_params": None,
    }
    (state / STATE_JSON).write_text(json.dumps(doc))
    c = capacity_series(*read(state))
    assert c.kinds == [*ATTN, *MLP] and c.experts.shape == (7, s)
    assert c.settled is None  # random GSVs: every step differs
    paths = gsv_trajectories(*read(state), tmp_path / "out")
    for p in paths:
        assert_png(p)
        h, w = mpimg.imread(p).shape[:2]
        assert h < 2000 and w < 2500, (p.name, h, w)


def test_gsv_trajectories_without_history(tmp_path):
    state = tmp_path / "state"
    write_state(state, history=False)
    with pytest.raises(ValueError, match="no GSV history") as exc:
        gsv_trajectories(*read(state), tmp_path / "out", where=state)
    assert str(state) in str(exc.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="no GSV history"):
        capacity_series(*read(state))
