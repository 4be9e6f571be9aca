"""Loss-spike detection: a loss far above its running statistics, for several steps in a row.

Fed with the per-step losses and gradient norms that the trainer reads on the host at each log
step anyway (one transfer per ``log_every`` steps, means over processes, so every process decides
the same), it costs no device sync. The statistics are exponential moving averages of the loss
and of its squared deviation, updated only with steps that are not part of a suspected spike, so
that a spike cannot raise the bar it is measured against.

Detection delay: a spike that starts at step ``s`` is confirmed at step ``s + patience - 1`` and
read at the first log step at or after that: at most ``patience + log_every - 2`` steps after ``s``
(11 with the defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SpikeDetector", "Spike", "Divergence", "DEFAULT_ZSCORE", "DEFAULT_PATIENCE", "DEFAULT_WARMUP"]

# Six deviations: a Gaussian loss noise exceeds it once in ~1e9 steps, and three steps in a row
# filter the heavy tails of small-batch losses; a real divergence stays high far longer.
DEFAULT_ZSCORE = 6.0
DEFAULT_PATIENCE = 3
# The first steps fall fast and their statistics mean little (OLMo-core, ZClip warm up likewise).
DEFAULT_WARMUP = 20
_BETA = 0.95  # EMA memory of ~20 steps: follows the loss's downward trend, forgets old noise
_MIN_REL_STD = 1e-3  # a near-constant loss would make any wiggle an "infinite" z-score


@dataclass(frozen=True)
class Spike:
    """A confirmed loss spike.

    Attributes:
        start_step (`int`): the first step of the run above the threshold.
        step (`int`): the step at which it was confirmed.
        loss (`float`): the highest loss of the run.
        mean (`float`): the running mean of the loss before it.
        std (`float`): the running standard deviation before it.
        zscore (`float`): ``(loss - mean) / std``.
        grad_norm_ratio (`float`): the run's largest gradient norm over its running mean
            (NaN when unknown).
    """

    start_step: int
    step: int
    loss: float
    mean: float
    std: float
    zscore: float
    grad_norm_ratio: float

    def describe(self) -> str:
        """One line: the numbers of the spike."""
        grad = (
            ""
            if math.isnan(self.grad_norm_ratio)
            else f", gradient norm {self.grad_norm_ratio:.3g}x its mean"
        )
        return (
            f"loss {self.loss:.4g} at steps {self.start_step}-{self.step} against a running mean of "
            f"{self.mean:.4g} ± {self.std:.3g} (z = {self.zscore:.1f}){grad}"
        )


@dataclass(frozen=True)
class Divergence:
    """A divergence every process found at the same step boundary: the loop decides what follows.

    Attributes:
        reason (`str`): ``"loss-spike"`` or ``"nonfinite"`` (a run of skipped steps).
        start_step (`int`): the first step of the anomaly.
        step (`int`): the step at which it was detected (the data up to here was consumed).
        description (`str`): the measured numbers, for events and messages.
        detail (`dict`): JSON numbers for the rollback event.
    """

    reason: str
    start_step: int
    step: int
    description: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.reason} at step {self.step}: {self.description}"


class SpikeDetector:
    """Watches the loss for sustained spikes.

    Args:
        zscore (`float`): how many running standard deviations above the running mean a loss
            must be to count as spiking.
        patience (`int`): consecutive spiking steps that confirm a spike.
        warmup (`int`): steps observed before any spike can be declared.
    """

    def __init__(
        self, zscore: float = DEFAULT_ZSCORE, patience: int = DEFAULT_PATIENCE, warmup: int = DEFAULT_WARMUP
    ) -> None:
        self.zscore = zscore
        self.patience = patience
        self.warmup = warmup
        self.seen = 0
        self.mean = 0.0
        self.var = 0.0
        self.grad_mean = 0.0
        self._run: list[tuple[int, float, float]] = []  # (step, loss, grad norm) above threshold

    @property
    def suspicious(self) -> bool:
        """Whether a spike may be under way (a checkpoint written now is not known healthy)."""
        return bool(self._run)

    @property
    def run_start(self) -> int | None:
        """The first step of the suspected spike, if any."""
        return self._run[0][0] if self._run else None

    def update(self, step: int, loss: float, grad_norm: float = math.nan) -> Spike | None:
        """Take one step's loss; return a `Spike` when one is confirmed at this step.

        Non-finite losses are the NaN guard's business and are ignored here.
        """
        if not math.isfinite(loss):
            return None
        if self.seen >= self.warmup:
            std = max(math.sqrt(self.var), abs(self.mean) * _MIN_REL_STD, 1e-12)
            if (loss - self.mean) / std > self.zscore:
                self._run.append((step, loss, grad_norm))
                if len(self._run) >= self.patience:
                    return self._confirm(step, std)
                return None
        self._run = []  # below the threshold: a short excursion is forgotten, not learnt from
        self._learn(loss, grad_norm)
        return None

    def _learn(self, loss: float, grad_norm: float) -> None:
        if self.seen == 0:
            self.mean, self.var = loss, 0.0
            self.grad_mean = grad_norm if math.isfinite(grad_norm) else 0.0
        else:
            delta = loss - self.mean
            self.mean += (1 - _BETA) * delta
            self.var = _BETA * (self.var + (1 - _BETA) * delta * delta)
            if math.isfinite(grad_norm):
                self.grad_mean = _BETA * self.grad_mean + (1 - _BETA) * grad_norm
        self.seen += 1

    def _confirm(self, step: int, std: float) -> Spike:
        start = self._run[0][0]
        peak = max(loss for _, loss, _ in self._run)
        grads = [g for _, _, g in self._run if math.isfinite(g)]
        ratio = max(grads) / self.grad_mean if grads and self.grad_mean > 0 else math.nan
        self._run = []
        return Spike(start, step, peak, self.mean, std, (peak - self.mean) / std, ratio)

    def reset_run(self) -> None:
        """Forget a suspected spike (after a rollback restored the state before it)."""
        self._run = []

    def state_dict(self) -> dict[str, Any]:
        """JSON state, for checkpoints."""
        return {"seen": self.seen, "mean": self.mean, "var": self.var, "grad_mean": self.grad_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.seen = int(state["seen"])
        self.mean, self.var, self.grad_mean = (
            float(state["mean"]),
            float(state["var"]),
            float(state["grad_mean"]),
        )
        self._run = []
