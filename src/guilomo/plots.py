"""Figures of an allocation, a GSV search, an SFT loss and the experts' load (PNG, Agg).
The numbers behind each come from small pure helpers, checked without looking at pixels."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
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
    if (m := _LAYER.search(name)) is None:
        return None
    return name[: m.start(1) - len("layers.")], int(m.group(1)), name[m.end() :]


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _kind_key(kind: str) -> tuple[int, str]:
    return (KIND_ORDER.index(_last(kind)) if _last(kind) in KIND_ORDER else len(KIND_ORDER), kind)


class _Layout:
    """Where each module of a list goes: its layer column, projection-kind row and label."""

    def __init__(self, names: Sequence[str]) -> None:
        parsed = {n: _parse(n) for n in names}
        layered = {n: p for n, p in parsed.items() if p is not None}
        self.unlayered = [n for n, p in parsed.items() if p is None]
        self.multi_prefix = len({p[0] for p in layered.values()}) > 1
        # The last name component names the row, unless two modules of one layer share it
        # (e.g. ``mlp.down_proj`` and ``mlp.experts.0.down_proj``): then the full suffix does.
        self.kind = {n: _last(p[2]) for n, p in layered.items()}
        cells = [(p[0], p[1], self.kind[n]) for n, p in layered.items()]
        if len(set(cells)) < len(cells):
            self.kind = {n: p[2] for n, p in layered.items()}
        self.column = {n: (p[0], p[1]) for n, p in layered.items()}
        self.columns: list[tuple[str, int]] = sorted(set(self.column.values()))
        self.kinds: list[str] = sorted(set(self.kind.values()), key=_kind_key)
        # Modules in reading order: layer by layer, kinds in row order, then the rest.
        order = sorted(layered, key=lambda n: (self.column[n], _kind_key(self.kind[n])))
        self.ordered = order + self.unlayered

    def kind_of(self, name: str) -> str:
        return self.kind.get(name, _last(name))

    def tag(self, prefix: str) -> str:
        """``encoder.`` for ``model.vision.encoder.`` when the modules have several prefixes."""
        parts = [p for p in prefix.split(".") if p]
        return f"{parts[-1] if parts else 'layers'}." if self.multi_prefix else ""

    def module_label(self, name: str) -> str:
        """Compact label: ``L3.q_proj`` (the full name for modules outside decoder layers)."""
        if name not in self.column:
            return name
        prefix, layer = self.column[name]
        return f"{self.tag(prefix)}L{layer}.{self.kind[name]}"


# -- the matrices ----------------------------------------------------------------------------
def _module_grid(values: Mapping[str, float]) -> tuple[list[str], list[str], np.ndarray]:
    """``(rows, cols, grid)``: projection kinds (q, k, v, o, gate, up, down first) x decoder
    layers, then a column per module outside them (row: its last name); NaN: no module."""
    lay = _Layout(list(values))
    extra_rows = {_last(n) for n in lay.unlayered} - set(lay.kinds)
    rows = lay.kinds + sorted(extra_rows, key=_kind_key)
    cols = [f"{lay.tag(prefix)}{layer}" for prefix, layer in lay.columns] + lay.unlayered
    col_index = {c: j for j, c in enumerate([*lay.columns, *lay.unlayered])}
    grid = np.full((len(rows), len(cols)), np.nan)
    for name, v in values.items():
        grid[rows.index(lay.kind_of(name)), col_index[lay.column.get(name, name)]] = v
    return rows, cols, grid


def _module_rows(values: Mapping[str, Sequence[float]]) -> tuple[list[str], np.ndarray]:
    """``(labels, grid)``: one row per module in layer order; NaN past the end of its values."""
    lay = _Layout(list(values))
    grid = np.full((len(lay.ordered), max(map(len, values.values()), default=0)), np.nan)
    for i, name in enumerate(lay.ordered):
        grid[i, : len(values[name])] = values[name]
    return [lay.module_label(n) for n in lay.ordered], grid


def experts_grid(alloc: Allocation) -> tuple[list[str], list[str], np.ndarray]:
    """``(row_labels, col_labels, grid)``: expert count per projection kind x decoder layer."""
    return _module_grid({n: m.experts for n, m in alloc.modules.items()})


def ranks_grid(alloc: Allocation) -> tuple[list[str], np.ndarray]:
    """``(labels, grid)``: rank of expert j (column) of every module (row); NaN past its last."""
    return _module_rows({n: m.ranks for n, m in alloc.modules.items()})


# -- drawing ---------------------------------------------------------------------------------
def _heatmap(
    ax: Axes,
    grid: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    unit: str,
    *,
    max_cols: int = ANNOTATE_MAX_COLS,
    fmt: Callable[[float], str] = "{:g}".format,
) -> None:
    """A heatmap with a colour bar, empty cells grey, tick labels thinned to stay legible and
    cells annotated while the grid has at most `max_cols` columns and 60 rows."""
    fig = ax.figure
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", interpolation="nearest")
    values = grid[~np.isnan(grid)]
    if values.size and values.min() == values.max():  # one value: centre it on the colour scale
        im.set_clim(values.min() - 1, values.max() + 1)
    integer = bool(values.size) and np.allclose(values % 1, 0)
    ticks = MaxNLocator(integer=True) if integer else None
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, ticks=ticks).set_label(unit)

    n_rows, n_cols = grid.shape
    # Thin the tick labels so they stay about 0.11 in apart (rows) / 0.3 in apart (columns).
    box = ax.get_position()
    row_step = max(1, math.ceil(n_rows * 0.11 / max(box.height * fig.get_figheight(), 1e-6)))
    col_width = max(map(len, col_labels), default=1) * 0.08
    col_step = max(1, math.ceil(n_cols * col_width / (box.width * fig.get_figwidth())))
    ax.set_yticks(range(0, n_rows, row_step), [row_labels[i] for i in range(0, n_rows, row_step)])
    ax.set_xticks(range(0, n_cols, col_step), [col_labels[j] for j in range(0, n_cols, col_step)])
    ax.tick_params(axis="y", labelsize=7 if n_rows > 20 else 9)
    ax.tick_params(axis="x", labelsize=7 if n_cols > 20 else 9)
    if any(len(c) > 4 for c in col_labels[::col_step]):
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    if n_cols > max_cols or n_rows > 60:
        return
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            color = "black" if im.norm(v) > 0.6 else "white"  # dark text on the bright cells
            size = 7 if n_cols > 16 else 8
            ax.text(j, i, fmt(v), ha="center", va="center", fontsize=size, color=color)


def _per_expert(
    labels: Sequence[str],
    grid: np.ndarray,
    path: Path,
    title: str,
    unit: str,
    max_cols: int = ANNOTATE_MAX_COLS,
) -> Path:
    """A module x expert heatmap, one row per module."""
    height = min(MAX_INCHES, max(3.0, ROW_INCHES * len(labels) + 1.6))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * grid.shape[1] + 3.5), height))
    _heatmap(ax, grid, labels, [str(j) for j in range(grid.shape[1])], unit, max_cols=max_cols)
    ax.set(title=title, xlabel="expert", ylabel="module")
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


# -- public API ------------------------------------------------------------------------------
def allocation_heatmaps(alloc: Allocation, out_dir: Path) -> list[Path]:
    """Write ``allocation_experts.png`` (expert count per projection kind x decoder layer) and
    ``allocation_ranks.png`` (the rank of every expert of every module); returns their paths."""
    rows, cols, grid = experts_grid(alloc)
    size = (min(MAX_INCHES, max(5.0, 0.38 * len(cols) + 2.5)), max(2.8, 0.4 * len(rows) + 1.6))
    fig, ax = plt.subplots(figsize=size)
    _heatmap(ax, grid, rows, cols, "experts")
    ax.set(title="Experts per module", xlabel="decoder layer", ylabel="projection")
    experts_png = _save(fig, Path(out_dir) / "allocation_experts.png")
    ranks_png = Path(out_dir) / "allocation_ranks.png"
    return [experts_png, _per_expert(*ranks_grid(alloc), ranks_png, "Rank per expert", "rank")]


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
        estimator, tau = cfg.get("estimator") or "reference", cfg.get("tau") or 1.0
        return cls(top_k=int(cfg.get("top_k", 1)), estimator=str(estimator), tau=float(tau))


def expected_capacity(
    expert: torch.Tensor, rank: torch.Tensor, settings: SearchSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Expected expert count (...,) and rank per expert (...,) of stacked GSVs (..., N) and
    (..., N, R): the experts' expected ranks averaged with weights P(n >= j) (``expected``),
    or over the selected first n (``reference``, a point choice)."""
    expert, rank = expert.double(), rank.double()
    n, r = expected_choice(expert, rank, **asdict(settings))  # (...,), (..., N)
    if settings.estimator == "expected":
        q, _ = count_distributions(expert, rank, top_k=settings.top_k, tau=settings.tau)
        keep = at_least(q)  # (..., N) P(n >= j)
    else:
        keep = (torch.arange(expert.shape[-1]) < n[..., None]).double()
    mean_rank = (keep * r).sum(-1) / keep.sum(-1)
    return n.numpy(), mean_rank.numpy()


def selected_modes(
    expert: torch.Tensor, rank: torch.Tensor, settings: SearchSettings
) -> tuple[np.ndarray, np.ndarray]:
    """The mode (as `guilomo.moe.gsv.choose`) of stacked GSVs: expert counts (...,) and the
    rank of every expert slot (..., N), slots past the count unselected."""
    n, ranks = modes(expert, rank, **asdict(settings))
    return n.numpy(), ranks.numpy()


def changed_shares(n: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per step, the share of modules whose allocation (count or a selected expert's rank) and
    whose count differ from the last step's, from `selected_modes` of a history."""
    final_n, final_r = n[-1], ranks[-1]
    count = n != final_n  # (S, M)
    selected = np.arange(ranks.shape[-1]) < final_n[:, None]  # (M, N)
    rank = ((ranks != final_r) & selected).any(-1)  # (S, M)
    return (count | rank).mean(-1), count.mean(-1)


def settle_step(steps: Sequence[int], share: Sequence[float]) -> int | None:
    """The first logged step from which `share` (of modules differing from the final
    selection) stays 0, or None when it changed at the last logged step (not settled)."""
    differing = np.flatnonzero(np.asarray(share) > 0)
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


def _history(doc: Mapping, tensors: Mapping[str, torch.Tensor], where: object):
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
    """The series of ``search_capacity.png`` from a state (`read_state`'s ``(doc, tensors)``);
    `ValueError` (naming `where`) when it has no GSV history."""
    names, steps, g_e, g_r = _history(doc, tensors, where)
    settings = SearchSettings.of(doc)
    n_exp, r_exp = expected_capacity(g_e, g_r, settings)  # (S, M) each
    layout = _Layout(names)
    kind = np.array([layout.kind_of(n) for n in names])
    kinds = sorted(set(kind.tolist()), key=_kind_key)
    changed, count_changed = changed_shares(*selected_modes(g_e, g_r, settings))
    return CapacitySeries(
        steps=steps,
        kinds=kinds,
        settings=settings,
        experts=np.stack([n_exp[:, kind == k].mean(-1) for k in kinds]),
        rank=np.stack([r_exp[:, kind == k].mean(-1) for k in kinds]),
        all_experts=n_exp.mean(-1),
        all_rank=r_exp.mean(-1),
        changed=changed,
        count_changed=count_changed,
        settled=settle_step(steps, changed),
    )


def final_grids(
    doc: Mapping, tensors: Mapping[str, torch.Tensor], *, where: object = "state"
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """``(layers, kinds, experts, mean_rank)``: the last history row's selection, decoder layer
    x projection kind (`_module_grid` transposed)."""
    names, _, g_e, g_r = _history(doc, tensors, where)
    n, ranks = selected_modes(g_e[-1], g_r[-1], SearchSettings.of(doc))  # (M,), (M, N)
    kinds, layers, e_grid = _module_grid({name: float(n[i]) for i, name in enumerate(names)})
    mean_rank = {name: float(ranks[i, : n[i]].mean()) for i, name in enumerate(names)}
    return layers, kinds, e_grid.T, _module_grid(mean_rank)[2].T


# -- drawing a search ------------------------------------------------------------------------
def _steps_axes(ax: Axes) -> None:
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _marker(n: int) -> str | None:
    return "." if n <= 50 else None


def _capacity_figure(c: CapacitySeries) -> Figure:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    cmap = plt.get_cmap("tab10" if len(c.kinds) <= 10 else "tab20")
    marker = _marker(len(c.steps))
    word = "Expected" if c.settings.estimator == "expected" else "Selected"
    for ax, per_kind, overall, title, ylabel in (
        (axes[0], c.experts, c.all_experts, f"{word} experts per module", "experts"),
        (axes[1], c.rank, c.all_rank, f"{word} rank per expert", "rank"),
    ):
        for i, (kind, ys) in enumerate(zip(c.kinds, per_kind, strict=True)):
            ax.plot(c.steps, ys, color=cmap(i % cmap.N), label=kind, marker=marker, lw=1.4)
        ax.plot(c.steps, overall, color="black", ls="--", lw=1.2, label="all modules")
        ax.set(title=f"{title} (mean over layers)", ylabel=ylabel)
    axes[0].legend(fontsize=8, ncol=2 if len(c.kinds) > 5 else 1)

    ax = axes[2]
    ax.plot(c.steps, 100 * c.changed, color="tab:red", marker=marker, label="allocation")
    ax.plot(c.steps, 100 * c.count_changed, "--", color="tab:blue", marker=marker, label="experts")
    status = "not settled (changed at the last logged step)"
    if c.settled is not None:
        ax.axvline(c.settled, color="gray", ls=":", lw=1.2, label=f"settled: step {c.settled}")
        status = f"settled at step {c.settled}"
    title = f"Modules whose selection differs from the final\n{status}"
    ax.set(title=title, ylabel="% of modules", ylim=(-3, 103))
    ax.legend(fontsize=8, loc="best")
    for ax in axes:
        _steps_axes(ax)
    s = c.settings
    fig.suptitle(f"GSV search: where capacity went ({s.estimator} estimator, top_k {s.top_k})")
    fig.tight_layout()
    return fig


def _final_figure(
    layers: Sequence[str], kinds: Sequence[str], experts: np.ndarray, mean_rank: np.ndarray
) -> Figure:
    n_rows, n_cols = experts.shape
    width = max(3.6, 0.62 * n_cols + 2.4)
    height = min(FINAL_MAX_INCHES, max(3.5, 0.26 * n_rows + 1.8))
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, height))
    fig.subplots_adjust(top=1 - 0.65 / height, wspace=0.3)  # room for the titles, no more
    short = [k.removesuffix("_proj") for k in kinds]  # q, k, v, o, gate, up, down
    _heatmap(axes[0], experts, layers, short, "experts")
    axes[0].set(title="Selected experts", xlabel="projection", ylabel="decoder layer")
    _heatmap(axes[1], mean_rank, layers, short, "rank", fmt=lambda v: f"{v:.1f}".removesuffix(".0"))
    axes[1].set(title="Mean selected rank", xlabel="projection", ylabel="")
    fig.suptitle("Final allocation of the search")
    return fig


def _loss_figure(losses: Sequence[Mapping], target: int | None) -> Figure:
    """The search's losses and, when logged, its expected / selected parameter counts below."""
    panels = [(("train_loss", "train", "-"), ("val_loss", "val", "-"))]
    sizes = (("expected_params", "expected", "-"), ("mode_params", "selected", "--"))
    if any(e.get(k) is not None for e in losses for k, _, _ in sizes):
        panels.append(sizes)
    n = len(panels)
    fig, axes = plt.subplots(  # 4 in high for the losses alone, 6.5 with the parameters
        n, 1, figsize=(7, 2.5 * n + 1.5), sharex=True, squeeze=False, height_ratios=[3, 2][:n]
    )
    axes = axes[:, 0]
    for ax, series in zip(axes, panels, strict=True):
        for key, label, ls in series:  # the steps where the key was logged
            pts = [(e["step"], e[key]) for e in losses if e.get(key) is not None and "step" in e]
            if pts:
                ax.plot(*zip(*pts, strict=True), ls=ls, label=label, marker=_marker(len(pts)))
        ax.grid(alpha=0.3)
    axes[0].set(title="Search loss", ylabel="loss")
    if len(axes) > 1:
        if target is not None:
            axes[1].axhline(target, color="black", ls=":", lw=1.2, label=f"target {target:,}")
        axes[1].set_title("Trainable parameters (expected / selected)", fontsize=10)
        axes[1].set(ylabel="parameters")
    axes[-1].set_xlabel("step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def gsv_trajectories(
    doc: dict, tensors: Mapping[str, torch.Tensor], out_dir: Path, *, where: object = "state"
) -> list[Path]:
    """Write ``search_capacity.png`` (capacity per projection kind over the steps, and when the
    selection settled), ``search_final.png`` (the final selection) and, with logged losses,
    ``search_loss.png`` from a state; `ValueError` naming `where` without a GSV history."""
    series = capacity_series(doc, tensors, where=where)  # checks the history first
    final = final_grids(doc, tensors, where=where)
    out = Path(out_dir)
    written = [_save(_capacity_figure(series), out / "search_capacity.png")]
    written.append(_save(_final_figure(*final), out / "search_final.png"))
    if doc.get("losses"):
        loss = _loss_figure(doc["losses"], doc.get("target_params"))
        written.append(_save(loss, out / "search_loss.png"))
    return written


def loss_curve(losses: Sequence[float], path: Path, *, title: str = "SFT loss") -> Path:
    """Training loss per optimizer step (``sft_loss.png``)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), list(losses), marker=_marker(len(losses)))
    ax.set(title=title, ylabel="loss")
    _steps_axes(ax)
    return _save(fig, path)


def expert_load(stats: dict[str, Sequence[float]], path: Path) -> Path:
    """The share of routed tokens each expert of each module received (``expert_load.png``),
    from `MoeAdapter.router_stats()`. A balanced module with E experts shows 1/E per cell."""
    if not stats:
        raise ValueError("no router statistics to plot (the adapter routed no tokens)")
    labels, grid = _module_rows(stats)
    return _per_expert(labels, grid, path, "Expert load (share of routed tokens)", "share", 16)
