"""The report's line panels, drawn with matplotlib's object API (no pyplot: no global state, no window).

Each panel draws one view of a :class:`~safeloop.report.data.RunData` into an ``Axes``: the loss,
the learning rate, the global gradient norm, the range test, the findings as text. What the run
did is marked on every step axis (:func:`mark_run`), each kind with its own ``gid``
(``safeloop-skip``, ``safeloop-rollback``, ``safeloop-reinit``, ``safeloop-preempt``,
``safeloop-resume``, ``safeloop-abandoned``, ...), so that a test can find the marks among the
figure's artists. The heat maps are :mod:`safeloop.report.heatmaps`; the panel list, the single
PNGs and the stacked figure :mod:`safeloop.report.panels`. Importing this module imports
matplotlib and NumPy: call :func:`safeloop.report.optional.require_matplotlib` first for a clear
message when they are missing.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, MaxNLocator
from matplotlib.transforms import blended_transform_factory

from safeloop.report.data import RunData
from safeloop.report.series import as_array, decimate, smooth, smoothing_window

__all__ = [
    "RATIO_HEALTHY", "RATIO_LOW", "RATIO_HIGH", "step_axis", "mark_run", "short_name",
    "draw_loss", "draw_lr", "draw_grad_norm", "draw_lr_find", "draw_findings",
]  # fmt: skip

# the update-to-weight ratio's landmarks, as the diagnostics use them (diagnostics/updates.py):
# about 1e-3 is healthy, lr-too-low below 1e-6 and lr-too-high above 1e-1
RATIO_HEALTHY, RATIO_LOW, RATIO_HIGH = 1e-3, 1e-6, 1e-1
_FADED = "0.6"
_MARKS = {
    "reinit": ("C4", "-", "re-initialised zero weights"),
    "preempt": ("k", "-.", "preempted (stopped with a checkpoint)"),
    "interrupt": ("k", "-.", "interrupted (Ctrl-C)"),
    "resume": ("C0", ":", "resumed from a checkpoint"),
}


def _steps_formatter(value: float, _: Any) -> str:
    if abs(value) >= 10_000:
        return f"{value / 1000:.0f}k"
    return f"{value:.0f}"


def step_axis(ax: Axes, data: RunData, *, label: bool = True) -> None:
    """The run's step axis: from its first to its last step, integer ticks, ``12k`` past 10,000."""
    last = max(1, data.last_step)
    first = min([entry["step"] for entry in data.history[:1]] + [0])
    margin = max(0.5, 0.01 * (last - first))
    ax.set_xlim(first - margin, last + margin)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(_steps_formatter))
    if label:
        ax.set_xlabel("optimizer step")
    ax.grid(True, alpha=0.25)


def _series(entries: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([entry["step"] for entry in entries], dtype=float)
    values = as_array([entry.get(key) for entry in entries])
    values[~np.isfinite(values)] = np.nan  # an infinite loss is a gap (its skip is marked)
    return steps, values


def _line(ax: Axes, steps: np.ndarray, values: np.ndarray, **style: Any) -> None:
    x, y = decimate(steps, values)
    if len(x) <= 30:
        style.setdefault("marker", "o")
        style.setdefault("markersize", 3)
    ax.plot(x, y, **style)


def _finite(arrays: list[np.ndarray]) -> np.ndarray:
    values = np.concatenate([a.ravel() for a in arrays]) if arrays else np.array([])
    return values[np.isfinite(values)]


def _scale(ax: Axes, live: list[np.ndarray], branches: list[np.ndarray], *, spread: float) -> None:
    """A log axis for values spanning more than ``spread`` times, and limits set by the live run.

    An abandoned branch that blew up would squash the live curve to a line at the bottom: it may
    rise at most 2 decades (log) or 3 live ranges (linear) above the live run's top; its points
    above that are drawn on that line as ``^``, and its peak is written in the corner.
    """
    shown, gone = _finite(live), _finite(branches)
    every = np.concatenate([shown, gone])
    if not len(every):
        return
    log = every.min() > 0 and every.max() / every.min() > spread
    if log:
        ax.set_yscale("log")
    if not len(shown) or not len(gone):
        return
    low, high = shown.min(), shown.max()
    if log:
        cap = high * 1e2  # two decades: the run that went on keeps most of the height
        bottom, top = min(low, gone.min()) / 1.5, cap * 4
    else:
        span = max(high - low, abs(high) * 0.1, 1e-12)
        cap = high + 3 * span
        bottom, top = min(low, gone.min()) - 0.05 * span, cap + 0.3 * span
    if gone.max() <= cap:
        return
    ax.set_ylim(bottom, top)
    for line in ax.get_lines():  # the branch's points above the chart sit on its top edge, as ^
        if line.get_gid() != "safeloop-abandoned":
            continue
        x, y = (np.asarray(v, dtype=float) for v in line.get_data())
        over = y > cap
        if over.any():
            line.set_ydata(np.where(over, cap, y))
            ax.plot(
                x[over], np.full(over.sum(), cap), "^", color=_FADED, markersize=6, gid="safeloop-offscale"
            )
    ax.text(
        0.01, 0.97, f"^ abandoned branch above the chart, up to {gone.max():.3g}", transform=ax.transAxes,
        ha="left", va="top", fontsize=7, color="0.3", gid="safeloop-offscale-text",
    )  # fmt: skip


def _abandoned(ax: Axes, data: RunData, key: str, *, label: bool, **style: Any) -> list[np.ndarray]:
    """Each abandoned branch, faded and dashed, leaving the live curve where the run went back to."""
    drawn = []
    for i, branch in enumerate(data.branches):
        start = [entry for entry in data.history if entry["step"] <= branch.at][-1:]
        steps, values = _series(start + branch.entries, key)
        what = "abandoned by a rollback" if branch.kind == "rollback" else "overwritten by a resume"
        _line(
            ax, steps, values, color=_FADED, linestyle="--", linewidth=1.2, gid="safeloop-abandoned",
            label=f"branch {what}" if label and i == 0 else None, **style,
        )  # fmt: skip
        drawn.append(values)
    return drawn


def mark_run(ax: Axes, data: RunData, *, labels: bool, skips: bool = True) -> None:
    """Skips, rollbacks, re-initialisations, preemptions and resumes on the step axis."""
    bottom = blended_transform_factory(ax.transData, ax.transAxes)
    if skips:
        live = [event["step"] for event in data.events_of("skip")]
        gone = [event["step"] for event in data.abandoned_events if event["kind"] == "skip"]
        if live:
            ax.scatter(
                live, [0.03] * len(live), transform=bottom, marker="|", s=120, color="C3", zorder=5,
                gid="safeloop-skip", label=f"skipped step ({len(live)})" if labels else None, clip_on=False,
            )  # fmt: skip
        if gone:
            ax.scatter(
                gone, [0.03] * len(gone), transform=bottom, marker="|", s=120, color="C3", alpha=0.3,
                gid="safeloop-skip-abandoned", clip_on=False,
            )  # fmt: skip
    for number, event in enumerate(data.events_of("rollback")):
        detail = event["detail"]
        at, found = event["step"], detail.get("detected_at", event["step"])
        ax.axvspan(at, found, color="C3", alpha=0.07, gid="safeloop-rollback-span")
        ax.axvline(
            found, color="C3", linestyle="--", linewidth=1.2, gid="safeloop-rollback",
            label="rollback: read here, back to the span's start" if labels and number == 0 else None,
        )  # fmt: skip
        if labels:
            ax.annotate(
                f"rollback {detail.get('rollback', '')}\n{detail.get('reason', '')}\n-> step {at}",
                xy=(found, 0.62), xycoords=bottom, ha="left", va="top", fontsize=7, color="C3",
                xytext=(4, 0), textcoords="offset points", zorder=6,
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
            )  # fmt: skip
    for kind, (color, style, text) in _MARKS.items():
        events = data.events_of(kind)
        gid = f"safeloop-{'preempt' if kind == 'interrupt' else kind}"
        for i, event in enumerate(events):
            ax.axvline(
                event["step"], color=color, linestyle=style, linewidth=1.2, gid=gid,
                label=text if labels and i == 0 else None,
            )  # fmt: skip


def short_name(name: str, width: int = 32) -> str:
    """A parameter name cut from the left to ``width`` characters (the end says most)."""
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def _legend(ax: Axes) -> None:
    handles, names = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, names, loc="best", fontsize=7, framealpha=0.85)


def draw_loss(ax: Axes, data: RunData) -> None:
    """Training loss, raw and smoothed, the baseline, evaluations, and what the run did."""
    steps, loss = _series(data.history, "loss")
    window = smoothing_window(len(loss))
    raw_style = {"color": "C0", "linewidth": 0.8, "alpha": 0.45 if window > 1 else 1.0}
    _line(ax, steps, loss, label="loss (mean of each log interval)", gid="safeloop-loss", **raw_style)
    if window > 1:
        smoothed = smooth(loss, window)
        x, y = decimate(steps, smoothed)
        ax.plot(
            x, y, color="C0", linewidth=1.8, label=f"smoothed ({window} log steps)", gid="safeloop-smoothed"
        )
    branches = _abandoned(ax, data, "loss", label=True)
    if data.evals:
        ax.plot(
            [s for s, _ in data.evals], [v for _, v in data.evals], color="C1", marker="o", markersize=4,
            linewidth=1.2, label="eval loss", gid="safeloop-eval",
        )  # fmt: skip
    if data.baseline_loss is not None:
        ax.axhline(
            data.baseline_loss, color="0.35", linestyle=":", linewidth=1.2, gid="safeloop-baseline",
            label=f"constant prediction ({data.baseline_loss:.3g})",
        )  # fmt: skip
    extra = [np.array([data.baseline_loss])] if data.baseline_loss is not None else []
    _scale(ax, [loss, *extra, as_array([v for _, v in data.evals])], branches, spread=30)
    mark_run(ax, data, labels=True)
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    step_axis(ax, data)
    _legend(ax)


def draw_lr(ax: Axes, data: RunData) -> None:
    """The learning rate of the first parameter group, and each rollback's cut."""
    steps, lr = _series(data.history, "lr")
    # a log step's rate is that of its interval's last step: drawn as a step, a cut stays a cut
    _line(
        ax,
        steps,
        lr,
        color="C2",
        linewidth=1.4,
        label="learning rate",
        gid="safeloop-lr",
        drawstyle="steps-pre",
    )
    # (linear axis: a schedule reads best on one; a cosine's tail would fill a log one)
    _abandoned(ax, data, "lr", label=False, drawstyle="steps-pre")
    for i, event in enumerate(data.events_of("lr_scale")):
        detail = event["detail"]
        after = (detail.get("lr_after") or [None])[0]
        if after is None:
            continue
        ax.plot(
            [event["step"]], [after], marker="v", color="C3", markersize=8, linestyle="none",
            gid="safeloop-lr-cut", label="rollback lowers the rate" if i == 0 else None,
        )  # fmt: skip
        ax.annotate(
            f"x{detail.get('factor', '')}", (event["step"], after), xytext=(7, 2),
            textcoords="offset points", fontsize=7, color="C3", va="bottom",
        )  # fmt: skip
    ax.margins(y=0.15)  # a cut's triangle at the lowest rate stays inside the axes
    mark_run(ax, data, labels=False, skips=False)
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate")
    step_axis(ax, data)
    _legend(ax)


def draw_grad_norm(ax: Axes, data: RunData) -> None:
    """The global gradient norm (before clipping) against the clip threshold."""
    steps, norm = _series(data.history, "grad_norm")
    _line(
        ax,
        steps,
        norm,
        color="C5",
        linewidth=1.0,
        label="global gradient norm (last step of each interval)",
        gid="safeloop-grad-norm",
    )
    branches = _abandoned(ax, data, "grad_norm", label=False)
    clip = data.settings.get("clip_grad_norm")
    if clip:
        ax.axhline(
            clip, color="C3", linestyle="-.", linewidth=1.2, gid="safeloop-clip",
            label=f"clip_grad_norm = {clip:g} (above: clipped)",
        )  # fmt: skip
    elif data.settings.get("adaptive_clip"):
        text = f"adaptive_clip z = {data.settings['adaptive_clip']:g}: clipped against its running statistics"
        ax.text(
            0.01, 0.97, text,
            transform=ax.transAxes, fontsize=7, va="top",
        )  # fmt: skip
    _scale(ax, [norm, *([np.array([clip])] if clip else [])], branches, spread=10)
    mark_run(ax, data, labels=False)
    ax.set_ylabel("gradient norm")
    ax.set_title("Global gradient norm")
    step_axis(ax, data)
    _legend(ax)


def draw_lr_find(ax: Axes, data: RunData) -> None:
    """The learning-rate range test, drawn as ``LRFinderResult.plot`` draws it."""
    from safeloop.lr_finder.result import LRFinderResult

    found = dict(data.lr_find or {})
    known = set(LRFinderResult.__dataclass_fields__)
    result = LRFinderResult(**{k: v for k, v in found.items() if k in known})
    result.plot(ax=ax)
    ax.set_gid("safeloop-lr-find")


def draw_findings(ax: Axes, data: RunData, *, limit: int = 8) -> None:
    """The findings as text, most severe first, each with its fix (for the single-figure view)."""
    ax.axis("off")
    ax.set_title("Findings (most severe first)", loc="left")
    lines: list[tuple[str, str]] = []
    colours = {"error": "C3", "warning": "C1", "info": "0.3"}
    for finding in data.findings[:limit]:
        count = f" x{finding['count']}" if finding.get("count", 1) > 1 else ""
        where = f" (step {finding['step']})" if finding.get("step") is not None else ""
        message = (finding.get("message") or "").splitlines()[0] if finding.get("message") else ""
        head = f"[{finding['severity']}] {finding['code']}{count}{where}: {message}"
        lines.append((textwrap.shorten(head, 150, placeholder=" ..."), colours.get(finding["severity"], "k")))
        if finding.get("suggestion") and finding["severity"] != "info":
            lines.append(
                ("      fix: " + textwrap.shorten(finding["suggestion"], 140, placeholder=" ..."), "0.25")
            )
    if len(data.findings) > limit:
        lines.append((f"... and {len(data.findings) - limit} more (see the report's list)", "0.3"))
    if not lines:
        lines.append(("no findings", "0.3"))
    lines += [("note: " + textwrap.shorten(note, 160, placeholder=" ..."), "0.45") for note in data.notes]
    step = 1 / max(len(lines), 1)
    for i, (text, colour) in enumerate(lines):
        ax.text(
            0, 1 - (i + 0.5) * step, text, fontsize=7.5, color=colour, va="center", transform=ax.transAxes
        )
