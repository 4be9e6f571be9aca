"""Loss-spike detection: a loss far above its running statistics, for several steps in a row.

Fed with the per-step losses and gradient norms that the trainer reads on the host at each log
step anyway (one transfer per ``log_every`` steps, means over processes, so every process decides
the same), it costs no device sync. The statistics are exponential moving averages of the loss
and of its squared deviation, updated only with steps that are not part of a suspected spike, so
that a spike cannot raise the bar it is measured against.

Detection delay: a spike that starts at step ``s`` is confirmed at step ``s + patience - 1`` and
read at the first log step at or after that: at most ``patience + log_every - 2`` steps after ``s``
(11 with the defaults).

``NormTrail`` keeps the recent global gradient norms already read on the host (the log steps'
per-step values, and at a refused step the steps since the last log step) and says whether they
rose more than ``RISE_FACTOR`` times before a non-finite step or a divergence: an ``Explosion``,
reported as ``exploding-grad`` ahead of the ``nonfinite-*``, ``loss-spike`` and ``lr-too-high``
findings it explains.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from safeloop.results import Finding

__all__ = [
    "SpikeDetector",
    "Spike",
    "Divergence",
    "NormTrail",
    "Explosion",
    "DEFAULT_ZSCORE",
    "DEFAULT_PATIENCE",
    "DEFAULT_WARMUP",
    "RISE_FACTOR",
    "RISE_WINDOW",
    "RISE_MIN_BASE",
    "RISE_BASE_STEPS",
    "EXPLAINED_BY_EXPLOSION",
]

# Six deviations: a Gaussian loss noise exceeds it once in ~1e9 steps, and three steps in a row
# filter the heavy tails of small-batch losses; a real divergence stays high far longer.
DEFAULT_ZSCORE = 6.0
DEFAULT_PATIENCE = 3
# The first steps fall fast and their statistics mean little (OLMo-core, ZClip warm up likewise).
DEFAULT_WARMUP = 20
_BETA = 0.95  # EMA memory of ~20 steps: follows the loss's downward trend, forgets old noise
_MIN_REL_STD = 1e-3  # a near-constant loss would make any wiggle an "infinite" z-score

# "exploding-grad" before a non-finite step or a divergence: the largest finite global norm of the
# RISE_WINDOW steps before it above RISE_FACTOR times the median of the norms before those (the
# last RISE_BASE_STEPS of them, at least RISE_MIN_BASE; a run that blows up within its first steps
# takes its first RISE_MIN_BASE norms as the baseline). An order of magnitude within a few steps:
# training noise and the fall of the first steps' norms stay well below it.
RISE_FACTOR = 10.0
RISE_WINDOW = 5
RISE_MIN_BASE = 3
RISE_BASE_STEPS = 50
# the findings an explosion explains: it is listed before them
EXPLAINED_BY_EXPLOSION = ("nonfinite-loss", "nonfinite-grad", "loss-spike", "lr-too-high")


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
        explosion (`Explosion | None`): the global gradient norms exploded before it.
    """

    reason: str
    start_step: int
    step: int
    description: str
    detail: dict[str, Any] = field(default_factory=dict)
    explosion: Explosion | None = None

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


@dataclass(frozen=True)
class Explosion:
    """Global gradient norms that rose more than ``RISE_FACTOR`` times before an anomaly.

    Attributes:
        before (`int`): the first step of the anomaly (non-finite step, run of them, loss spike).
        base_from (`int`): the first step of the baseline.
        base_to (`int`): its last step.
        median (`float`): the median norm of the baseline.
        peak_step (`int`): the step of the largest finite norm of the window.
        peak (`float`): that norm.
    """

    before: int
    base_from: int
    base_to: int
    median: float
    peak_step: int
    peak: float

    @property
    def ratio(self) -> float:
        """The peak over the baseline's median."""
        return self.peak / self.median

    def describe(self) -> str:
        """One line: the numbers of the rise."""
        base = (
            f"step {self.base_from}"
            if self.base_from == self.base_to
            else f"steps {self.base_from}-{self.base_to}"
        )
        return (
            f"the global gradient norm rose from a median of {self.median:.3g} over {base} to "
            f"{self.peak:.3g} at step {self.peak_step}, {self.ratio:.3g}x"
        )

    def detail(self) -> dict[str, Any]:
        """JSON numbers, for events."""
        return {
            "base_steps": [self.base_from, self.base_to],
            "median": self.median,
            "peak_step": self.peak_step,
            "peak": self.peak,
            "ratio": self.ratio,
        }

    def finding(self, what: str, layers: str = "", names: Sequence[str] = ()) -> Finding:
        """The ``exploding-grad`` finding of this rise.

        Args:
            what (`str`): what followed, e.g. ``"the non-finite loss of step 12"``.
            layers (`str`, *optional*): which layers' norms rose most, when measured.
            names (`Sequence[str]`, *optional*): those layers' parameter names.
        """
        return Finding(
            code="exploding-grad",
            severity="warning",
            message=(
                f"Exploding gradients before {what}: {self.describe()} (threshold "
                f"{RISE_FACTOR:.0f}x within {RISE_WINDOW} steps)" + (f"; {layers}" if layers else "") + "."
            ),
            params=tuple(names),
            step=self.peak_step,
            suggestion=(
                "Clip gradients (`clip_grad_norm=1.0`), then lower the learning rate if the norm still "
                "climbs; for recurrent nets (RNN/LSTM/GRU) clipping is the standard fix. A large "
                "initialisation (recurrent weights above 1 in scale) makes it worse."
            ),
        )


class NormTrail:
    """The recent global gradient norms read on the host, by step; says when they exploded.

    Fed with each log step's per-step norms (``observe``); the steps since the last log step are
    read only when asked about an anomaly (``unread``, set by the log step: a refused step that
    the host learnt of at the step itself, which has synchronised with the device anyway). Every
    process holds the same values (means over processes), so every process decides the same.

    Attributes:
        unread (`Callable[[], tuple[int, list[float]]] | None`): the last step done and the norms
            of the steps since the last ``observe``, oldest first (a collective: every process
            calls it together, as every anomaly is met by every process at the same step).
    """

    def __init__(self) -> None:
        self._norms: list[tuple[int, float]] = []  # finite norms, by step, oldest first
        self._observed = 0  # the last step observed
        self._reported: set[int] = set()  # peak steps of the explosions already reported
        self._layers: tuple[int, str, tuple[str, ...]] | None = None  # (check step, text, names)
        self._unnamed: list[Finding] = []  # reported before their interval's layers were measured
        self.unread: Callable[[], tuple[int, list[float]]] | None = None

    def observe(self, last_step: int, norms: Sequence[float]) -> None:
        """Take the global norms of the steps ending at ``last_step``, oldest first."""
        first = last_step - len(norms) + 1
        self._norms += [
            (first + i, v) for i, v in enumerate(norms) if first + i > self._observed and math.isfinite(v)
        ]
        self._observed = max(self._observed, last_step)
        keep = first - RISE_WINDOW - RISE_BASE_STEPS
        self._norms = [point for point in self._norms if point[0] >= keep]

    def forget_after(self, step: int) -> None:
        """Drop what was seen after ``step`` (a rollback restored it)."""
        self._norms = [point for point in self._norms if point[0] <= step]
        self._observed = min(self._observed, step)
        self._reported = {peak for peak in self._reported if peak <= step}
        self._layers, self._unnamed = None, []

    def explosion(self, first_bad: int, last: int | None = None) -> Explosion | None:
        """The rise of the norms before the anomaly starting at ``first_bad``, if above the threshold.

        Args:
            first_bad (`int`): the anomaly's first step.
            last (`int`, *optional*): the last step of the window (defaults to ``first_bad - 1``;
                a loss spike's confirming step, its own norms being part of it).
        """
        last = first_bad - 1 if last is None else last
        known = [point for point in self._known() if point[0] <= last]
        split = max(sum(1 for s, _ in known if s < first_bad - RISE_WINDOW), RISE_MIN_BASE)
        base, window = known[:split][-RISE_BASE_STEPS:], known[split:]
        if len(base) < RISE_MIN_BASE or not window:
            return None
        median = statistics.median(v for _, v in base)
        peak_step, peak = max(window, key=lambda point: point[1])
        if not median > 0 or peak <= RISE_FACTOR * median:
            return None
        return Explosion(first_bad, base[0][0], base[-1][0], median, peak_step, peak)

    def report(self, explosion: Explosion, what: str) -> Finding | None:
        """The ``exploding-grad`` finding of ``explosion``; None when one was reported for it.

        An explosion whose steps hold the peak of one already reported is the same blow-up. The
        finding names the layers measured at the log check whose interval holds the peak; made
        before that check (a refused step learnt at the step), it waits for it (``name_layers``).
        """
        if any(explosion.base_from <= peak < explosion.before for peak in self._reported):
            return None  # the same blow-up, still under way (or in its baseline): reported once
        self._reported.add(explosion.peak_step)
        if self._layers is not None and self._layers[0] >= explosion.peak_step:
            return explosion.finding(what, self._layers[1], self._layers[2])
        finding = explosion.finding(what)
        self._unnamed.append(finding)
        return finding

    def name_layers(self, step: int, text: str, names: Sequence[str]) -> list[tuple[Finding, Finding]]:
        """Take a log check's per-layer measurement; return the findings it names, as (old, new).

        Args:
            step (`int`): the log step.
            text (`str`): which layers' gradient norms rose most ("" when not measured).
            names (`Sequence[str]`): their parameter names.
        """
        self._layers = (step, text, tuple(names)) if text else None
        unnamed, self._unnamed = self._unnamed, []
        if not text:
            return []
        return [
            (old, replace(old, message=f"{old.message[:-1]}; {text}.", params=tuple(names)))
            for old in unnamed
        ]

    def _known(self) -> list[tuple[int, float]]:
        known = list(self._norms)
        if self.unread is not None:
            last, norms = self.unread()
            first = last - len(norms) + 1
            known += [
                (first + i, v) for i, v in enumerate(norms) if first + i > self._observed and math.isfinite(v)
            ]
        return known
