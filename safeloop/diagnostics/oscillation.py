"""A learning rate too high to settle: the loss bounces above its best without diverging.

The classic symptom of too high a learning rate is "the loss oscillates or diverges"; divergence is
the spike detector's and the NaN guard's, this is the other half. With Adam on a small transformer
at 30x a good learning rate, the loss falls to 0.89, then wanders between 0.9 and 1.2 for hundreds of
steps while a lower rate reaches 0.6: no step is non-finite, and the plateau rule sees no flat loss.
Measured here, once per log check (host side, on values already read):

- the loss is well above its own best: the mean of the last ``OSC_RECENT`` checks is more than
  ``OSC_ABOVE_BEST`` above the best such mean of the run (a healthy run's stays within a few %:
  measured 2-7% at good rates on the same model), by more than ``OSC_NOISE`` standard errors;
- it has no downward trend over the last window (it is not still recovering from an earlier bump);
- the median update-to-weight ratio ``||dw|| / ||w||`` is at least ``OSC_RATIO`` (10x the healthy
  1e-3): the weights move a lot at each step.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence

from safeloop.diagnostics.updates import LR_TARGET_RATIO, find_lr_hint, listing
from safeloop.diagnostics.window_stats import sample_variance
from safeloop.results import Finding

__all__ = ["Oscillation", "OSC_RATIO", "OSC_ABOVE_BEST", "OSC_RECENT", "OSC_NOISE", "OSC_CHECKS"]

OSC_RATIO = 1e-2
OSC_ABOVE_BEST = 0.15
OSC_RECENT = 3
OSC_NOISE = 4.0
# Log checks in a row the condition must hold.
OSC_CHECKS = 2


class Oscillation:
    """Judges, once per log check, whether the loss oscillates above its best at a high update size.

    Args:
        window (`int`): log checks of the trend (the plateau's window).
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._means: deque[float] = deque(maxlen=max(window, OSC_RECENT))
        self._errors: deque[float] = deque(maxlen=OSC_RECENT)
        self._lrs: deque[float] = deque(maxlen=window)
        self._best = math.inf
        self._best_step = 0
        self._streak = 0
        self._reported = False
        self.cause_text = ""  # what was measured, for the plateau and no-learning causes

    def restart(self) -> None:
        """Start over from the restored state (after a rollback)."""
        self._means.clear()
        self._errors.clear()
        self._lrs.clear()
        self._best = math.inf
        self._streak = 0

    def check(
        self,
        step: int,
        losses: Sequence[float],
        median_ratio: float | None,
        ratios: dict[str, float],
        lr: float | None,
    ) -> Finding | None:
        """Add one log check; the ``lr-too-high`` finding the first time the rule holds.

        Args:
            step (`int`): the global step of the check.
            losses (`Sequence[float]`): the interval's per-step losses.
            median_ratio (`float`, *optional*): the median update-to-weight ratio measured now.
            ratios (`dict[str, float]`): the ratio of each weight (the most moved are named).
            lr (`float`, *optional*): the learning rate now.
        """
        # a rate that rose within the window (warm-up, a warm restart, a one-cycle schedule) makes
        # the loss rise with it by design: no verdict until it has stopped rising
        rising = lr is not None and any(old < lr for old in self._lrs)
        if lr is not None:
            self._lrs.append(lr)
        finite = [v for v in losses if math.isfinite(v)]
        if not finite:
            return None
        mean = statistics.fmean(finite)
        spread = sample_variance(finite) / len(finite) if len(finite) > 1 else 0.0
        self._means.append(mean)
        self._errors.append(spread)
        if len(self._means) < OSC_RECENT:
            return None
        recent = statistics.fmean(list(self._means)[-OSC_RECENT:])
        if recent < self._best:
            self._best, self._best_step = recent, step
        if self._reported or len(self._means) < self.window or median_ratio is None or self._best <= 0:
            self._streak = 0
            return None
        error = math.sqrt(statistics.fmean(self._errors) / OSC_RECENT)
        above = recent / self._best - 1
        means = list(self._means)[-self.window :]
        n = len(means)
        t_mean, y_mean = (n - 1) / 2, statistics.fmean(means)
        slope = sum((t - t_mean) * (y - y_mean) for t, y in enumerate(means)) / sum(
            (t - t_mean) ** 2 for t in range(n)
        )
        held = (
            above > OSC_ABOVE_BEST
            and recent - self._best > OSC_NOISE * error
            and slope >= 0  # not descending: a loss still recovering from a bump is left alone
            and median_ratio >= OSC_RATIO
            and not rising
        )
        self._streak = self._streak + 1 if held else 0
        if self._streak < OSC_CHECKS:
            return None
        self._reported = True
        at_lr = f" at lr {lr:.3g}" if lr is not None else ""
        self.cause_text = (
            f"the loss oscillates {above:.0%} above its best ({recent:.4g} against {self._best:.4g}) with "
            f"a median update-to-weight ratio of {median_ratio:.2g}{at_lr}"
        )
        moved = sorted(ratios.items(), key=lambda item: -item[1])
        low, high = (lr / 10, lr / 3) if lr is not None else (math.nan, math.nan)
        target = f" to between {low:.2g} and {high:.2g}" if lr is not None else " 3 to 10 times"
        return Finding(
            code="lr-too-high",
            severity="warning",
            message=(
                f"At step {step}, the loss averaged {recent:.4g} over the last {OSC_RECENT} log checks, "
                f"{above:.0%} above its best {self._best:.4g} (step {self._best_step}), and has not "
                f"come back down over the last {n} checks (threshold {OSC_ABOVE_BEST:.0%} above the "
                f"best, beyond {OSC_NOISE:g} standard errors {error:.2g} of the check means), while "
                f"the median update-to-weight ratio ||dw||/||w|| is {median_ratio:.2g}{at_lr} (a healthy "
                f"ratio is about {LR_TARGET_RATIO:g}; most moved: {listing(moved[:3])}). The steps are "
                "too large for the loss to settle: it oscillates around a level that a lower "
                "learning rate gets below, though it never goes non-finite."
            ),
            params=tuple(name for name, _ in moved[:3]),
            step=step,
            suggestion=(
                f"Lower the learning rate{target} (3 to 10 times lower), or decay it (cosine, "
                f"step or `ReduceLROnPlateau`); {find_lr_hint(lr, too_high=True)}."
            ),
        )
