"""The per-layer heat maps: one row per measured parameter, one column per log step, log colours.

Gradient norms on the values' own log scale (viridis); update-to-weight ratios on a fixed scale
from 1e-6 (blue) to 1 (red) centred on the healthy 1e-3 (white). Exactly zero is black, drawn as a
layer of its own so that it is not confused with a tiny value; not measured is light grey.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from safeloop.report.data import Branch, LayerTable, RunData
from safeloop.report.figures import RATIO_HEALTHY, RATIO_HIGH, RATIO_LOW, mark_run, short_name, step_axis
from safeloop.report.series import bucket_columns, layer_matrix

__all__ = ["draw_layers"]


def _plain_label(value: float, _: Any) -> str:
    return f"{value:.2g}" if value > 0 else ""


def _minor_label(value: float, _: Any) -> str:
    lead = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0
    return f"{value:.2g}" if lead in (2, 5) else ""


def _norm(matrix: np.ndarray, kind: str) -> LogNorm:
    """The colour scale: fixed for update ratios, the values' own range for gradient norms."""
    if kind == "update_ratios":
        return LogNorm(vmin=RATIO_LOW, vmax=RATIO_HIGH * 10)  # centred on RATIO_HEALTHY
    positive = matrix[np.isfinite(matrix) & (matrix > 0)]
    low, high = (float(positive.min()), float(positive.max())) if len(positive) else (1e-3, 1.0)
    low = max(low, high * 1e-8)  # a colour scale over more than 8 decades shows nothing
    return LogNorm(vmin=low, vmax=high if high > low else low * 10)


def draw_layers(ax: Axes, data: RunData, kind: str, branch: Branch | None = None) -> Any:
    """A heat map, one row per measured layer and one column per log step (or bucket of them).

    Args:
        ax (`Axes`): where to draw.
        data (`RunData`): the run.
        kind (`str`): ``"grad_norms"`` or ``"update_ratios"``.
        branch (`Branch`, *optional*): draw this abandoned branch's values instead of the live run's.

    Returns:
        `QuadMesh`: the heat map (its array has one row per layer).
    """
    table: LayerTable = getattr(data if branch is None else branch, kind)
    names, steps, matrix = layer_matrix(table)
    edges, cells = bucket_columns(steps, matrix, first_width=float(data.settings.get("log_every") or 0))
    norm = _norm(cells, kind)
    label = "||update|| / ||weight||" if kind == "update_ratios" else "gradient norm"
    # light grey: not measured at that step
    cmap = matplotlib.colormaps["RdBu_r" if kind == "update_ratios" else "viridis"].with_extremes(bad="0.88")
    rows = np.arange(len(names) + 1)
    gid = f"safeloop-heatmap-{kind}" + ("" if branch is None else "-abandoned")
    mesh = ax.pcolormesh(edges, rows, np.ma.masked_invalid(cells), norm=norm, cmap=cmap, gid=gid)
    zero = cells == 0
    if zero.any():  # exactly zero (no gradient, a weight that did not move): black, apart from tiny values
        ax.pcolormesh(
            edges, rows, np.ma.masked_where(~zero, np.ones_like(cells)), cmap=ListedColormap(["black"]),
            gid="safeloop-heatmap-zero",
        )  # fmt: skip
    ax.set_ylim(len(names), 0)  # the first layer on top
    every = max(1, math.ceil(len(names) / 40))
    ax.set_yticks(np.arange(0, len(names), every) + 0.5, [short_name(n) for n in names[::every]], fontsize=7)
    box = ax.get_position()  # the colour bar goes in the right margin, which every panel keeps
    inch = 1 / ax.figure.get_figwidth()
    cax = ax.figure.add_axes((box.x1 + 0.12 * inch, box.y0, 0.15 * inch, box.height))
    colorbar = ax.figure.colorbar(mesh, cax=cax, extend="both")
    colorbar.set_label(label, fontsize=8)
    decades = math.log10(norm.vmax / norm.vmin)
    if kind == "update_ratios":
        # the landmarks the caption and the diagnostics name, written as they write them
        colorbar.set_ticks([RATIO_LOW, RATIO_HEALTHY, RATIO_HIGH * 10], labels=["1e-6", "1e-3", "1"])
        colorbar.ax.yaxis.set_minor_formatter(NullFormatter())
        colorbar.ax.axhline(RATIO_HEALTHY, color="k", linewidth=1)
    elif decades < 2:
        # the decade ticks alone say too little: the 2s and 5s between are labelled, all alike
        # (a lone 10^0 in other type beside 0.5 and 2 reads as another kind of mark)
        colorbar.ax.yaxis.set_major_formatter(FuncFormatter(_plain_label))
        colorbar.ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
    else:
        colorbar.ax.yaxis.set_minor_formatter(NullFormatter())
    colorbar.ax.tick_params(which="both", labelsize=7)
    title = "Per-layer gradient norm" if kind == "grad_norms" else "Per-layer update-to-weight ratio"
    if branch is not None:
        title += f": {branch.title}"
        ax.set_xlim(edges[0], edges[-1])
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.set_xlabel("optimizer step (of the abandoned branch)")
    else:
        mark_run(ax, data, labels=False, skips=False)
        step_axis(ax, data)
    ax.set_title(title)
    ax.grid(False)
    return mesh
