"""Figures of an allocation and of a GSV search (PNG, matplotlib's Agg backend).

`allocation_heatmaps` draws how many experts each module got and the rank of every expert;
`gsv_trajectories` draws, from a search state folder, the expert count and mean rank the
GSVs select at every logged step, and the search's train/val loss.

The matrices behind each figure come from small pure helpers (`experts_grid`, `ranks_grid`,
`selected_experts`, `selected_mean_rank`) so they can be checked without looking at pixels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .moe.config import Allocation
from .stages.search import read_state

DPI = 120
#: Rows of a projection-kind heatmap, in this order when present; other kinds follow sorted.
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Cells are annotated with their number when the grid has at most this many columns.
ANNOTATE_MAX_COLS = 40
ROW_INCHES = 0.18
MAX_INCHES = 40.0

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# -- module names ----------------------------------------------------------------------------
def _parse(name: str) -> tuple[str, int, str] | None:
    """``(prefix, layer, suffix)`` of ``<prefix>layers.<i>.<suffix>``, or None without a layer."""
    m = _LAYER.search(name)
    if m is None:
        return None
    return name[: m.start(1) - len("layers.")], int(m.group(1)), name[m.end() :]


def _kind_key(kind: str) -> tuple[int, str]:
    last = kind.rsplit(".", 1)[-1]
    return (KIND_ORDER.index(last) if last in KIND_ORDER else len(KIND_ORDER), kind)


def _prefix_tag(prefix: str) -> str:
    """A short tag for a module prefix (``model.vision.encoder.`` -> ``encoder``)."""
    parts = [p for p in prefix.split(".") if p]
    return parts[-1] if parts else "layers"


class _Layout:
    """Where each module of a list goes: its layer column, projection-kind row and label."""

    def __init__(self, names: Sequence[str]) -> None:
        parsed = {n: _parse(n) for n in names}
        layered = {n: p for n, p in parsed.items() if p is not None}
        self.unlayered = [n for n, p in parsed.items() if p is None]
        prefixes = sorted({p[0] for p in layered.values()})
        self.multi_prefix = len(prefixes) > 1

        def kinds(full: bool) -> dict[str, str]:
            return {n: (p[2] if full else p[2].rsplit(".", 1)[-1]) for n, p in layered.items()}

        # The last name component names the row, unless two modules of one layer share it
        # (e.g. ``mlp.down_proj`` and ``mlp.experts.0.down_proj``): then the full suffix does.
        self.kind = kinds(False)
        cells = [(p[0], p[1], self.kind[n]) for n, p in layered.items()]
        if len(set(cells)) < len(cells):
            self.kind = kinds(True)
        self.column = {n: (p[0], p[1]) for n, p in layered.items()}

        self.columns: list[tuple[str, int]] = sorted(set(self.column.values()))
        self.kinds: list[str] = sorted(set(self.kind.values()), key=_kind_key)
        # Modules in reading order: layer by layer, kinds in row order, then the rest.
        self.ordered = sorted(
            layered, key=lambda n: (self.column[n], _kind_key(self.kind[n]))
        ) + list(self.unlayered)

    def column_label(self, col: tuple[str, int]) -> str:
        prefix, layer = col
        return f"{_prefix_tag(prefix)}.{layer}" if self.multi_prefix else str(layer)

    def module_label(self, name: str) -> str:
        """Compact label: ``L3.q_proj`` (the full name for modules outside decoder layers)."""
        if name not in self.column:
            return name
        prefix, layer = self.column[name]
        tag = f"{_prefix_tag(prefix)}." if self.multi_prefix else ""
        return f"{tag}L{layer}.{self.kind[name]}"


# -- the matrices ----------------------------------------------------------------------------
def experts_grid(alloc: Allocation) -> tuple[list[str], list[str], np.ndarray]:
    """``(row_labels, col_labels, grid)``: expert count per projection kind x decoder layer.

    Rows are projection kinds (q, k, v, o, gate, up, down first), columns decoder layers, then
    one column per module outside the decoder layers (its row is its last name component).
    Cells without a module are NaN.
    """
    lay = _Layout(list(alloc.modules))
    rows = list(lay.kinds)
    extra_rows = sorted({n.rsplit(".", 1)[-1] for n in lay.unlayered} - set(rows), key=_kind_key)
    rows += extra_rows
    cols = [lay.column_label(c) for c in lay.columns] + list(lay.unlayered)
    grid = np.full((len(rows), len(cols)), np.nan)
    col_index = {c: j for j, c in enumerate(lay.columns)}
    for name, m in alloc.modules.items():
        if name in lay.column:
            i, j = rows.index(lay.kind[name]), col_index[lay.column[name]]
        else:
            i = rows.index(name.rsplit(".", 1)[-1])
            j = len(lay.columns) + lay.unlayered.index(name)
        grid[i, j] = m.experts
    return rows, cols, grid


def ranks_grid(alloc: Allocation) -> tuple[list[str], np.ndarray]:
    """``(labels, grid)``: rank of expert j (column) of every module (row); NaN past its last."""
    lay = _Layout(list(alloc.modules))
    n_max = max(m.experts for m in alloc.modules.values())
    grid = np.full((len(lay.ordered), n_max), np.nan)
    for i, name in enumerate(lay.ordered):
        ranks = alloc.modules[name].ranks
        grid[i, : len(ranks)] = ranks
    return [lay.module_label(n) for n in lay.ordered], grid


def selected_experts(g_expert: np.ndarray, top_k: int) -> np.ndarray:
    """Expert counts the GSVs select: ``max(top_k, argmax(g) + 1)``; (..., N_max) -> (...)."""
    g = np.asarray(g_expert)
    return np.minimum(np.maximum(top_k, g.argmax(axis=-1) + 1), g.shape[-1])


def selected_mean_rank(g_expert: np.ndarray, g_rank: np.ndarray, top_k: int) -> np.ndarray:
    """Mean selected rank (``argmax(g_rank[j]) + 1``) over the selected experts of each module.

    `g_expert` is (..., N_max) and `g_rank` (..., N_max, R_max); returns (...).
    """
    n = selected_experts(g_expert, top_k)
    ranks = np.asarray(g_rank).argmax(axis=-1) + 1  # (..., N_max)
    active = np.arange(ranks.shape[-1]) < n[..., None]
    return (ranks * active).sum(axis=-1) / active.sum(axis=-1)


# -- drawing ---------------------------------------------------------------------------------
def _tall_figure(n_rows: int, width: float) -> tuple[Figure, Axes]:
    height = min(MAX_INCHES, max(3.0, ROW_INCHES * n_rows + 1.6))
    return plt.subplots(figsize=(width, height), dpi=DPI)


def _heatmap(
    fig: Figure,
    ax: Axes,
    grid: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    cbar_label: str,
    annotate: bool,
) -> None:
    data = np.ma.masked_invalid(grid)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    im = ax.imshow(data, cmap=cmap, aspect="auto", interpolation="nearest")
    values = grid[~np.isnan(grid)]
    if values.size and values.min() == values.max():  # one value: centre it on the colour scale
        im.set_clim(values.min() - 1, values.max() + 1)
    integer = bool(values.size) and np.allclose(values % 1, 0)
    cbar = fig.colorbar(
        im, ax=ax, fraction=0.05, pad=0.02, ticks=MaxNLocator(integer=True) if integer else None
    )
    cbar.set_label(cbar_label)

    n_rows, n_cols = grid.shape
    # Thin the tick labels so they stay about 0.11 in apart (rows) / 0.3 in apart (columns).
    height_in = ax.get_position().height * fig.get_figheight()
    width_in = ax.get_position().width * fig.get_figwidth()
    row_step = max(1, math.ceil(n_rows * 0.11 / max(height_in, 1e-6)))
    col_step = max(1, math.ceil(n_cols * max(map(len, col_labels), default=1) * 0.08 / width_in))
    ax.set_yticks(range(0, n_rows, row_step), [row_labels[i] for i in range(0, n_rows, row_step)])
    ax.set_xticks(range(0, n_cols, col_step), [col_labels[j] for j in range(0, n_cols, col_step)])
    ax.tick_params(axis="y", labelsize=7 if n_rows > 20 else 9)
    ax.tick_params(axis="x", labelsize=7 if n_cols > 20 else 9)
    if any(len(c) > 4 for c in col_labels[::col_step]):
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)

    if annotate and n_cols <= ANNOTATE_MAX_COLS and n_rows <= 60:
        lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
        for (i, j), v in np.ndenumerate(grid):
            if np.isnan(v):
                continue
            bright = (v - lo) / (hi - lo) > 0.6 if hi > lo else False
            ax.text(
                j,
                i,
                f"{v:g}",
                ha="center",
                va="center",
                fontsize=7 if n_cols > 16 else 8,
                color="black" if bright else "white",
            )


def _save(fig: Figure, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


# -- public API ------------------------------------------------------------------------------
def allocation_heatmaps(alloc: Allocation, out_dir: Path) -> list[Path]:
    """Write ``allocation_experts.png`` and ``allocation_ranks.png`` to `out_dir`.

    The first is the expert count per projection kind x decoder layer, the second the rank
    of every expert of every module. Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows, cols, grid = experts_grid(alloc)
    fig, ax = plt.subplots(
        figsize=(
            min(MAX_INCHES, max(5.0, 0.38 * len(cols) + 2.5)),
            max(2.8, 0.4 * len(rows) + 1.6),
        ),
        dpi=DPI,
    )
    _heatmap(
        fig,
        ax,
        grid,
        rows,
        cols,
        title="Experts per module",
        xlabel="decoder layer",
        ylabel="projection",
        cbar_label="experts",
        annotate=True,
    )
    experts_png = _save(fig, out_dir / "allocation_experts.png")

    labels, rgrid = ranks_grid(alloc)
    fig, ax = _tall_figure(len(labels), width=max(5.0, 0.45 * rgrid.shape[1] + 3.5))
    _heatmap(
        fig,
        ax,
        rgrid,
        labels,
        [str(j) for j in range(rgrid.shape[1])],
        title="Rank per expert",
        xlabel="expert",
        ylabel="module",
        cbar_label="rank",
        annotate=len(labels) <= 60,
    )
    ranks_png = _save(fig, out_dir / "allocation_ranks.png")
    return [experts_png, ranks_png]


def _steps_heatmap(
    grid: np.ndarray, labels: Sequence[str], steps: Sequence[int], *, title: str, cbar: str
) -> Figure:
    fig, ax = _tall_figure(len(labels), width=min(24.0, max(6.0, 0.12 * len(steps) + 4)))
    _heatmap(
        fig,
        ax,
        grid,
        labels,
        [str(s) for s in steps],
        title=title,
        xlabel="step",
        ylabel="module",
        cbar_label=cbar,
        annotate=False,
    )
    return fig


def gsv_trajectories(state_dir: Path, out_dir: Path) -> list[Path]:
    """Write the GSV selections and the losses over a search, from its state folder.

    ``gsv_experts.png``: selected expert count per module (rows) x logged step (columns);
    ``gsv_ranks.png``: mean selected rank over the selected experts, same layout;
    ``search_loss.png``: train and val loss per step (only when losses were logged).
    Raises `ValueError` if the state has no GSV history. Returns the paths written.
    """
    state_dir = Path(state_dir)
    doc, tensors = read_state(state_dir)
    missing = [k for k in ("history.step", "history.expert", "history.rank") if k not in tensors]
    if missing:
        raise ValueError(
            f"{state_dir}: the search state has no GSV history (missing {', '.join(missing)}); "
            "was the search run long enough to log a step?"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    names: list[str] = list(doc["modules"])
    top_k = int(doc.get("config", {}).get("top_k", 1))
    steps = [int(s) for s in tensors["history.step"].tolist()]
    g_e = tensors["history.expert"].float().numpy()  # (S, M, N_max)
    g_r = tensors["history.rank"].float().numpy()  # (S, M, N_max, R_max)
    if g_e.shape[1] != len(names):
        raise ValueError(
            f"{state_dir}: history has {g_e.shape[1]} modules but the state lists {len(names)}"
        )

    lay = _Layout(names)
    order = [names.index(n) for n in lay.ordered]
    labels = [lay.module_label(n) for n in lay.ordered]
    experts = selected_experts(g_e, top_k)[:, order].T.astype(float)  # (M, S)
    ranks = selected_mean_rank(g_e, g_r, top_k)[:, order].T

    written = [
        _save(
            _steps_heatmap(
                experts, labels, steps, title="Selected experts over the search", cbar="experts"
            ),
            out_dir / "gsv_experts.png",
        ),
        _save(
            _steps_heatmap(
                ranks, labels, steps, title="Mean selected rank over the search", cbar="rank"
            ),
            out_dir / "gsv_ranks.png",
        ),
    ]

    losses = doc.get("losses") or []
    if losses:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=DPI)
        for key, label in (("train_loss", "train"), ("val_loss", "val")):
            pts = [(e["step"], e[key]) for e in losses if e.get(key) is not None and "step" in e]
            if pts:
                xs, ys = [x for x, _ in pts], [y for _, y in pts]
                ax.plot(xs, ys, label=label, marker="." if len(pts) <= 50 else None)
        ax.set_title("Search loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        written.append(_save(fig, out_dir / "search_loss.png"))
    return written


def loss_curve(losses: Sequence[float], path: Path, *, title: str = "SFT loss") -> Path:
    """Training loss per optimizer step (``sft_loss.png``)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=DPI)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, list(losses), marker="." if len(losses) <= 50 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, Path(path))


def expert_load_grid(stats: dict[str, Sequence[float]]) -> tuple[list[str], np.ndarray]:
    """Module labels (layer order) and a (modules, max experts) grid of routed-token shares;
    cells past a module's expert count are NaN."""
    lay = _Layout(list(stats))
    width = max((len(v) for v in stats.values()), default=0)
    grid = np.full((len(lay.ordered), width), np.nan)
    for i, name in enumerate(lay.ordered):
        grid[i, : len(stats[name])] = stats[name]
    return [lay.module_label(n) for n in lay.ordered], grid


def expert_load(stats: dict[str, Sequence[float]], path: Path) -> Path:
    """The share of routed tokens each expert of each module received (``expert_load.png``),
    from `MoeAdapter.router_stats()`. A balanced module with E experts shows 1/E per cell."""
    if not stats:
        raise ValueError("no router statistics to plot (the adapter routed no tokens)")
    labels, grid = expert_load_grid(stats)
    fig, ax = _tall_figure(len(labels), width=max(5.0, 0.45 * grid.shape[1] + 3.5))
    _heatmap(
        fig,
        ax,
        grid,
        labels,
        [str(j) for j in range(grid.shape[1])],
        title="Expert load (share of routed tokens)",
        xlabel="expert",
        ylabel="module",
        cbar_label="share",
        annotate=len(labels) <= 60 and grid.shape[1] <= 16,
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, Path(path))
