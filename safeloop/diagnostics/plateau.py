"""Learning progress: updates of the wrong size for the weights, and a loss that stopped improving.

Host side only. ``TrainingMonitor`` measures on the device each weight's update-to-weight ratio
``||dw|| / ||w||`` at log steps; ``UpdateSize`` judges those ratios against the loss (lr-too-high,
lr-too-low). ``LossPlateau`` decides from the per-step losses when the loss is flat and writes the
one finding that ranks the measured causes.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from safeloop.results import Finding

__all__ = [
    "Cause",
    "UpdateSize",
    "LossPlateau",
    "LR_HIGH_RATIO",
    "LR_LOW_RATIO",
    "LR_TARGET_RATIO",
    "LR_CHECKS",
    "LR_HIGH_CHECKS",
    "LR_LOW_FLAT",
    "LR_ANNEALED",
    "PLATEAU_CHECKS",
    "PLATEAU_MIN_STEPS",
    "PLATEAU_MARGIN",
    "PLATEAU_PROGRESS",
    "PLATEAU_PRECISION",
    "PLATEAU_HISTORY",
    "CONTEXT_RANKS",
]

# FINDINGS.md "lr-too-high" / "lr-too-low" bounds on ||dw|| / ||w|| (median over the weights), and
# the ~1e-3 that Karpathy (CS231n, "ratio of weights:updates") calls healthy, to suggest a factor.
LR_HIGH_RATIO = 1e-1
LR_LOW_RATIO = 1e-6
LR_TARGET_RATIO = 1e-3
# Log checks in a row: 3 so one odd step raises nothing; only 2 for lr-too-high, as a far too high
# lr often kills the network (no gradient left to measure) within 3 checks, and a ratio 100x the
# healthy one twice running is no accident.
LR_CHECKS = 3
LR_HIGH_CHECKS = 2
# "The loss does not go down": the interval's mean loss is not 1% below the best one before it.
LR_LOW_FLAT = 1e-2
# Tiny updates are no fault once the schedule has annealed the lr below a tenth of its peak (the
# end of a cosine or step schedule), nor once the loss has fallen below PLATEAU_PROGRESS of its
# start (SGD's steps shrink with the gradient of a loss near its minimum): the loss is flat there
# because the run converges, and "multiply the lr by 1e3" would be wrong advice.
LR_ANNEALED = 0.1
# FINDINGS.md "loss-plateau": no improvement over a window. A window of 5 log checks and at least
# 100 steps keeps minibatch noise and a slow but steady descent from looking flat.
PLATEAU_CHECKS = 5
PLATEAU_MIN_STEPS = 100
# "Improved" means the best window mean of the recent window beats the best before it by 1%.
PLATEAU_MARGIN = 0.01
# Where other monitors' findings rank among the measured causes (lower is more likely): weights
# that do not move or get no gradient first, then broken structure, then updates too large.
CONTEXT_RANKS = {
    "lr-too-low": 0,
    "vanishing-grad": 2,
    "dead-units": 3,
    "zero-params": 3,
    "unused-params": 3,
    "detached-params": 3,
    "lr-too-high": 5,
    "exploding-grad": 6,
}
_OTHER_RANK = 7
# A loss already below half its starting value has learned: flat from there on is convergence
# (or the noise floor of the data), which must not raise a warning on a healthy run.
PLATEAU_PROGRESS = 0.5
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


@dataclass(frozen=True)
class Cause:
    """One measured reason for a flat loss.

    Attributes:
        rank (`int`): lower is more likely (the order of ``CONTEXT_RANKS``).
        code (`str`): the finding code the cause stands for.
        text (`str`): what was measured, with names and numbers.
        params (`tuple[str, ...]`): the parameters or modules involved.
        fix (`str`): what to change.
    """

    rank: int
    code: str
    text: str
    params: tuple[str, ...] = ()
    fix: str = ""


def listing(items: Sequence[tuple[str, float]], limit: int = 4) -> str:
    """Names with their values, the first ``limit`` of them, and how many more (for messages)."""
    text = ", ".join(f"`{name}` {value:.2g}" for name, value in items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _factor(median: float) -> float:
    """The power of ten that brings ``median`` nearest to ``LR_TARGET_RATIO``."""
    return 10.0 ** round(math.log10(LR_TARGET_RATIO / median))


class UpdateSize:
    """Judges the update-to-weight ratios of each log step: lr-too-high and lr-too-low."""

    def __init__(self) -> None:
        self.median: float | None = None  # of the last log step, None when nothing was measured
        self._ratios: dict[str, float] = {}
        self._best = math.inf  # best interval mean loss so far
        self._lrs: deque[float | None] = deque(maxlen=LR_CHECKS)
        self._peak_lr = 0.0
        self._first: float | None = None  # the first interval's mean loss
        self._streak = {"lr-too-high": 0, "lr-too-low": 0}
        self._reported: set[str] = set()

    def judge(
        self, step: int, ratios: dict[str, float], losses: Sequence[float], lr: float | None
    ) -> list[Finding]:
        """Judge one log step's ratios; findings are new ones only.

        Args:
            step (`int`): the global step of the check.
            ratios (`dict[str, float]`): ``||dw|| / ||w||`` by weight name, of weights that got
                a gradient and an update (a skipped step or a frozen group measures nothing).
            losses (`Sequence[float]`): the interval's per-step losses.
            lr (`float`, *optional*): the current learning rate.

        Returns:
            `list[Finding]`: at most one lr-too-high and one lr-too-low finding per run.
        """
        finite = [v for v in losses if math.isfinite(v)]
        # the run's first loss is the reference of the first check: a loss that rose from the
        # start (divergence) is not a descent
        best_before = finite[0] if finite and self._best == math.inf else self._best
        loss = sum(finite) / len(finite) if finite else math.nan
        self._best = min(best_before, loss) if finite else self._best
        if self._first is None and finite:
            self._first = loss
        # no new best interval loss (by LR_LOW_FLAT): the loss does not go down, or diverges
        stalled = not loss < best_before - LR_LOW_FLAT * abs(best_before)
        self._ratios = ratios
        self.median = statistics.median(ratios.values()) if ratios else None
        if self.median is None:
            return []
        # tiny updates while the lr still rises are a warm-up, not a fault
        warming = lr is not None and any(old is not None and old < lr for old in self._lrs)
        self._lrs.append(lr)
        # ... nor once the schedule has annealed it, or the loss has converged (LR_ANNEALED)
        annealed = lr is not None and lr < LR_ANNEALED * self._peak_lr
        self._peak_lr = max(self._peak_lr, lr or 0.0)
        first = self._first
        converged = first is not None and first > 0 and self._best < PLATEAU_PROGRESS * first
        low = self.median < LR_LOW_RATIO and not (warming or annealed or converged)
        found = []
        for code, hit, checks in (
            ("lr-too-high", self.median > LR_HIGH_RATIO, LR_HIGH_CHECKS),
            ("lr-too-low", low, LR_CHECKS),
        ):
            self._streak[code] = self._streak[code] + 1 if hit else 0
            # either is a fault only while the loss does not go down: large updates that still
            # make fast progress, or tiny ones in a steady descent, are left alone
            if self._streak[code] >= checks and code not in self._reported and stalled:
                self._reported.add(code)
                found.append(self._finding(code, step, checks, lr))
        return found

    def _off(self, high: bool) -> list[tuple[str, float]]:
        """The weights beyond the bound, worst first."""
        if high:
            return sorted(((n, r) for n, r in self._ratios.items() if r > LR_HIGH_RATIO), key=lambda t: -t[1])
        return sorted(((n, r) for n, r in self._ratios.items() if r < LR_LOW_RATIO), key=lambda t: t[1])

    def _finding(self, code: str, step: int, checks: int, lr: float | None) -> Finding:
        high, median = code == "lr-too-high", self.median
        assert median is not None  # invariant: judged only with a median
        off, factor = self._off(high), _factor(median)
        at_lr = f", lr {lr:.3g}" if lr is not None else ""
        bound = f"above {LR_HIGH_RATIO:g}" if high else f"below {LR_LOW_RATIO:g}"
        effect = (
            "Each update rewrites a large part of the weights, so training oscillates or diverges."
            if high
            else "The weights barely move and the loss is flat."
        )
        target = f" (from {lr:.3g} to about {lr * factor:.1g})" if lr is not None else ""
        return Finding(
            code=code,
            severity="warning",
            message=(
                f"The median update-to-weight ratio ||dw||/||w|| over {len(self._ratios)} weights was "
                f"{median:.2g} at {checks} log checks in a row (last at step {step}{at_lr}); {bound}, a "
                f"healthy ratio is about {LR_TARGET_RATIO:g}. "
                + (f"Most off: {listing(off)}. " if off else "")
                + effect
            ),
            params=tuple(name for name, _ in off),
            step=step,
            suggestion=f"Multiply the learning rate by about {factor:.0e}{target} so the ratio nears "
            f"{LR_TARGET_RATIO:g}" + ("; add warm-up or gradient clipping." if high else "."),
        )

    def causes(self, lr: float | None) -> list[Cause]:
        """The update size of the last log step as a cause of a flat loss, if it is one."""
        median = self.median
        if median is None or LR_LOW_RATIO <= median <= LR_HIGH_RATIO:
            return []
        high = median > LR_HIGH_RATIO
        at_lr = f" at lr {lr:.3g}" if lr is not None else ""
        text = f"median update-to-weight ratio {median:.2g}{at_lr}, healthy ~{LR_TARGET_RATIO:g}"
        fix = f"Multiply the learning rate by about {_factor(median):.0e}."
        code = "lr-too-high" if high else "lr-too-low"
        return [Cause(CONTEXT_RANKS[code], code, text, tuple(n for n, _ in self._off(high)), fix)]


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
        # the trend: check means, and the variance of each mean measured from its steps' losses
        self._means: deque[float] = deque(maxlen=PLATEAU_HISTORY * self.window)
        self._variances: deque[float] = deque(maxlen=4 * self.window)
        self.summary = ""

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
            `Finding`: one warning naming the causes, most likely first.
        """
        fresh = {c.code for c in causes} | {"loss-plateau"}
        seen: set[tuple[str, tuple[str, ...]]] = set()
        earlier = []
        for f in context:  # a fresh measurement of the same code supersedes an older finding
            if f.severity == "info" or f.code in fresh or (f.code, f.params) in seen:
                continue
            seen.add((f.code, f.params))
            text = f"(step {f.step}) " + (f.message if len(f.message) <= 200 else f.message[:197] + "...")
            earlier.append(
                Cause(CONTEXT_RANKS.get(f.code, _OTHER_RANK), f.code, text, f.params, f.suggestion)
            )
        # sorted() is stable: equal ranks keep the order they were measured or reported in
        ranked = sorted([*causes, *earlier], key=lambda c: c.rank)
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
