"""What a learning-rate range test returns: the curve, the suggestion or a verdict, and a plot."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["LRFinderResult"]


@dataclass(frozen=True)
class LRFinderResult:
    """The curve of a learning-rate range test, and what it suggests.

    Attributes:
        lrs (`list[float]`): the first param group's learning rate at each finite point.
        losses (`list[float]`): the loss at each point, averaged over the accumulation window and
            over processes (measured before that point's update).
        smoothed_losses (`list[float]`): their debiased exponential moving average.
        suggestion (`float | None`): the learning rate to train with, by ``rule``; None when the
            curve cannot support one (see ``verdict``).
        rule (`str`): the rule behind ``suggestion`` (``"minimum"`` unless another was asked for).
        suggestions (`dict[str, float | None]`): every rule's value (``minimum``, ``steepest``,
            ``valley``), for comparison.
        verdict (`str | None`): ``"no-response"``, ``"noise"`` or ``"no-descent"`` when there is
            no suggestion, else None.
        message (`str`): one paragraph: the suggestion and how it was found, or the verdict's
            measurements and what to do.
        stop_reason (`str`): ``"max_lr"`` (the sweep ran to its end), ``"diverged"`` (the smoothed
            loss passed ``stop_factor`` times its best), ``"nonfinite"`` (3 non-finite steps in a
            row), or ``"no-grad"`` (the loss does not require a gradient).
        steps (`int`): optimizer steps taken by the sweep, non-finite ones included.
        nonfinite_steps (`int`): steps whose loss or gradients were not finite (refused, kept out).
        loader_passes (`int`): how often the sweep started the training loader over (it cycles
            a loader shorter than the sweep).
        baseline_loss (`float | None`): the loss of the best constant prediction on the sweep's
            first targets, when the loss is one safeloop recognises.
        snapshot (`str`): where the state was kept during the sweep (``"memory"`` or ``"disk"``).
        snapshot_bytes (`int`): the size of that copy on this process.
        restore_seconds (`float`): time taken to capture and restore it.
    """

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggestion: float | None
    rule: str
    suggestions: dict[str, float | None]
    verdict: str | None
    message: str
    stop_reason: str
    steps: int
    nonfinite_steps: int = 0
    loader_passes: int = 1
    baseline_loss: float | None = None
    snapshot: str = "memory"
    snapshot_bytes: int = 0
    restore_seconds: float = 0.0

    def __str__(self) -> str:
        return self.message

    def plot(self, path: str | os.PathLike[str] | None = None, *, ax: Any = None) -> Any:
        """Draw the loss against the learning rate (log axis), the suggestion marked.

        Needs matplotlib: ``pip install "safeloop[report]"``.

        Args:
            path (`str`, *optional*): write the figure there (PNG, SVG, PDF by the suffix).
            ax (`matplotlib.axes.Axes`, *optional*): draw into these axes instead of a new figure.

        Returns:
            `matplotlib.figure.Figure`: the figure drawn on.

        Raises:
            ImportError: matplotlib is not installed (naming the extra that installs it).
        """
        try:
            import matplotlib

            if ax is None and path is not None:
                matplotlib.use("Agg")  # a file needs no display (a server, CI)
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "LRFinderResult.plot needs matplotlib, which is not installed; install the report "
                'extra: pip install "safeloop[report]"'
            ) from error
        if ax is None:
            figure, ax = plt.subplots(figsize=(7, 4.2))
        else:
            figure = ax.figure
        ax.plot(self.lrs, self.losses, color="0.7", linewidth=1, label="loss")
        ax.plot(self.lrs, self.smoothed_losses, color="C0", label="smoothed")
        if self.suggestion is not None:
            ax.axvline(
                self.suggestion, color="C3", linestyle="--", label=f"{self.rule}: {self.suggestion:.3g}"
            )
        if self.baseline_loss is not None:
            ax.axhline(self.baseline_loss, color="0.4", linestyle=":", label="constant prediction")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        title = "learning-rate range test" if self.verdict is None else f"no suggestion: {self.verdict}"
        ax.set_title(title)
        if self.smoothed_losses:  # the blow-up at the end would flatten the rest of the curve
            low = min(min(self.smoothed_losses), min(self.losses))
            high = max(self.smoothed_losses[: max(1, len(self.lrs) // 10)])
            span = max(high - low, 1e-12)
            ax.set_ylim(low - 0.1 * span, high + 0.6 * span)
        ax.legend(loc="best")
        if path is not None:
            figure.savefig(os.fspath(path), dpi=120, bbox_inches="tight")
        return figure
