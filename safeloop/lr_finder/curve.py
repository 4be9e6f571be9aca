"""The range test's curve: the learning rates swept, the smoothing, the suggestion rules, the verdicts.

Pure functions of host floats. The slope is always taken against log10 of the learning rate (the
axis the sweep is even in), never against the learning rate itself, which would weigh the last
points of the sweep a thousand times more than the first ones.

The rules, each on the smoothed loss after its first 10% of points (where the debiased average
still moves with every point):

- ``minimum`` (the default): a tenth of the learning rate at which the smoothed loss is lowest.
  Measured on four problems against a grid of trained learning rates (docs/lr-finder.md), it is
  the rule that landed among the good rates on all of them.
- ``steepest``: where the loss falls fastest per decade of learning rate (Lightning's rule).
- ``valley``: halfway down the longest stretch over which the smoothed loss keeps falling (its
  longest decreasing subsequence; fastai's idea). On short sweeps the stretch starts in the flat
  part of the curve and the rule lands too low; kept for comparison.

A verdict replaces the suggestion when the curve cannot support one: the loss did not respond to
the learning rate (it fell less than 2% from where it started, or it never went below 98% of the
loss of the best constant prediction and fell by less than the noise), the fall is within the
noise of a sweep that ran to its end without a blow-up, or the sweep stopped before the loss went
down. A sweep that ended in a blow-up (cut short, or its smoothed loss rose 10% above its start
after the minimum) did respond to the rate; when its fall is within the noise the suggestion says
that it rests on where the loss blew up.
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "log_spaced",
    "DebiasedEma",
    "RULES",
    "DEFAULT_RULE",
    "suggest",
    "Verdict",
    "Fall",
    "judge",
    "SIGNIFICANT",
]

RULES = ("minimum", "steepest", "valley")
DEFAULT_RULE = "minimum"
_EDGE = 0.1  # the share of points at the start that the slope rules skip
_MIN_POINTS = 10  # fewer finite points carry no shape
_RESPONSE = 0.02  # the least fall, as a share of the starting loss, that counts as a response
_NOISY = 0.05  # a point-to-point scatter above this share of the start can hide a small fall
# a fall of fewer standard errors than this is noise: on curves of pure noise (100 points, beta 0.9)
# the fall to the smoothed minimum exceeds 1.2 standard errors half of the time, 2.4 one time in 10
SIGNIFICANT = 2.5
_BASELINE_SHARE = 0.98  # a best loss above this share of the baseline learned nothing beyond it
_RISE = 0.1  # a smoothed loss this share above the start, after the minimum, is a blow-up


def log_spaced(min_lr: float, max_lr: float, num_steps: int) -> list[float]:
    """``num_steps`` learning rates evenly spaced in log, from ``min_lr`` to ``max_lr`` exactly."""
    ratio = math.log(max_lr / min_lr)
    lrs = [min_lr * math.exp(ratio * i / (num_steps - 1)) for i in range(num_steps)]
    lrs[0], lrs[-1] = min_lr, max_lr
    return lrs


class DebiasedEma:
    """An exponential moving average with the start-up bias divided out (as Adam's moments).

    Args:
        beta (`float`): the weight of the past (0.9: about the last 10 points).
    """

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.average = 0.0
        self.count = 0

    def add(self, value: float) -> float:
        """Take one value; return the debiased average so far."""
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * value
        return self.average / (1 - self.beta**self.count)


def _longest_descent(values: Sequence[float]) -> tuple[int, int]:
    """First and last index of the longest strictly decreasing subsequence (patience sorting)."""
    # on the negated values the longest decreasing run is the longest increasing one
    tails: list[float] = []  # the smallest tail of an increasing run of each length
    tail_index: list[int] = []
    previous = [-1] * len(values)
    for i, value in enumerate(values):
        key = -value
        at = bisect.bisect_left(tails, key)
        if at == len(tails):
            tails.append(key)
            tail_index.append(i)
        else:
            tails[at], tail_index[at] = key, i
        previous[i] = tail_index[at - 1] if at > 0 else -1
    end = tail_index[-1]
    start = end
    while previous[start] != -1:
        start = previous[start]
    return start, end


def _slopes(x: Sequence[float], y: Sequence[float]) -> list[tuple[float, int]]:
    """Central differences of ``y`` against ``x``, with their index, skipping the first points."""
    first = _first_point(len(y))
    return [((y[i + 1] - y[i - 1]) / (x[i + 1] - x[i - 1]), i) for i in range(first, len(y) - 1)]


def _first_point(count: int) -> int:
    """The first point the rules look at: the debiased average's first 10% is still settling."""
    return max(1, int(count * _EDGE))


def suggest(lrs: Sequence[float], smoothed: Sequence[float]) -> dict[str, float | None]:
    """Every rule's learning rate for the curve (None where a rule finds nothing)."""
    out: dict[str, float | None] = dict.fromkeys(RULES)
    if len(smoothed) < 3:
        return out
    first = _first_point(len(smoothed))
    lowest = min(range(first, len(smoothed)), key=smoothed.__getitem__)
    out["minimum"] = lrs[lowest] / 10
    slopes = _slopes([math.log10(lr) for lr in lrs], smoothed)
    if slopes and min(slopes)[0] < 0:
        out["steepest"] = lrs[min(slopes)[1]]
    start, end = _longest_descent(smoothed[first:])
    if end > start:
        out["valley"] = lrs[first + start + (end - start) // 2]
    return out


@dataclass(frozen=True)
class Verdict:
    """Why a curve supports no suggestion.

    Attributes:
        code (`str`): ``"no-response"``, ``"noise"`` or ``"no-descent"``.
        message (`str`): what was measured and what to do.
    """

    code: str
    message: str


def _point_noise(raw: Sequence[float]) -> float:
    """The standard deviation of one point about its neighbours.

    Robust: from the median of the absolute successive differences, which a trend barely moves.
    """
    if len(raw) < 3:
        return 0.0
    steps = [abs(b - a) for a, b in itertools.pairwise(raw)]
    return statistics.median(steps) / (0.6745 * math.sqrt(2))


@dataclass(frozen=True)
class Fall:
    """How far the smoothed loss fell below where the sweep started, against the noise.

    Attributes:
        start (`float`): the mean raw loss of the first 10% of the points.
        lowest (`int`): the index of the smoothed minimum (after the first 10%).
        best (`float`): the smoothed minimum.
        noise (`float`): one point's scatter about its neighbours.
        error (`float`): the standard error of ``start - best``.
    """

    start: float
    lowest: int
    best: float
    noise: float
    error: float

    @property
    def significance(self) -> float:
        """The fall in standard errors."""
        fall = self.start - self.best
        return math.inf if self.error == 0 and fall > 0 else fall / self.error if self.error else 0.0

    @staticmethod
    def of(raw: Sequence[float], smoothed: Sequence[float], smoothing: float) -> Fall:
        """Measure the fall of a curve of at least 3 points."""
        n = len(raw)
        head = max(3, n // 10)
        start = statistics.fmean(raw[:head])
        lowest = min(range(_first_point(n), n), key=smoothed.__getitem__)
        noise = _point_noise(raw[: max(lowest + 1, head)])
        # the start's mean over `head` points, and the smoothed value (an exponential average's
        # variance is (1 - beta) / (1 + beta) of one point's)
        error = noise * math.sqrt(1 / head + (1 - smoothing) / (1 + smoothing))
        return Fall(start, lowest, smoothed[lowest], noise, error)


def judge(
    lrs: Sequence[float],
    raw: Sequence[float],
    smoothed: Sequence[float],
    *,
    stopped_early: bool,
    baseline: float | None,
    smoothing: float,
) -> Verdict | None:
    """The verdict on a curve that cannot support a suggestion, or None when it can.

    Args:
        lrs (`Sequence[float]`): the learning rates of the finite points.
        raw (`Sequence[float]`): their losses.
        smoothed (`Sequence[float]`): the debiased average.
        stopped_early (`bool`): the sweep ended before ``max_lr`` (the loss blew up). A smoothed
            loss that rose 10% above its start after its minimum counts as a blow-up too.
        baseline (`float`, *optional*): the loss of the best constant prediction, when known.
        smoothing (`float`): the moving average's beta (the smoothed value's standard error).
    """
    n = len(raw)
    if n < _MIN_POINTS:
        last = f"{lrs[-1]:.3g}" if lrs else "the first step"
        return Verdict(
            "no-descent",
            f"the sweep stopped after {n} finite points (at lr {last}), too few for a curve: the loss "
            f"blew up almost at once. Lower `min_lr` (try {lrs[0] / 1000 if lrs else 1e-9:.3g}) and look at "
            "the findings of a short `fit()` first",
        )
    measured = Fall.of(raw, smoothed, smoothing)
    start, lowest, best, noise, error = (
        measured.start, measured.lowest, measured.best, measured.noise, measured.error
    )  # fmt: skip
    fall = start - best
    scale = abs(start) if start else 1.0
    sweep = f"over {lrs[0]:.3g}..{lrs[-1]:.3g}"
    # The loss blew up when the sweep was cut short, or when it rose clearly above its start after
    # its minimum (without reaching `stop_factor`): either way it responded to the rate, and the
    # rate just below the blow-up is what the suggestion reads.
    rise = max(smoothed[lowest:]) - start
    blew_up = stopped_early or rise > max(_RISE * scale, SIGNIFICANT * error)
    # a blown-up sweep may not have had the steps to get below the constant prediction on
    # average: there, no single step may have got below it either
    never_below = min(raw) if blew_up else best
    if (
        baseline is not None
        and never_below >= _BASELINE_SHARE * baseline
        and measured.significance < SIGNIFICANT
    ):
        return Verdict(
            "no-response",
            f"the loss does not respond to the learning rate: its best smoothed value {best:.4g} (at lr "
            f"{lrs[lowest]:.3g}, from {start:.4g} at the start) never went below the loss of the best "
            f"constant prediction ({baseline:.4g}, the targets' own statistics) {sweep}: the model learned "
            "nothing from its inputs at any rate. Look at the findings first (`fit()` with "
            "`diagnostics=True` names unused or detached layers, all-zero weights, labels that do not "
            "match the inputs); a model that needs many steps to get past that level needs a longer "
            "sweep (`num_steps`)",
        )
    if fall < _RESPONSE * scale and not blew_up:
        if noise > _NOISY * scale:
            return Verdict(
                "noise",
                f"the curve is noise only: the loss scatters by {noise:.3g} per step and its smoothed "
                f"value fell {fall:.3g} (from {start:.4g}) {sweep}. Sweep with larger batches (gradient "
                "accumulation) or more steps (`num_steps`), and look at the findings first",
            )
        return Verdict(
            "no-response",
            f"the loss does not respond to the learning rate: it fell {max(fall, 0.0) / scale:.1%} (from "
            f"{start:.4g} to {best:.4g}) {sweep}. A model whose gradients do not reach its weights "
            "(detached layers, `torch.no_grad`, all-zero weights) or a loss that does not depend on them "
            "trains at no learning rate: look at the findings first (`fit()` with `diagnostics=True`)",
        )
    if fall < SIGNIFICANT * error and not blew_up:
        # (a sweep that ended in a blow-up did respond to the rate: its minimum is where the loss
        # last held before it, and the suggestion stands on that)
        return Verdict(
            "noise",
            f"the curve is noise only: the loss scatters by {noise:.3g} per step and its smoothed value "
            f"fell {fall:.3g} below the start ({start:.4g}), {fall / error:.1f} standard errors. Sweep "
            "with larger batches (gradient accumulation) or more steps (`num_steps`)",
        )
    if lowest <= _first_point(n) + 1 and blew_up:
        return Verdict(
            "no-descent",
            f"the sweep stopped before the loss went down: the lowest smoothed loss is at lr "
            f"{lrs[lowest]:.3g}, at the start of the sweep, and the loss blew up by lr {lrs[-1]:.3g}. "
            f"Start lower: `min_lr={lrs[0] / 100:.3g}`",
        )
    return None
