"""The report's panel list, each panel as its own figure, and all of them stacked in one.

The stacked figure is what ``FitResult.plot`` returns; the command saves each panel as a PNG.
Every figure has the same margins, in inches, so the step axes of the PNGs line up on the page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from safeloop.report.data import Branch, RunData
from safeloop.report.figures import draw_findings, draw_grad_norm, draw_loss, draw_lr, draw_lr_find
from safeloop.report.heatmaps import draw_layers

__all__ = ["Panel", "panels_for", "draw_panel", "overview"]


@dataclass(frozen=True)
class Panel:
    """One panel of the report.

    Attributes:
        name (`str`): its file name part (``loss`` -> ``report-loss.png``).
        title (`str`): its heading on the page.
        caption (`str`): how to read it.
        draw (`Callable`): ``draw(ax, data)``.
        height (`float`): its height in inches.
    """

    name: str
    title: str
    caption: str
    draw: Callable[[Axes, RunData], Any]
    height: float


def _layer_height(data: RunData, kind: str) -> float:
    count = len((data.grad_norms if kind == "grad_norms" else data.update_ratios).names)
    return min(9.0, 1.3 + 0.2 * min(count, 40))


def panels_for(data: RunData) -> list[Panel]:
    """The panels this run has data for, in page order."""
    panels = []
    if data.history:
        panels += [
            Panel("loss", "Loss", _LOSS, draw_loss, 3.6),
            Panel("lr", "Learning rate", _LR, draw_lr, 2.4),
            Panel("grad-norm", "Global gradient norm", _GRAD, draw_grad_norm, 2.6),
        ]
    for kind, name, title, caption in (
        ("grad_norms", "layer-grad-norm", "Per-layer gradient norm", _LAYER_GRAD),
        ("update_ratios", "update-ratio", "Per-layer update-to-weight ratio", _LAYER_RATIO),
    ):
        height = _layer_height(data, kind)
        if len(getattr(data, kind)) and getattr(data, kind).names:
            panels.append(Panel(name, title, caption, _heat(kind), height))
        branch_caption = _BRANCH if kind == "grad_norms" else _BRANCH_RATIO
        for i, branch in enumerate(data.branches, start=1):
            if len(getattr(branch, kind)):
                panel = Panel(
                    f"{name}-branch-{i}",
                    f"{title}, {branch.title}",
                    branch_caption,
                    _heat(kind, branch),
                    height,
                )
                panels.append(panel)
    if data.lr_find:
        panels.append(Panel("lr-find", "Learning-rate range test", _LR_FIND, draw_lr_find, 3.2))
    return panels


def _heat(kind: str, branch: Branch | None = None) -> Callable[[Axes, RunData], Any]:
    return lambda ax, data: draw_layers(ax, data, kind, branch)


# Fixed margins, in inches, the same for every panel: the step axes of the stacked PNGs line up
# on the page (a rollback is at one x in all of them), and no layout engine runs (it measured every
# text of a figure again, half the time of a report).
_LEFT, _RIGHT, _TOP, _BOTTOM, _GAP = 1.75, 1.0, 0.35, 0.5, 0.85


def draw_panel(panel: Panel, data: RunData, *, width: float = 10.0) -> Figure:
    """One panel as its own figure."""
    figure = Figure(figsize=(width, panel.height))
    figure.subplots_adjust(
        left=_LEFT / width,
        right=1 - _RIGHT / width,
        top=1 - _TOP / panel.height,
        bottom=_BOTTOM / panel.height,
    )
    panel.draw(figure.add_subplot(), data)
    return figure


def overview(
    data: RunData, *, width: float = 11.0, findings: bool = True, only: Sequence[str] | None = None
) -> Figure:
    """Every panel stacked in one figure (``FitResult.plot``), the findings as text at the bottom.

    Args:
        data (`RunData`): the run.
        width (`float`, *optional*): in inches.
        findings (`bool`, *optional*): the findings' text below the panels.
        only (`Sequence[str]`, *optional*): the names of the panels to draw (``"loss"``, ``"lr"``,
            ``"layer-grad-norm-branch-1"``, ...), in this order; all when None.
    """
    panels = panels_for(data)
    if only is not None:
        named = {panel.name: panel for panel in panels}
        panels = [named[name] for name in only if name in named]
    heights = [p.height - _TOP - _BOTTOM for p in panels]  # the axes alone; the gaps hold the rest
    if findings:
        heights.append(0.3 + 0.2 * min(len(data.findings) * 2 + 1 + len(data.notes), 20))
    if not heights:
        return Figure(figsize=(width, 1))
    total = sum(heights) + _GAP * (len(heights) - 1) + 0.45 + _TOP + _BOTTOM
    figure = Figure(figsize=(width, total))
    grid = figure.add_gridspec(
        len(heights), 1, height_ratios=heights, left=_LEFT / width, right=1 - _RIGHT / width,
        top=1 - (0.45 + _TOP) / total, bottom=_BOTTOM / total, hspace=_GAP / (sum(heights) / len(heights)),
    )  # fmt: skip
    for i, panel in enumerate(panels):
        panel.draw(figure.add_subplot(grid[i]), data)
    if findings:
        draw_findings(figure.add_subplot(grid[len(panels)]), data)
    figure.suptitle(_headline(data), fontsize=10, x=0.01, y=1 - 0.12 / total, ha="left", va="top")
    return figure


def _headline(data: RunData) -> str:
    end = data.end or {}
    status = data.status or "no end line (running, or killed)"
    parts = [f"{status}, {data.last_step} step{'s' if data.last_step != 1 else ''}"]
    skips, rollbacks = len(data.events_of("skip")), len(data.events_of("rollback"))
    parts.append(f"{skips} skipped, {rollbacks} rollback{'s' if rollbacks != 1 else ''}")
    if end.get("eval_loss") is not None:
        parts.append(f"eval loss {end['eval_loss']:.4g}")
    if data.baseline_loss is not None:
        parts.append(f"baseline {data.baseline_loss:.4g}")
    return "safeloop run: " + ", ".join(parts)


_LOSS = (
    "The training loss at each log step (the mean over its interval, skipped steps left out), "
    "light; smoothed, dark. The dotted line is the loss of the best constant prediction (class "
    "frequencies, target mean): a loss that stays near it means the model learns nothing from "
    "its inputs. Orange: the evaluation loss. Red ticks at the bottom: steps the NaN/Inf guard "
    "skipped. A rollback is a red dashed line where the divergence was read, the shaded span "
    "going back to the step it restored; the grey dashed curve is the abandoned branch. Purple: "
    "all-zero weights re-initialised; black: a preemption; blue dotted: a resume."
)
_LR = (
    "The learning rate of the first parameter group: the rate of each log interval's last step, "
    "drawn held over its interval (a schedule shows as steps, a cut as a vertical drop). Each red "
    "triangle is a rollback lowering every rate by rollback_lr_factor; the schedule keeps that scale."
)
_GRAD = (
    "The global L2 gradient norm before clipping, at the last step of each log interval. With "
    "clip_grad_norm, the dash-dotted line is the threshold: steps above it were scaled down to it. "
    "A norm that climbs by orders of magnitude before a rollback is the explosion that caused it."
)
_LAYER_GRAD = (
    "One row per parameter, one column per log step (on a long run, each column is a bucket of "
    "log steps showing its value furthest from the layer's median, so extremes stay visible). "
    "Log colour scale. A row much darker than the others is a vanishing gradient, much brighter an "
    "exploding one; black is exactly zero (a dead layer); light grey is not measured."
)
_LAYER_RATIO = (
    "||update|| / ||weight|| of each weight matrix at each log step, log scale centred on 1e-3 "
    "(white), the usual healthy size. Red: larger updates (above 1e-1 the diagnostics report "
    "lr-too-high); blue: the weight barely moves (below 1e-6: lr-too-low, unless the schedule has "
    "annealed the rate near 0, as at the end of a cosine). Black: the weight did not move at all."
)
_BRANCH = (
    "The same heat map for the log steps that a rollback abandoned (or that a resume rewrote), "
    "on its own colour scale (read the bar: a blow-up spans many decades): the layers whose "
    "gradients grew first before the divergence stand out here."
)
_BRANCH_RATIO = (
    "The update-to-weight ratios of the log steps that a rollback abandoned (or that a resume "
    "rewrote), on the same fixed scale as above: dark red is an update as large as the weight "
    "or larger, the learning rate too high for that layer."
)
_LR_FIND = (
    "The learning-rate range test (SafeTrainer.find_lr) run in this folder: the loss at each rate, "
    "smoothed, and the suggested rate (dashed). See docs/lr-finder.md for the rules."
)
