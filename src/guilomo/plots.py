"""Figures of an allocation and of a GSV search (PNG, matplotlib's Agg backend).

`allocation_heatmaps` draws how many experts each module got and the rank of every expert.
`gsv_trajectories` draws, from a search state, where the capacity went and when the
selection settled (``search_capacity.png``: expected experts and rank per projection kind
over the steps, and the share of modules whose selected allocation still differs from the
final one), the final selection per decoder layer x projection kind (``search_final.png``)
and the search's losses and size terms (``search_loss.png``).

The numbers behind each figure come from small pure helpers (`experts_grid`, `ranks_grid`,
`capacity_series`, `selected_modes`, `settle_step`, `final_grids`) so they can be checked
without looking at pixels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .moe.config import Allocation
from .moe.gsv import at_least, count_distributions, expected_choice, modes

DPI = 120
#: Rows of a projection-kind heatmap, in this order when present; other kinds follow sorted.
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Cells are annotated with their number when the grid has at most this many columns.
ANNOTATE_MAX_COLS = 40
ROW_INCHES = 0.18
MAX_INCHES = 40.0
#: Height cap of ``search_final.png`` (its rows are decoder layers).
FINAL_MAX_INCHES = 14.0

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
def _module_grid(values: Mapping[str, float]) -> tuple[list[str], list[str], np.ndarray]:
    """``(row_labels, col_labels, grid)``: one value per module, projection kind x layer.

    Rows are projection kinds (q, k, v, o, gate, up, down first), columns decoder layers, then
    one column per module outside the decoder layers (its row is its last name component).
    Cells without a module are NaN.
    """
    lay = _Layout(list(values))
    rows = list(lay.kinds)
    extra_rows = sorted({n.rsplit(".", 1)[-1] for n in lay.unlayered} - set(rows), key=_kind_key)
    rows += extra_rows
    cols = [lay.column_label(c) for c in lay.columns] + list(lay.unlayered)
    grid = np.full((len(rows), len(cols)), np.nan)
    col_index = {c: j for j, c in enumerate(lay.columns)}
    for name, v in values.items():
        if name in lay.column:
            i, j = rows.index(lay.kind[name]), col_index[lay.column[name]]
        else:
            i = rows.index(name.rsplit(".", 1)[-1])
            j = len(lay.columns) + lay.unlayered.index(name)
        grid[i, j] = v
    return rows, cols, grid


def experts_grid(alloc: Allocation) -> tuple[list[str], list[str], np.ndarray]:
    """``(row_labels, col_labels, grid)``: expert count per projection kind x decoder layer.

    Rows are projection kinds (q, k, v, o, gate, up, down first), columns decoder layers, then
    one column per module outside the decoder layers (its row is its last name component).
    Cells without a module are NaN.
    """
    return _module_grid({n: m.experts for n, m in alloc.modules.items()})


def ranks_grid(alloc: Allocation) -> tuple[list[str], np.ndarray]:
    """``(labels, grid)``: rank of expert j (column) of every module (row); NaN past its last."""
    lay = _Layout(list(alloc.modules))
    n_max = max(m.experts for m in alloc.modules.values())
    grid = np.full((len(lay.ordered), n_max), np.nan)
    for i, name in enumerate(lay.ordered):
        ranks = alloc.modules[name].ranks
        grid[i, : len(ranks)] = ranks
    return [lay.module_label(n) for n in lay.ordered], grid


# -- drawing ---------------------------------------------------------------------------------
def _tall_figure(n_rows: int, width: float) -> tuple[Figure, Axes]:
    height = min(MAX_INCHES, max(3.0, ROW_INCHES * n_rows + 1.6))
    return plt.subplots(figsize=(width, height), dpi=DPI)


def _per_expert(
    labels: Sequence[str], grid: np.ndarray, path: Path, *, title: str, unit: str, max_cols: int = 0
) -> Path:
    """A module x expert heatmap, one row per module; cells annotated while they stay legible."""
    fig, ax = _tall_figure(len(labels), width=max(5.0, 0.45 * grid.shape[1] + 3.5))
    annotate = len(labels) <= 60 and (max_cols == 0 or grid.shape[1] <= max_cols)
    cols = [str(j) for j in range(grid.shape[1])]
    _heatmap(
        fig,
        ax,
        grid,
        labels,
        cols,
        title=title,
        xlabel="expert",
        ylabel="module",
        cbar_label=unit,
        annotate=annotate,
    )
    return _save(fig, path)


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
    fmt: Callable[[float], str] | None = None,
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
                f"{v:g}" if fmt is None else fmt(v),
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
    ranks_png = _per_expert(
        labels, rgrid, out_dir / "allocation_ranks.png", title="Rank per expert", unit="rank"
    )
    return [experts_png, ranks_png]


# -- a search's history ----------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSettings:
    """How a search read its GSVs (from its state's config)."""

    top_k: int
    estimator: str
    tau: float

    @classmethod
    def of(cls, doc: Mapping) -> SearchSettings:
        """From a state's JSON; states written before the estimator existed are ``reference``."""
        cfg = doc.get("config") or {}
        return cls(
            top_k=int(cfg.get("top_k", 1)),
            estimator=str(cfg.get("estimator") or "reference"),
            tau=float(cfg.get("tau") or 1.0),
        )


def _kind_of(lay: _Layout, name: str) -> str:
    return lay.kind.get(name, name.rsplit(".", 1)[-1])


def expected_capacity(
    expert: torch.Tensor, rank: torch.Tensor, settings: SearchSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Expected expert count (...,) and expected rank per expert (...,) of stacked GSVs
    (..., N) and (..., N, R), e.g. a history (steps, modules, N).

    The rank is the mean of the experts' expected ranks over the experts the module is
    expected to have: weighted by P(n >= j) (``expected``), or over the selected first n
    (``reference``, a point choice).
    """
    expert, rank = expert.double(), rank.double()
    kw = {"top_k": settings.top_k, "tau": settings.tau}
    n, r = expected_choice(expert, rank, estimator=settings.estimator, **kw)  # (...,), (..., N)
    if settings.estimator == "expected":
        keep = at_least(count_distributions(expert, rank, **kw)[0])  # (..., N) P(n >= j)
    else:
        keep = (torch.arange(expert.shape[-1]) < n[..., None]).double()
    mean_rank = (keep * r).sum(-1) / keep.sum(-1)
    return n.numpy(), mean_rank.numpy()


def selected_modes(
    expert: torch.Tensor, rank: torch.Tensor, settings: SearchSettings
) -> tuple[np.ndarray, np.ndarray]:
    """The selected allocation (the mode, as `guilomo.moe.gsv.choose`) of stacked GSVs:
    expert counts (...,) and the rank of every expert slot (..., N) (slots past the count
    are not selected: ignore them)."""
    n, ranks = modes(
        expert, rank, top_k=settings.top_k, estimator=settings.estimator, tau=settings.tau
    )
    return n.numpy(), ranks.numpy()


def changed_shares(n: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per step, the share of modules whose selection differs from the last step's:
    ``(allocation differs (S,), expert count differs (S,))`` from `selected_modes` of a
    history, n (S, M) and ranks (S, M, N). An allocation differs when its count does or the
    rank of one of its selected experts does."""
    final_n, final_r = n[-1], ranks[-1]
    count = n != final_n  # (S, M)
    selected = np.arange(ranks.shape[-1]) < final_n[:, None]  # (M, N)
    rank = ((ranks != final_r) & selected).any(-1)  # (S, M)
    return (count | rank).mean(-1), count.mean(-1)


def settle_step(steps: Sequence[int], share: Sequence[float]) -> int | None:
    """The first logged step from which `share` (of modules differing from the final
    selection) stays 0, or None when it changed at the last logged step (not settled)."""
    share = np.asarray(share)
    differing = np.flatnonzero(share > 0)
    first = 0 if differing.size == 0 else int(differing[-1]) + 1
    if first >= len(share) or (first == len(share) - 1 and len(share) > 1):
        return None
    return int(steps[first])


@dataclass(frozen=True)
class CapacitySeries:
    """What ``search_capacity.png`` draws: per projection kind, over the logged steps."""

    steps: np.ndarray  # (S,)
    kinds: list[str]  # projection kinds, row order
    experts: np.ndarray  # (K, S) expected experts per module, mean over the kind's modules
    rank: np.ndarray  # (K, S) expected rank per expert, mean over the kind's modules
    all_experts: np.ndarray  # (S,) the same over all modules
    all_rank: np.ndarray  # (S,)
    changed: np.ndarray  # (S,) share of modules whose selected allocation differs from final
    count_changed: np.ndarray  # (S,) share of modules whose selected expert count differs
    settled: int | None  # `settle_step` of `changed`
    settings: SearchSettings


def _history(doc: Mapping, tensors: Mapping[str, torch.Tensor], where: object = "state"):
    missing = [k for k in ("history.step", "history.expert", "history.rank") if k not in tensors]
    if missing:
        raise ValueError(
            f"{where}: the search state has no GSV history (missing {', '.join(missing)}); "
            "was the search run long enough to log a step?"
        )
    names: list[str] = list(doc["modules"])
    g_e, g_r = tensors["history.expert"], tensors["history.rank"]  # (S, M, N), (S, M, N, R)
    if g_e.shape[1] != len(names) or g_r.shape[1] != len(names):
        raise ValueError(
            f"{where}: history has {g_e.shape[1]} modules but the state lists {len(names)}"
        )
    steps = np.asarray(tensors["history.step"].tolist(), dtype=int)
    return names, steps, g_e, g_r


def capacity_series(
    doc: Mapping, tensors: Mapping[str, torch.Tensor], *, where: object = "state"
) -> CapacitySeries:
    """The series of ``search_capacity.png`` from a state (`read_state`'s ``(doc, tensors)``).

    Raises `ValueError` when the state has no GSV history (`where` names it in the message).
    """
    names, steps, g_e, g_r = _history(doc, tensors, where)
    settings = SearchSettings.of(doc)
    n_exp, r_exp = expected_capacity(g_e, g_r, settings)  # (S, M) each
    lay = _Layout(names)
    kind = [_kind_of(lay, n) for n in names]
    kinds = sorted(set(kind), key=_kind_key)
    members = [[i for i, k in enumerate(kind) if k == kk] for kk in kinds]
    n_sel, r_sel = selected_modes(g_e, g_r, settings)
    changed, count_changed = changed_shares(n_sel, r_sel)
    return CapacitySeries(
        steps=steps,
        kinds=kinds,
        experts=np.stack([n_exp[:, idx].mean(-1) for idx in members]),
        rank=np.stack([r_exp[:, idx].mean(-1) for idx in members]),
        all_experts=n_exp.mean(-1),
        all_rank=r_exp.mean(-1),
        changed=changed,
        count_changed=count_changed,
        settled=settle_step(steps, changed),
        settings=settings,
    )


def final_grids(
    doc: Mapping, tensors: Mapping[str, torch.Tensor], *, where: object = "state"
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """``(layer_labels, kind_labels, experts, mean_rank)`` of the last history row's selection:
    selected experts and mean selected rank over them, decoder layer (rows) x projection kind
    (columns); modules outside the decoder layers follow as rows of their own. NaN: no module.
    """
    names, _, g_e, g_r = _history(doc, tensors, where)
    n, ranks = selected_modes(g_e[-1], g_r[-1], SearchSettings.of(doc))  # (M,), (M, N)
    experts = {name: float(n[i]) for i, name in enumerate(names)}
    mean_rank = {name: float(ranks[i, : n[i]].mean()) for i, name in enumerate(names)}
    kinds, layers, e_grid = _module_grid(experts)
    _, _, r_grid = _module_grid(mean_rank)
    return layers, kinds, e_grid.T, r_grid.T


# -- drawing a search ------------------------------------------------------------------------
def _kind_colors(kinds: Sequence[str]) -> dict[str, object]:
    cmap = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    return {k: cmap(i % cmap.N) for i, k in enumerate(kinds)}


def _capacity_figure(c: CapacitySeries) -> Figure:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), dpi=DPI)
    colors = _kind_colors(c.kinds)
    marker = "." if len(c.steps) <= 50 else None
    expected = c.settings.estimator == "expected"
    word = "Expected" if expected else "Selected"
    for ax, per_kind, overall, title, ylabel in (
        (axes[0], c.experts, c.all_experts, f"{word} experts per module", "experts"),
        (axes[1], c.rank, c.all_rank, f"{word} rank per expert", "rank"),
    ):
        for kind, ys in zip(c.kinds, per_kind, strict=True):
            ax.plot(c.steps, ys, color=colors[kind], label=kind, marker=marker, lw=1.4)
        ax.plot(c.steps, overall, color="black", ls="--", lw=1.2, label="all modules")
        ax.set_title(f"{title} (mean over layers)")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8, ncol=2 if len(c.kinds) > 5 else 1)

    ax = axes[2]
    ax.plot(c.steps, 100 * c.changed, color="tab:red", marker=marker, label="allocation")
    ax.plot(
        c.steps, 100 * c.count_changed, color="tab:blue", ls="--", marker=marker, label="experts"
    )
    ax.set_ylim(-3, 103)
    if c.settled is not None:
        ax.axvline(c.settled, color="gray", ls=":", lw=1.2, label=f"settled: step {c.settled}")
        status = f"settled at step {c.settled}"
    else:
        status = "not settled (changed at the last logged step)"
    ax.set_title(f"Modules whose selection differs from the final\n{status}")
    ax.set_ylabel("% of modules")
    ax.legend(fontsize=8, loc="best")
    for ax in axes:
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"GSV search: where capacity went ({c.settings.estimator} estimator, "
        f"top_k {c.settings.top_k})"
    )
    fig.tight_layout()
    return fig


def _rank_text(v: float) -> str:
    return f"{v:.1f}".removesuffix(".0")


def _final_figure(
    layers: Sequence[str], kinds: Sequence[str], experts: np.ndarray, mean_rank: np.ndarray
) -> Figure:
    n_rows, n_cols = experts.shape
    width = max(3.6, 0.62 * n_cols + 2.4)
    height = min(FINAL_MAX_INCHES, max(3.5, 0.26 * n_rows + 1.8))
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, height), dpi=DPI)
    fig.subplots_adjust(top=1 - 0.65 / height, wspace=0.3)  # room for the titles, no more
    short = [k.removesuffix("_proj") for k in kinds]  # q, k, v, o, gate, up, down
    for ax, grid, title, cbar, fmt, ylabel in (
        (axes[0], experts, "Selected experts", "experts", None, "decoder layer"),
        (axes[1], mean_rank, "Mean selected rank", "rank", _rank_text, ""),
    ):
        _heatmap(
            fig,
            ax,
            grid,
            layers,
            short,
            title=title,
            xlabel="projection",
            ylabel=ylabel,
            cbar_label=cbar,
            annotate=True,
            fmt=fmt,
        )
    fig.suptitle("Final allocation of the search")
    return fig


def _loss_figure(losses: Sequence[Mapping], target: int | None) -> Figure:
    keys = (("expected_params", "expected"), ("mode_params", "selected"))
    sizes = any(e.get(k) is not None for e in losses for k, _ in keys)
    if sizes:
        fig, (ax, ax_p) = plt.subplots(
            2, 1, figsize=(7, 6.5), dpi=DPI, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
        )
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=DPI)

    def series(key: str) -> tuple[list, list]:
        pts = [(e["step"], e[key]) for e in losses if e.get(key) is not None and "step" in e]
        return [x for x, _ in pts], [y for _, y in pts]

    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, label=label, marker="." if len(xs) <= 50 else None)
    ax.set_title("Search loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if not sizes:
        ax.set_xlabel("step")
        return fig

    for (key, label), ls in zip(keys, ("-", "--"), strict=True):
        xs, ys = series(key)
        if xs:
            ax_p.plot(xs, ys, ls=ls, label=label, marker="." if len(xs) <= 50 else None)
    if target is not None:
        ax_p.axhline(target, color="black", ls=":", lw=1.2, label=f"target {target:,}")
    ax_p.set_title("Trainable parameters (expected / selected)", fontsize=10)
    ax_p.set_xlabel("step")
    ax_p.set_ylabel("parameters")
    ax_p.grid(alpha=0.3)
    if ax_p.get_legend_handles_labels()[0]:
        ax_p.legend(fontsize=8)
    fig.tight_layout()
    return fig


def gsv_trajectories(
    doc: dict, tensors: Mapping[str, torch.Tensor], out_dir: Path, *, where: object = "state"
) -> list[Path]:
    """Write the figures of a search from its state (`read_state`'s ``(doc, tensors)``;
    `where` names it in errors); returns the paths written.

    ``search_capacity.png``: expected experts per module and expected rank per expert, one
    line per projection kind (mean over layers), and the share of modules whose selected
    allocation differs from the final one, with the step the selection settled at;
    ``search_final.png``: the final selection (experts, mean rank), decoder layer x kind;
    ``search_loss.png``: train and val loss per step, and the expected / selected trainable
    parameters when logged (only when losses were logged).
    Raises `ValueError` if the state has no GSV history.
    """
    series = capacity_series(doc, tensors, where=where)  # checks the history first
    final = final_grids(doc, tensors, where=where)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    written = [
        _save(_capacity_figure(series), out_dir / "search_capacity.png"),
        _save(_final_figure(*final), out_dir / "search_final.png"),
    ]
    losses = doc.get("losses") or []
    if losses:
        written.append(
            _save(_loss_figure(losses, doc.get("target_params")), out_dir / "search_loss.png")
        )
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    title = "Expert load (share of routed tokens)"
    return _per_expert(labels, grid, Path(path), title=title, unit="share", max_cols=16)
