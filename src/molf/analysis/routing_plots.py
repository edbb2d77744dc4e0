"""Routing-dynamics figures (PNG) from a ``RoutingLog``.

Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas, no pyplot state), so importing
this module selects no backend and plotting works on headless machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from molf.analysis.routing_log import RoutingLog
from molf.analysis.routing_stats import (
    focus_expert,
    focus_label,
    score_log_ratio,
    share_by_layer,
    share_by_type,
    switch_rate_per_module,
    type_order,
)

# Long logs are smoothed / binned to about this many points along the step axis.
_MAX_POINTS = 200
_DPI = 130


def _smoothing_window(num_steps: int) -> int:
    return max(1, num_steps // _MAX_POINTS)


def _short(label: str) -> str:
    return label.split(" ")[0]


def plot_share_by_type(log: RoutingLog, path: Path) -> Path:
    """Lines: share of modules of each type routed to the focus expert, per step (rolling mean)."""
    shares = share_by_type(log)
    window = _smoothing_window(len(shares))
    smooth = shares.rolling(window, min_periods=1).mean()
    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot()
    for column in smooth.columns:
        style = dict(color="black", linewidth=2.5) if column == "all" else dict(linewidth=1.3)
        ax.plot(smooth.index, smooth[column], label="all modules" if column == "all" else column, **style)
    label = focus_label(log)
    return _save_share_lines(fig, ax, path, f"Share of modules routed to {label}, by module type", window,
                             ylabel=f"{_short(label)} share", legend_title="module type")


def _save_share_lines(fig: Figure, ax, path: Path, title: str, window: int, ylabel: str,
                      legend_title: str) -> Path:
    """Finish a share-per-step line plot (title with its smoothing, axes, legend) and save it."""
    if window > 1:
        title += f"\n(rolling mean over {window} logged steps)"
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel, ylim=(-0.02, 1.02))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(title=legend_title, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def step_edges(steps: np.ndarray) -> np.ndarray:
    """Column edges along the step axis, one column per logged step: each column reaches halfway to
    the neighbouring logged steps (the end columns as far out as inward), so unevenly logged steps (a
    resume with another ``--routing_log_every``) sit where they were logged. A single step gets a
    column one step wide, centred on it."""
    steps = np.asarray(steps, dtype=np.float64)
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mids[0]], mids, [2 * steps[-1] - mids[-1]]])


def step_columns(share: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The heatmap's columns of an ``(L, S)`` share: ``(L, B)`` values and their ``B + 1`` step edges.

    Up to ``_MAX_POINTS`` logged steps, one column each (``step_edges``); beyond, ``_MAX_POINTS``
    columns of equal step width, each the mean of the logged steps that fall in it (NaN where none
    does), so the columns follow the step values, not the order of the lines.
    """
    edges = step_edges(steps)
    if share.shape[1] <= _MAX_POINTS:
        return share, edges
    edges = np.linspace(edges[0], edges[-1], _MAX_POINTS + 1)
    column = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, _MAX_POINTS - 1)
    onehot = np.zeros((share.shape[1], _MAX_POINTS))
    onehot[np.arange(share.shape[1]), column] = 1.0
    finite = np.isfinite(share)
    sums = np.where(finite, share, 0.0) @ onehot
    counts = finite.astype(np.float64) @ onehot
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan), edges


def plot_layer_heatmap(log: RoutingLog, path: Path) -> Path:
    """Heatmap: layer (rows) x step (columns) of the focus expert's share of the layer's modules."""
    layers, share = share_by_layer(log)
    fig = Figure(figsize=(10, max(3.0, 0.22 * len(layers) + 1.8)))
    ax = fig.add_subplot()
    label = focus_label(log)
    if share.size:
        columns, edges = step_columns(share, log.steps)
        image = ax.pcolormesh(edges, np.arange(len(layers) + 1) - 0.5, np.ma.masked_invalid(columns),
                              cmap="viridis", vmin=0.0, vmax=1.0, shading="flat")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        stride = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), stride))
        ax.set_yticklabels(["none" if v < 0 else str(v) for v in layers[::stride]])
        fig.colorbar(image, ax=ax, label=f"{_short(label)} share of the layer's modules")
    ax.set(title=f"Share of modules routed to {label}, by layer", xlabel="optimizer step", ylabel="layer")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def plot_switch_rate(log: RoutingLog, path: Path) -> Path:
    """Heatmap layer x module type of the per-module switch rate (winner changes per logged step)."""
    rates = switch_rate_per_module(log)
    types = type_order(log)
    layers = np.unique(log.layers)
    total = np.zeros((len(layers), len(types)))
    count = np.zeros((len(layers), len(types)))
    rows = np.searchsorted(layers, log.layers)
    cols = np.array([types.index(t) for t in log.module_types])
    # Several modules of one type in a layer (rare) share a cell: it shows their mean.
    np.add.at(total, (rows, cols), rates)
    np.add.at(count, (rows, cols), 1)
    with np.errstate(invalid="ignore"):
        grid = np.where(count > 0, total / count, np.nan)
    fig = Figure(figsize=(max(5.0, 0.9 * len(types) + 3), max(3.0, 0.22 * len(layers) + 1.8)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
                      vmin=0.0, vmax=max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 0.0, 1e-9))
    ax.set_xticks(range(len(types)))
    ax.set_xticklabels(types)
    stride = max(1, len(layers) // 16)
    ax.set_yticks(range(0, len(layers), stride))
    ax.set_yticklabels(["none" if v < 0 else str(v) for v in layers[::stride]])
    fig.colorbar(image, ax=ax, label="switches per logged step")
    ax.set(title=f"Routing switch rate per module ({len(log.steps)} logged steps)",
           xlabel="module type", ylabel="layer")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def plot_score_ratio(log: RoutingLog, path: Path) -> Path:
    """Histograms per module type of log10(score of the focus expert / best other expert's score)."""
    ratio = score_log_ratio(log)  # (S, M)
    types = np.array(log.module_types)
    focus = _short(focus_label(log))
    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot()
    finite = ratio[np.isfinite(ratio)]
    if finite.size:
        edges = np.linspace(finite.min(), finite.max() + 1e-12, 60)
        for mtype in type_order(log):
            values = ratio[:, types == mtype]
            values = values[np.isfinite(values)]
            if values.size:
                ax.hist(values, bins=edges, histtype="step", density=True, linewidth=1.4, label=mtype)
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1, label="tie (above: " + focus + " wins)")
        ax.legend(title="module type", loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.text(0.5, 0.5, "no finite score ratios in this log\n(one expert only, or all scores zero)",
                ha="center", va="center", transform=ax.transAxes)
    ax.set(title=f"Score ratio log10(score_{focus} / best other expert's score)",
           xlabel=f"log10(score_{focus} / best other score)", ylabel="density over (step, module)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def plot_expert_share(log: RoutingLog, path: Path) -> Path:
    """Lines: share of all modules whose winners include each expert, per step (rolling mean)."""
    window = _smoothing_window(len(log.steps))
    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot()
    for e, name in enumerate(log.experts):
        shares = share_by_type(log, expert=e)["all"]
        ax.plot(shares.index, shares.rolling(window, min_periods=1).mean(), linewidth=1.6, label=name)
    return _save_share_lines(fig, ax, path, "Share of modules routed to each expert", window,
                             ylabel="share of modules", legend_title="expert")


FIGURES = {
    "routing_share_by_type.png": plot_share_by_type,
    "routing_share_by_layer.png": plot_layer_heatmap,
    "routing_switch_rate.png": plot_switch_rate,
    "routing_score_ratio.png": plot_score_ratio,
    "routing_expert_share.png": plot_expert_share,
}


def plot_routing(log: RoutingLog, out_dir: Union[str, Path]) -> list[Path]:
    """Write every routing figure of ``log`` into ``out_dir`` (created if needed); returns the paths."""
    if len(log.steps) == 0 or not log.modules:
        raise ValueError("the routing log has no logged steps or no modules: nothing to plot")
    if focus_expert(log) < 0:
        raise ValueError("the routing log names no experts")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot(log, out_dir / name) for name, plot in FIGURES.items()]
