import json

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from guilomo.moe import Allocation, ModuleAllocation, build_allocation
from guilomo.plots import (
    allocation_heatmaps,
    experts_grid,
    gsv_trajectories,
    ranks_grid,
    selected_experts,
    selected_mean_rank,
)
from guilomo.stages.search import STATE_JSON, STATE_TENSORS

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


def test_selection_rule():
    g = np.array([[0.0, 0.0, 5.0, 0.0], [9.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(selected_experts(g, top_k=2), [3, 2, 4])
    r = np.zeros((3, 4, 3))
    r[:, :, 0] = 1.0  # rank 1 everywhere ...
    r[0, 1] = [0, 0, 1]  # ... but module 0 expert 1 has rank 3 (active: experts 0..2)
    r[0, 3] = [0, 0, 1]  # module 0 expert 3 is inactive: ignored
    r[1, 1] = [0, 1, 0]  # module 1: experts 0..1 active -> mean (1 + 2) / 2
    np.testing.assert_allclose(selected_mean_rank(g, r, top_k=2), [5 / 3, 1.5, 1.0])


def write_state(path, *, history=True, losses=True):
    """A fake search state: 3 logged steps, 2 modules, N_max = 4, R_max = 3."""
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    s, m, n, r = 3, len(modules), 4, 3
    g_e = torch.zeros(s, m, n)
    # argmax index per (step, module); selected = max(top_k=2, argmax + 1)
    argmax = [[0, 3], [2, 1], [3, 3]]
    for i in range(s):
        for j in range(m):
            g_e[i, j, argmax[i][j]] = 1.0
    g_r = torch.zeros(s, m, n, r)
    g_r[..., 1] = 1.0  # every expert has rank 2 ...
    g_r[2, 0, :, :] = torch.tensor([0.0, 0.0, 1.0])  # ... except step 2, module 0: rank 3
    tensors = {"rng": torch.zeros(4, dtype=torch.uint8)}
    if history:
        tensors |= {
            "history.step": torch.tensor([0, 5, 10]),
            "history.expert": g_e,
            "history.rank": g_r,
        }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / STATE_TENSORS))
    doc = {
        "kind": "guilomo-search-state",
        "version": 1,
        "base_model": "m",
        "modules": modules,
        "shapes": {name: [8, 8] for name in modules},
        "config": {"top_k": 2, "max_experts": n, "max_rank": r},
        "losses": [
            {"step": k, "train_loss": 3.0 - 0.2 * k, "val_loss": 3.1 - 0.15 * k} for k in range(11)
        ]
        if losses
        else [],
    }
    (path / STATE_JSON).write_text(json.dumps(doc))
    return g_e.numpy(), g_r.numpy()


def test_gsv_trajectories(tmp_path):
    g_e, g_r = write_state(tmp_path / "state")
    # hand-computed from the argmax table: max(2, argmax + 1)
    np.testing.assert_array_equal(selected_experts(g_e, 2), [[2, 4], [3, 2], [4, 4]])
    np.testing.assert_allclose(selected_mean_rank(g_e, g_r, 2), [[2, 2], [2, 2], [3, 2]])

    paths = gsv_trajectories(tmp_path / "state", tmp_path / "out")
    assert [p.name for p in paths] == ["gsv_experts.png", "gsv_ranks.png", "search_loss.png"]
    for p in paths:
        assert_png(p)


def test_gsv_trajectories_without_losses(tmp_path):
    write_state(tmp_path / "state", losses=False)
    paths = gsv_trajectories(tmp_path / "state", tmp_path / "out")
    assert [p.name for p in paths] == ["gsv_experts.png", "gsv_ranks.png"]


def test_gsv_trajectories_without_history(tmp_path):
    state = tmp_path / "state"
    write_state(state, history=False)
    with pytest.raises(ValueError, match="no GSV history") as exc:
        gsv_trajectories(state, tmp_path / "out")
    assert str(state) in str(exc.value)
    assert not (tmp_path / "out").exists()
