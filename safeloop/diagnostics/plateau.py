"""A loss that stopped improving, and the one finding that ranks its measured causes.

``LossPlateau`` decides from the per-step losses when the loss is flat; the causes come from
``updates.py`` (update sizes) and the other monitors' findings. Host side only.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Sequence

from safeloop.diagnostics.updates import CONVERGED, Cause, rank_causes
from safeloop.results import Finding

__all__ = [
    "LossPlateau",
    "PLATEAU_CHECKS",
    "PLATEAU_MIN_STEPS",
    "PLATEAU_MARGIN",
    "PLATEAU_PROGRESS",
    "PLATEAU_LEARNED",
    "PLATEAU_PRECISION",
    "PLATEAU_HISTORY",
]

# "loss-plateau": no improvement over a window. A window of 5 log checks and at least
# 100 steps keeps minibatch noise and a slow but steady descent from looking flat.
PLATEAU_CHECKS = 5
PLATEAU_MIN_STEPS = 100
# "Improved" means the best window mean of the recent window beats the best before it by 1%.
PLATEAU_MARGIN = 0.01
# A loss already below half its starting value has learned: flat from there on is convergence.
PLATEAU_PROGRESS = CONVERGED
# A plateau with no measured cause after the loss fell below PLATEAU_LEARNED of its start is most
# likely convergence at the data's noise floor or the model's capacity (a noisy regression that
# settles at 0.64 from 0.97): reported as info. One that never got there (still near the loss of
# an untrained model: the label prior, the target mean) stays a warning, as does any plateau with
# a measured cause, whatever the progress.
PLATEAU_LEARNED = 0.75
# "No new best" alone mistakes minibatch noise for a flat loss: the best window mean before is the
# minimum of many noisy means, so a lucky low window sets a bar that a slow real descent (a few %
# per window, under a noise of 5% per log check) takes long to beat. So a plateau also needs the
# trend to be flat: the least-squares slope over the last log checks, over a horizon just long
# enough that its standard error (from the measured noise) is at most PLATEAU_PRECISION times the
# margin, must improve the loss by less than the margin per window. A noiseless loss needs only
# one window; a noisy one needs more checks before a plateau can be told from a slow descent (a
# descent of 3% per window, three margins, is then taken for flat at about 1 check in 260).
PLATEAU_PRECISION = 0.75
PLATEAU_HISTORY = 30  # windows of log checks kept for the trend (300 checks with the default window)


class LossPlateau:
    """Decides, once per log check, whether the loss has stopped improving.

    Args:
        log_every (`int`): optimizer steps between two checks.
        window (`int`, *optional*): log checks that must show no improvement; defaults to
            ``max(PLATEAU_CHECKS, ceil(PLATEAU_MIN_STEPS / log_every))``.
        margin (`float`, *optional*, defaults to ``PLATEAU_MARGIN``): relative improvement that
            counts as progress.
    """

    def __init__(self, log_every: int, window: int | None = None, margin: float = PLATEAU_MARGIN) -> None:
        self.window = window or max(PLATEAU_CHECKS, math.ceil(PLATEAU_MIN_STEPS / max(log_every, 1)))
        self.margin = margin
        self._recent: deque[float] = deque(maxlen=self.window)
        self._best_before = math.inf
        self._first: float | None = None
        self._armed = True
        self._level = math.inf  # the best window mean of the plateau last found
        # the trend: check means, and the variance of each mean measured from its steps' losses
        self._means: deque[float] = deque(maxlen=PLATEAU_HISTORY * self.window)
        self._variances: deque[float] = deque(maxlen=4 * self.window)
        self.summary = ""

    def restart(self) -> None:
        """Start over from the restored state (after a rollback).

        The abandoned branch's losses must not count: a start taken from a loss of 1e16 there
        would make every later loss look like convergence, and a plateau would never be found.
        """
        self._recent.clear()
        self._best_before = math.inf
        self._first = None
        self._armed = True
        self._means.clear()
        self._variances.clear()

    def update(self, losses: Sequence[float]) -> bool:
        """Add one log check's losses; True when a new plateau is found (report it once).

        Args:
            losses (`Sequence[float]`): the per-step losses of the interval (NaN ones are ignored).

        Returns:
            `bool`: True the first time the loss is flat, and again only after a new improvement.
        """
        finite = [v for v in losses if math.isfinite(v)]
        if not finite:
            return False
        mean = sum(finite) / len(finite)
        if self._first is None:
            self._first = mean
        self._means.append(mean)
        if len(finite) > 1:
            spread = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
            self._variances.append(spread / len(finite))
        if len(self._recent) == self.window:
            self._best_before = min(self._best_before, self._recent[0])
        self._recent.append(mean)
        if len(self._recent) < self.window or not math.isfinite(self._best_before):
            return False
        best_recent = min(self._recent)
        if best_recent < self._best_before - self.margin * abs(self._best_before):
            self._armed = True  # a new improvement: a later plateau is news again
            return False
        # converged: the recent loss (not the run's best: a loss that halved, then climbed back,
        # diverges) is below PLATEAU_PROGRESS of the start
        if not self._armed or (self._first > 0 and best_recent < PLATEAU_PROGRESS * self._first):
            return False
        trend = self._trend()
        if trend is None:
            return False  # a slow descent under the noise, or too few checks yet to tell
        improvement, checks = trend
        self._armed = False
        self._level = best_recent
        self.summary = (
            f"the loss has not improved by {self.margin:.0%} over the last {self.window} log checks "
            f"(best window mean {best_recent:.4g} there, {self._best_before:.4g} before, "
            f"{self._first:.4g} at the start; trend over the last {checks} checks "
            f"{-improvement:+.2%} per {self.window} checks)"
        )
        return True

    def _noise(self) -> float:
        """The standard deviation of one check's mean loss: the larger of two measures.

        From the spread of each check's per-step losses (a check of one step says nothing), and
        from the differences of successive check means (median, so the descent and an odd jump
        hardly count; it also sees noise correlated across steps).
        """
        within = statistics.mean(self._variances) if self._variances else 0.0
        means = list(self._means)[-4 * self.window :]
        steps = [abs(b - a) for a, b in itertools.pairwise(means)]
        # |a - b| of two independent N(m, s^2) has median 0.954 s
        between = statistics.median(steps) / 0.954 if steps else 0.0
        return max(math.sqrt(within), between)

    def _trend(self) -> tuple[float, int] | None:
        """The relative improvement per window of the least-squares trend, and its horizon.

        The horizon is the shortest one whose slope is precise enough (``PLATEAU_PRECISION``);
        None when the trend there still descends by the margin. Where no horizon is precise
        enough yet, every kept check counts, and only a trend that is below the margin by two
        standard errors (a loss flat or rising beyond doubt) is returned.
        """
        means = list(self._means)
        level = abs(statistics.mean(means[-self.window :]))
        if level == 0:
            return 0.0, self.window
        noise = self._noise() / level
        precise, n, spread, error = False, 0, 0.0, math.inf
        # a window's checks, at least 3 where there are (a window of 1 may have only 2)
        for n in range(max(2, min(max(self.window, 3), len(means))), len(means) + 1):
            spread = math.sqrt(n * (n * n - 1) / 12)  # sqrt of sum (t - mean t)^2 over n checks
            error = noise * self.window / spread  # standard error of the improvement per window
            if error <= PLATEAU_PRECISION * self.margin:
                precise = True
                break
        if n < 2:
            return None
        ys = means[-n:]
        t_mean, y_mean = (n - 1) / 2, sum(ys) / n
        slope = sum((t - t_mean) * (y - y_mean) for t, y in enumerate(ys)) / spread**2
        improvement = -slope * self.window / level
        bound = improvement if precise else improvement + 2 * error
        return None if bound >= self.margin else (improvement, n)

    def finding(
        self, step: int, causes: Sequence[Cause], context: Sequence[Finding] = (), *, measured: bool = True
    ) -> Finding:
        """The ``loss-plateau`` finding for the plateau just found, causes ranked.

        Args:
            step (`int`): the global step of the check.
            causes (`Sequence[Cause]`): causes measured at this check, in any order.
            context (`Sequence[Finding]`): findings reported so far in the run; those of a code
                not measured now join the causes (``info`` ones and plateaus do not).
            measured (`bool`, *optional*, defaults to True): per-parameter gradients and updates
                were measured (False where parameters are sharded), so their absence from the
                causes means they are healthy.

        Returns:
            `Finding`: one warning naming the causes, most likely first; ``info`` when nothing
            is measured wrong and the loss fell below ``PLATEAU_LEARNED`` of its start.
        """
        ranked = rank_causes(causes, context, own="loss-plateau")
        if ranked:
            listed = "; ".join(f"{i}) {c.code}: {c.text}" for i, c in enumerate(ranked, 1))
            message = f"At step {step}, {self.summary}. Measured causes, most likely first: {listed}."
            suggestion = ranked[0].fix
        else:
            healthy = (
                "gradients reach every layer and updates are of a normal size"
                if measured
                else "per-parameter gradients and updates were not measured (sharded parameters)"
            )
            first = self._first if self._first is not None else math.nan
            if measured and first > 0 and self._level < PLATEAU_LEARNED * first:
                return Finding(
                    code="loss-plateau",
                    severity="info",
                    message=(
                        f"At step {step}, {self.summary}. The loss fell {1 - self._level / first:.0%} "
                        f"from its start and no cause is measured ({healthy}): most likely the run "
                        "has converged, at the noise floor of the data or the capacity of the model."
                    ),
                    params=(),
                    step=step,
                    suggestion=(
                        "If a lower loss is expected: a larger model, more or cleaner data, or a "
                        "learning-rate decay; if not, stop here (or use early stopping on eval)."
                    ),
                )
            message = (
                f"At step {step}, {self.summary}. No measured cause: {healthy}, so look at model "
                "capacity, the data and labels (aligned with inputs? shuffled?), or whether the task "
                "is learnable."
            )
            suggestion = (
                "Try to overfit one small batch: if even that fails, the model or loss is wrong; if it "
                "works, check the data pipeline and labels, then grow the model."
            )
        return Finding(
            code="loss-plateau",
            severity="warning",
            message=message,
            params=ranked[0].params if ranked else (),
            step=step,
            suggestion=suggestion,
        )
