"""Updates of the wrong size for the weights (lr-too-high, lr-too-low), and the causes of a flat loss.

Host side only. ``GradientStats`` (gradient_stats.py) measures on the device each weight's
update-to-weight ratio ``||dw|| / ||w||`` at log steps; ``UpdateSize`` judges those ratios
against the loss. ``Cause`` is one measured reason for a flat loss, ranked by ``CONTEXT_RANKS``
in the plateau finding.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from safeloop.results import Finding

__all__ = [
    "Cause",
    "UpdateSize",
    "listing",
    "rank_causes",
    "CONTEXT_RANKS",
    "OTHER_RANK",
    "CONVERGED",
    "LR_HIGH_RATIO",
    "LR_LOW_RATIO",
    "LR_TARGET_RATIO",
    "LR_CHECKS",
    "LR_HIGH_CHECKS",
    "LR_LOW_FLAT",
    "LR_ANNEALED",
    "LR_DECAYED",
]

# "lr-too-high" / "lr-too-low" bounds on ||dw|| / ||w|| (median over the weights), and
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
# end of a cosine or step schedule), nor once the loss has fallen below CONVERGED of its
# start (SGD's steps shrink with the gradient of a loss near its minimum): the loss is flat there
# because the run converges, and "multiply the lr by 1e3" would be wrong advice.
LR_ANNEALED = 0.1
# ... but a schedule that has cut the lr below LR_DECAYED of its peak for DECAYED_CHECKS log
# checks while at least DECAYED_AHEAD of the planned steps are still to come has annealed too
# early: an epoch schedule (StepLR(step_size=30)) stepped per optimizer step. Cosine restarts dip
# below it only for the last ~1% of a cycle.
LR_DECAYED = 1e-4
DECAYED_AHEAD = 0.25
DECAYED_CHECKS = 5
# Where other monitors' findings rank among the measured causes (lower is more likely): weights
# that do not move or get no gradient first, then broken structure, then updates too large.
CONTEXT_RANKS = {
    "loss-broadcast": -1,  # the loss itself cannot go below the baseline: certain, so first
    "lr-too-low": 0,
    "label-distribution": 1,
    "vanishing-grad": 2,
    "dead-units": 3,
    "zero-params": 3,
    "unused-params": 3,
    "detached-params": 3,
    "lr-too-high": 5,
    "exploding-grad": 6,
}
OTHER_RANK = 7
# A loss already below half its starting value has learned: flat from there on is convergence
# (or the noise floor of the data), which must not raise a warning on a healthy run.
CONVERGED = 0.5


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


def rank_causes(causes: Sequence[Cause], context: Sequence[Finding], *, own: str) -> list[Cause]:
    """The measured causes and the run's earlier findings, most likely first.

    Args:
        causes (`Sequence[Cause]`): causes measured now, in any order.
        context (`Sequence[Finding]`): findings reported so far; those of a code not measured now
            join the causes (``info`` ones and the ``own`` code do not).
        own (`str`): the code of the finding being ranked (its earlier reports are no cause).

    Returns:
        `list[Cause]`: by ``CONTEXT_RANKS`` (others ``OTHER_RANK``); equal ranks in the order given.
    """
    fresh = {c.code for c in causes} | {own, "loss-plateau", "no-learning"}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    earlier = []
    for f in context:  # a fresh measurement of the same code supersedes an older finding
        if f.severity == "info" or f.code in fresh or (f.code, f.params) in seen:
            continue
        seen.add((f.code, f.params))
        text = f"(step {f.step}) " + (f.message if len(f.message) <= 200 else f.message[:197] + "...")
        earlier.append(Cause(CONTEXT_RANKS.get(f.code, OTHER_RANK), f.code, text, f.params, f.suggestion))
    # sorted() is stable: equal ranks keep the order they were measured or reported in
    return sorted([*causes, *earlier], key=lambda c: c.rank)


def find_lr_hint(lr: float | None, *, too_high: bool) -> str:
    """The ``find_lr`` call that sweeps around ``lr`` in the direction a finding points to.

    Args:
        lr (`float`, *optional*): the learning rate the finding saw (None: not known).
        too_high (`bool`): the rate looks too high (sweep mostly below it), else too low.
    """
    if lr is None or not math.isfinite(lr) or lr <= 0:
        return "`trainer.find_lr()` (a learning-rate range test) measures the rate that trains"
    low, high = (lr / 1e4, lr * 10) if too_high else (lr / 10, lr * 1e4)
    return (
        f"`trainer.find_lr(min_lr={low:.0e}, max_lr={high:.0e})` (a learning-rate range test, "
        "before `fit()`) measures the rate that trains"
    )


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
        self._streak = {"lr-too-high": 0, "lr-too-low": 0, "decayed": 0}
        self._reported: set[str] = set()
        self.planned: int | None = None  # optimizer steps the run will take (None: unknown)
        self.steps_per_epoch: int | None = None

    def restart(self) -> None:
        """Start over from the restored state (after a rollback): its losses and streaks only."""
        self._best = math.inf
        self._first = None
        self._lrs.clear()
        self._streak = {code: 0 for code in self._streak}

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
        converged = first is not None and first > 0 and self._best < CONVERGED * first
        low = self.median < LR_LOW_RATIO and not (warming or annealed or converged)
        found = []
        early = self.planned is not None and step <= (1 - DECAYED_AHEAD) * self.planned
        # whether or not the loss fell before: the rest of the run cannot move the weights
        decayed = lr is not None and lr < LR_DECAYED * self._peak_lr and early
        # not by `stalled`: at an lr ~0 the noise of the minibatch losses still sets new bests
        self._streak["decayed"] = self._streak["decayed"] + 1 if decayed else 0
        if self._streak["decayed"] >= DECAYED_CHECKS and "lr-too-low" not in self._reported:
            self._reported.add("lr-too-low")
            assert lr is not None  # invariant: decayed needs it
            found.append(self._decayed(step, lr))
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
        if median == 0.0:
            return self._unmoved(step, checks, lr)
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
            f"{LR_TARGET_RATIO:g}"
            + ("; add warm-up or gradient clipping" if high else "")
            + f"; {find_lr_hint(lr, too_high=high)}.",
        )

    def _decayed(self, step: int, lr: float) -> Finding:
        """lr-too-low when the schedule annealed the lr long before the end of the run."""
        peak = self._peak_lr
        per_epoch = self.steps_per_epoch
        epochs = f" ({step / per_epoch:.1f} epochs of {per_epoch} steps)" if per_epoch else ""
        example = f"`step_size=30 * {per_epoch}`" if per_epoch else "`step_size=30 * steps_per_epoch`"
        return Finding(
            code="lr-too-low",
            severity="warning",
            message=(
                f"The learning rate is {lr:.2g} at step {step}{epochs}, {lr / peak:.0e} of its peak "
                f"{peak:.3g}, with {self.planned - step} of the {self.planned} planned steps still to "  # type: ignore[operator]
                f"come, for {DECAYED_CHECKS} log checks in a row: the scheduler "
                "annealed the learning rate long before the end, and the weights barely move. The "
                "scheduler is stepped once per optimizer step; a schedule written in epochs "
                "(`StepLR(step_size=30)`, `MultiStepLR(milestones=[30, 60])`, `ExponentialLR(gamma=0.95)`) "
                f"then decays {per_epoch or 'steps-per-epoch'} times too fast."
            ),
            step=step,
            suggestion=(
                f"Give the scheduler its sizes in optimizer steps, e.g. {example}, or a schedule over "
                "the whole run (`CosineAnnealingLR(optimizer, T_max=total_steps)`); step an epoch-based "
                "scheduler yourself in a callback and pass `lr_scheduler=None`."
            ),
        )

    def _unmoved(self, step: int, checks: int, lr: float | None) -> Finding:
        """lr-too-low when no weight moved at all: every learning rate is 0."""
        at_lr = f" (lr {lr:.3g})" if lr is not None else ""
        return Finding(
            code="lr-too-low",
            severity="warning",
            message=(
                f"No weight moved at {checks} log checks in a row (last at step {step}{at_lr}): "
                f"||dw|| = 0 exactly for all {len(self._ratios)} weights that got a gradient, at "
                "updates that were applied, not skipped. Every learning rate is 0 (a param group "
                "built with `lr=0`, a scheduler whose factor is 0, a `LambdaLR` returning 0), so "
                "the loss cannot move."
            ),
            params=tuple(sorted(self._ratios)),
            step=step,
            suggestion=(
                "Give the optimizer a learning rate above 0 (about 1e-3 for Adam/AdamW, 1e-2 to "
                "1e-1 for SGD are common starts), and check the scheduler's factor at step 0; "
                f"{find_lr_hint(None, too_high=False)}."
            ),
        )

    def causes(self, lr: float | None) -> list[Cause]:
        """The update size of the last log step as a cause of a flat loss, if it is one."""
        median = self.median
        if median is None or LR_LOW_RATIO <= median <= LR_HIGH_RATIO:
            return []
        if median == 0.0:
            weights = len(self._ratios)
            text = f"no weight moved at all (||dw|| = 0 for {weights} weights): every learning rate is 0"
            fix = f"Give the optimizer a learning rate above 0; {find_lr_hint(None, too_high=False)}."
            return [Cause(CONTEXT_RANKS["lr-too-low"], "lr-too-low", text, tuple(sorted(self._ratios)), fix)]
        high = median > LR_HIGH_RATIO
        at_lr = f" at lr {lr:.3g}" if lr is not None else ""
        text = f"median update-to-weight ratio {median:.2g}{at_lr}, healthy ~{LR_TARGET_RATIO:g}"
        fix = f"Multiply the learning rate by about {_factor(median):.0e}; {find_lr_hint(lr, too_high=high)}."
        code = "lr-too-high" if high else "lr-too-low"
        return [Cause(CONTEXT_RANKS[code], code, text, tuple(n for n, _ in self._off(high)), fix)]
