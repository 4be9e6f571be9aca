"""A loss that never left the constant-prediction level (``no-learning``).

``baseline.py`` gives the loss of the best constant prediction on the run's own targets. A model
whose train loss stays near or above it after a warm-up has learned nothing its inputs tell: the
inputs and labels no longer correspond, the loss compares the wrong things (broadcasting), or the
updates are of the wrong size. The loss may still drift a little (noise, memorising a few samples),
which is why the rule compares with the baseline and not only with the loss's own past, as the
plateau rule does. Host side only, once per log check.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence

from safeloop.diagnostics.baseline import Baseline
from safeloop.diagnostics.plateau import PLATEAU_CHECKS
from safeloop.diagnostics.updates import Cause, rank_causes
from safeloop.results import Finding

__all__ = ["NoLearning", "NO_LEARNING_NEAR", "NO_LEARNING_DRIFT", "NO_LEARNING_LEFT", "NO_LEARNING_CHECKS"]

# "Near" the baseline: the loss recovers less than 5% of it. A real task's loss leaves that band
# within its first hundreds of steps; a shuffled-label run memorises a few % over as many.
NO_LEARNING_NEAR = 0.05
# ... and still descending by at least 1% of the baseline per window (the plateau's window, 100+
# steps) is a hard task learning slowly, not a failure: only a slower drift counts as none.
NO_LEARNING_DRIFT = 0.01
# The loss must never have been below 90% of the baseline (mean of a few log checks) since the
# start: one that was learned something, whatever it does after.
NO_LEARNING_LEFT = 0.1
# Log checks in a row both must hold, so one noisy window raises nothing.
NO_LEARNING_CHECKS = 2


class NoLearning:
    """Decides, once per log check, whether the train loss stays at the constant-prediction level.

    The first window of log checks is a warm-up; from the second on, the mean loss of the last
    window is compared with the baseline and with the window before it.

    Args:
        window (`int`): log checks per window (the plateau's: at least 5 checks and 100 steps).
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.baseline: Baseline | None = None
        self._means: deque[float] = deque(maxlen=2 * self.window)
        self._lrs: deque[float] = deque(maxlen=self.window)
        self._streak = 0
        self._reported = False
        self._evals: list[float] = []
        self.summary = ""
        self.level = math.nan
        self.recent = math.nan  # the mean train loss of the last few log checks
        self._lowest = math.inf  # the lowest such mean since the start (or the restored state)

    @property
    def warmed(self) -> bool:
        """Whether a window of log checks has passed since the start (or the restored state)."""
        return len(self._means) >= self.window

    def restart(self) -> None:
        """Start over from the restored state (after a rollback): the abandoned branch is no history."""
        self._means.clear()
        self._lrs.clear()
        self._evals.clear()
        self._streak = 0
        self.recent = math.nan
        self._lowest = math.inf

    def update(self, step: int, losses: Sequence[float], lr: float | None = None) -> bool:
        """Add one log check's per-step losses; True the first time the rule holds.

        Args:
            step (`int`): the global step of the check.
            losses (`Sequence[float]`): the interval's per-step losses (non-finite ones ignored).
            lr (`float`, *optional*): the learning rate now; no verdict while it still rises over
                the window (a warm-up, whose first steps barely move the loss).
        """
        rising = lr is not None and any(old < lr for old in self._lrs)
        if lr is not None:
            self._lrs.append(lr)
        finite = [v for v in losses if math.isfinite(v)]
        if finite:
            self._means.append(statistics.fmean(finite))
            self.recent = statistics.fmean(list(self._means)[-PLATEAU_CHECKS:])
            if len(self._means) >= PLATEAU_CHECKS:
                self._lowest = min(self._lowest, self.recent)
        baseline = self.baseline
        if baseline is None or not baseline.value > 0 or not math.isfinite(baseline.value):
            return False  # a single class, or one repeated target: label-distribution says so
        if self._reported or len(self._means) < 2 * self.window:
            return False
        means = list(self._means)
        before = statistics.fmean(means[: self.window])
        last = statistics.fmean(means[self.window :])
        descent = (before - last) / baseline.value
        # "never left": a loss that went well below the baseline and came back learned, then
        # lost it (an oscillating or diverging rate, named by lr-too-high)
        near = (
            last >= (1 - NO_LEARNING_NEAR) * baseline.value
            and self._lowest >= (1 - NO_LEARNING_LEFT) * baseline.value
        )
        self._streak = self._streak + 1 if near and descent < NO_LEARNING_DRIFT and not rising else 0
        if self._streak < NO_LEARNING_CHECKS:
            return False
        self._reported = True
        self.level = last
        steps = len(means) // 2
        moved = f"fell by {descent:.2%} of it" if descent > 0 else f"rose by {-descent:.2%} of it"
        self.summary = (
            f"the train loss averaged {last:.4g} over the last {steps} log checks, "
            f"{last / baseline.value:.1%} of the baseline loss {baseline.value:.4g} that a constant "
            f"prediction reaches ({baseline.how}, measured on {baseline.samples} targets), and "
            f"{moved} since the {steps} checks before (step {step})"
        )
        return True

    def update_eval(self, step: int, eval_loss: float) -> bool:
        """Add one evaluation; True the first time the eval loss never left the baseline.

        Evaluations count from the end of the warm-up (a window of log checks); the rule holds
        when the best of at least ``NO_LEARNING_CHECKS`` of them is still near or above the
        baseline. The best, not the last: a healthy run that overfits late (an eval loss rising
        past the baseline while its accuracy is fine) had a low eval loss before.
        """
        baseline = self.baseline
        if baseline is None or not baseline.value > 0 or not math.isfinite(eval_loss):
            return False
        if self._reported or len(self._means) < self.window:
            return False
        self._evals.append(eval_loss)
        best = min(self._evals)
        if len(self._evals) < NO_LEARNING_CHECKS or best < (1 - NO_LEARNING_NEAR) * baseline.value:
            return False
        self._reported = True
        train = self.recent
        memorised = (
            f", while the train loss is {train:.4g} ({train / baseline.value:.1%}): what the model "
            "learns on its training samples does not carry over"
            if train < (1 - NO_LEARNING_NEAR) * baseline.value
            else ""
        )
        self.summary = (
            f"the eval loss stayed at {best:.4g} or above over {len(self._evals)} evaluations (last "
            f"{eval_loss:.4g} at step {step}), {best / baseline.value:.1%} of the baseline loss "
            f"{baseline.value:.4g} that a constant prediction reaches ({baseline.how}, measured on "
            f"{baseline.samples} targets){memorised}"
        )
        return True

    def finding(
        self,
        step: int,
        causes: Sequence[Cause],
        context: Sequence[Finding],
        *,
        eval_loss: float | None = None,
    ) -> Finding:
        """The ``no-learning`` warning, with the measured causes ranked.

        Args:
            step (`int`): the global step of the check.
            causes (`Sequence[Cause]`): causes measured at this check (update sizes, missing or
                vanishing gradients).
            context (`Sequence[Finding]`): the run's findings so far (loss broadcasting, label
                distribution, an oscillating learning rate ... join the causes).
            eval_loss (`float`, *optional*): the last evaluation loss, quoted against the baseline.
        """
        baseline = self.baseline
        assert baseline is not None  # invariant: found only with a baseline
        ranked = rank_causes(causes, context, own="no-learning")
        evaluated = ""
        if eval_loss is not None and math.isfinite(eval_loss):
            evaluated = (
                f"; the last eval loss is {eval_loss:.4g} ({eval_loss / baseline.value:.1%} of the baseline)"
            )
        head = (
            f"At step {step}, {self.summary}{evaluated}: the model has learned nothing that a "
            "constant prediction (the label frequencies, the target mean) does not give"
        )
        if ranked:
            listed = "; ".join(f"{i}) {c.code}: {c.text}" for i, c in enumerate(ranked, 1))
            message = f"{head}. Measured causes, most likely first: {listed}."
            suggestion = ranked[0].fix
            params = ranked[0].params
        else:
            message = (
                f"{head}. Gradients reach the layers and updates are of a normal size, so the "
                "inputs most likely do not predict the targets: inputs and labels shuffled or "
                "joined apart, a wrong label column, or a loss comparing predictions with the wrong "
                "targets (a broadcast: outputs `[B, 1]` against targets `[B]`)."
            )
            suggestion = (
                "Print a few (input, target) pairs from the dataloader and check they belong "
                "together; check `outputs.shape == targets.shape` for regression losses; then try to "
                "overfit one small batch: a model that cannot is wired wrong."
            )
            params = ()
        return Finding("no-learning", "warning", message, params, step, suggestion)
