"""The gradient noise scale: the batch size past which larger batches stop paying (``batch-size``).

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training") define the simple noise
scale ``B_simple = tr(S) / |G|^2``: the trace of the per-sample gradient covariance over the squared
norm of the true gradient. A gradient averaged over ``B`` samples has ``E|G_B|^2 = |G|^2 + tr(S)/B``,
so squared norms measured at two batch sizes ``b < B`` give both terms without bias::

    |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b)        tr(S) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

Each is smoothed by its own moving average and the ratio is taken of the averages (a ratio of
noisy estimates is biased; the averages are not). Their model then says: at batch ``B`` training
needs ``1 + B_noise/B`` times the minimum number of steps and ``1 + B/B_noise`` times the minimum
number of samples, both 2x at the noise scale. Below it, a larger batch saves steps almost
linearly; far above it, extra samples are wasted.

Both sizes come without an extra forward or backward:

- gradient accumulation over ``k`` micro-batches: the gradient after the window's first
  micro-batch (Accelerate divides each loss by ``k``, so it is ``g_1 / k``: one micro-batch, local
  to the process under DDP) against the window's accumulated gradient (all micro-batches of all
  processes), whose norm the step measures anyway;
- DDP without accumulation: each process's gradient before the all-reduce, read in a
  communication hook (the bucket's squared norm, ``noise_probe_ddp.py``), against the reduced gradient;
- FSDP2, with or without accumulation: each process's gradient over its window, read at the
  input of the reduce-scatter (``noise_probe_fsdp.py``), against the reduced gradient;
- ``gradient_noise_scale="split"`` (one process, opt in): each batch run as two halves, the first
  half's gradient against the whole batch's (a second, half-size forward and backward, not
  bitwise equal to the unsplit step).

The per-step work stays on the device (a few small kernels); the sums of an interval are read at
the log step in the metrics' one transfer, averaged over processes (each process's small batch is
an independent sample of it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from safeloop.diagnostics.noise_split import split_halves
from safeloop.results import Finding, NoiseScaleEstimate

__all__ = [
    "NOISE_SCALE_CHOICES",
    "NoiseScaleProbe",
    "NoiseScale",
    "NoiseScaleMonitor",
    "build_monitor",
    "NoiseScaleEstimate",
    "two_sizes",
    "split_halves",
    "EMA_DECAY",
    "MIN_STEPS",
    "FAR_OFF",
]

NOISE_SCALE_CHOICES = ("auto", "split", "off")

# The moving averages forget with this factor per optimizer step (a memory of about 500 steps):
# one step's |G|^2 estimate is a difference of two noisy squared norms, and the noise scale moves
# slowly as the loss falls.
EMA_DECAY = 0.998
# Steps measured before the estimate is reported (history, findings).
MIN_STEPS = 20
# A batch this many times smaller or larger than the noise scale is a warning; closer, an info.
FAR_OFF = 10.0
# Values sent per log step: the summed small and large squared norms and the steps counted.
WIDTH = 3


def two_sizes(micro_batch: int, accumulation: int, processes: int, mode: str) -> tuple[int, int] | None:
    """The small and large batch sizes a run measures, or None when it has only one.

    Args:
        micro_batch (`int`): samples per micro-batch and process.
        accumulation (`int`): micro-batches per optimizer step.
        processes (`int`): data-parallel processes.
        mode (`str`): ``"accumulation"``, ``"ddp"``, ``"fsdp"`` or ``"split"``.
    """
    if mode == "accumulation":
        small, large = micro_batch, micro_batch * accumulation * processes
    elif mode == "ddp":
        small, large = micro_batch, micro_batch * processes
    elif mode == "fsdp":  # the whole window of one process against all processes'
        small, large = micro_batch * accumulation, micro_batch * accumulation * processes
    else:
        small, large = micro_batch // 2, micro_batch
    return (small, large) if 0 < small < large else None


class NoiseScaleProbe:
    """The device side: squared gradient norms at the two batch sizes, summed between log steps.

    Args:
        params (`Sequence[torch.nn.Parameter]`): the trainable parameters, whose ``.grad`` the
            small batch is read from (accumulation and split).
        mode (`str`): ``"accumulation"``, ``"ddp"``, ``"fsdp"`` or ``"split"``.
        accumulation (`int`): micro-batches per step (the first one's gradient is ``g_1 / k``).
        scaler (`Any`, *optional*): the fp16 ``GradScaler``: the small gradient is still scaled.
    """

    def __init__(
        self, params: Sequence[torch.nn.Parameter], mode: str, accumulation: int, scaler: Any = None
    ) -> None:
        self.params = list(params)
        self.mode = mode
        self.accumulation = accumulation
        self.scaler = scaler
        self.micro_batch: int | None = None  # learnt from the first micro-batch
        # this window's small squared norm (DDP: one per bucket; FSDP2: one per FSDP module)
        self._pieces: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._sums: torch.Tensor | None = None
        self._open = False  # inside a window of the trainer's: hooks may add pieces
        self._before = 0  # pieces when the current micro-batch started
        self._reducing = 0  # backwards of this window that communicated (hook modes)

    # -- during the window -----------------------------------------------------------------

    def see(self, batch_size: int) -> None:
        """A micro-batch of ``batch_size`` samples starts (the first of a window clears the last's)."""
        if self.micro_batch is None:
            self.micro_batch = batch_size
        if not self._sizes:  # a new window: what backwards outside the loop left (find_lr) goes
            self._pieces.clear()
            self._reducing = 0
        self._sizes.append(batch_size)
        self._open, self._before = True, len(self._pieces)

    def after_backward(self, first: bool) -> None:
        """After a micro-batch's backward: the first of a window leaves ``g_1 / k`` in ``.grad``."""
        if first and self.mode == "accumulation":
            self._pieces[:] = [self._grad_square(self.accumulation)]
        self._reducing += len(self._pieces) > self._before

    def after_first_half(self, fraction: float) -> None:
        """Split mode: the first half's backward of a loss weighted by ``fraction`` of the batch."""
        self._pieces[:] = [self._grad_square(1.0 / fraction)]
        self._sizes = [self._sizes[-1]] if self._sizes else []

    def _grad_square(self, factor: float) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:  # (sharded gradients appear only at the window's end: nothing to read)
            return torch.full((), math.nan, device=self.params[0].device if self.params else None)
        norms = torch._foreach_norm(grads)
        square = torch.stack(norms).float().square().sum() if len(norms) > 1 else norms[0].float().square()
        scale = None if self.scaler is None else getattr(self.scaler, "_scale", None)
        # the fp16 scaler has multiplied the loss; the scale only changes after the step
        return square * factor**2 if scale is None else square * (factor**2) / scale.square()

    def add_local(self, square: torch.Tensor) -> None:
        """A communication hook's squared norm of this process's gradient (one bucket or module).

        Only inside the trainer's windows: a backward of the user's own, outside ``fit``, would
        otherwise pile pieces up.
        """
        if self._open:
            self._pieces.append(square)

    def at_step(self, total_norm: torch.Tensor, ok: torch.Tensor | None) -> None:
        """The step's large-batch norm; the pair is kept when the window was regular and finite.

        Args:
            total_norm (`torch.Tensor`): the global gradient norm of the step, unscaled, before
                clipping (the large batch).
            ok (`torch.Tensor`, *optional*): 1 when the step was applied (the guard's flag, with
                the fp16 scaler's verdict), None without the guard.
        """
        pieces, sizes, reducing = list(self._pieces), self._sizes, self._reducing
        self._pieces.clear()
        self._sizes, self._open, self._reducing = [], False, 0
        hooked = self.mode in ("ddp", "fsdp")
        expected = self.accumulation if self.mode in ("accumulation", "fsdp") else 1
        # a short last window (end of the data) or a smaller last batch has other sizes; the
        # hooks' pieces must all come from one backward (the window's last, which communicates)
        if not pieces or len(sizes) != expected or any(size != self.micro_batch for size in sizes):
            return
        if hooked and reducing != 1:
            return
        small = pieces[0] if len(pieces) == 1 else torch.stack(pieces).sum()
        scale = None if self.scaler is None or not hooked else getattr(self.scaler, "_scale", None)
        if scale is not None:  # the hooks read the loss-scaled gradients; the scale changes after the step
            small = small / scale.float().square()
        values = torch.stack(
            [small.to(total_norm.device), total_norm.float().square(), torch.ones_like(small)]
        )
        good = torch.isfinite(values).all()
        if ok is not None:
            good = good & (ok.reshape(()) > 0)
        values = torch.where(good, values, torch.zeros_like(values))
        self._sums = values if self._sums is None else self._sums + values

    # -- at the log step -------------------------------------------------------------------

    def measurements(self, device: torch.device) -> torch.Tensor:
        """The interval's sums (small, large, steps), then cleared; zeros when none was kept."""
        sums, self._sums = self._sums, None
        return torch.zeros(WIDTH, device=device) if sums is None else sums

    def forget(self) -> None:
        """Drop the interval's sums (a rollback undid its steps)."""
        self._sums, self._sizes, self._open, self._reducing = None, [], False, 0
        self._pieces.clear()


class NoiseScale:
    """The host side: moving averages of ``|G|^2`` and ``tr(S)`` and the ``batch-size`` advice.

    Args:
        small (`int`): the small batch (samples).
        large (`int`): the large batch (samples), the run's batch per step in accumulation and DDP.
        batch_size (`int`): the batch per optimizer step the advice is about.
        decay (`float`, *optional*): the moving averages' factor per step.
    """

    def __init__(self, small: int, large: int, batch_size: int, decay: float = EMA_DECAY) -> None:
        self.small, self.large, self.batch_size, self.decay = small, large, batch_size, decay
        self._gradient = self._trace = self._weight = 0.0
        self.steps = 0
        self.first: float | None = None
        self.first_step: int | None = None

    def update(self, step: int, values: Sequence[float]) -> float | None:
        """Fold in an interval's sums (averaged over processes); return the estimate, or None."""
        small_sum, large_sum, count = values
        if count < 0.5:
            return self.value
        small_sq, large_sq = small_sum / count, large_sum / count
        b, big = self.small, self.large
        gradient = (big * large_sq - b * small_sq) / (big - b)
        trace = (small_sq - large_sq) / (1.0 / b - 1.0 / big)
        keep = self.decay**count
        self._gradient = keep * self._gradient + (1 - keep) * gradient
        self._trace = keep * self._trace + (1 - keep) * trace
        self._weight = keep * self._weight + (1 - keep)
        self.steps += round(count)
        value = self.value
        if value is not None and self.first is None:
            self.first, self.first_step = value, step
        return value

    @property
    def value(self) -> float | None:
        """``B_simple`` in samples, once ``MIN_STEPS`` steps were measured and both terms are positive."""
        if self.steps < MIN_STEPS or self._gradient <= 0 or self._trace <= 0:
            return None
        # the averages' start-up bias (the same weight in both) cancels in the ratio
        return self._trace / self._gradient

    def estimate(self) -> NoiseScaleEstimate | None:
        """The final estimate for ``FitResult``, or None when it never became measurable."""
        value = self.value
        if value is None:
            return None
        return NoiseScaleEstimate(
            value=value,
            samples=self.steps * self.large,
            steps=self.steps,
            batch_size=self.batch_size,
            first=self.first,
            first_step=self.first_step,
        )


class NoiseScaleMonitor:
    """A run's gradient noise scale: the probe on the device, the estimate on the host.

    Args:
        probe (`NoiseScaleProbe`): the per-step measurement.
        accumulation (`int`): micro-batches per optimizer step.
        processes (`int`): data-parallel processes.
    """

    def __init__(self, probe: NoiseScaleProbe, accumulation: int, processes: int) -> None:
        self.probe = probe
        self.accumulation, self.processes = accumulation, processes
        self._scale: NoiseScale | None = None

    def measurements(self, device: torch.device) -> torch.Tensor:
        """The interval's ``WIDTH`` device values, for the log step's one read."""
        return self.probe.measurements(device)

    def update(self, step: int, values: Sequence[float]) -> None:
        """Fold in a log step's values (averaged over processes)."""
        micro_batch = self.probe.micro_batch
        if self._scale is None and micro_batch is not None:
            sizes = two_sizes(micro_batch, self.accumulation, self.processes, self.probe.mode)
            if sizes is None:  # (a batch of one sample cannot be split: never measured)
                return
            self._scale = NoiseScale(*sizes, batch_size=sizes[1])  # the large one: the run's batch
        if self._scale is not None:
            self._scale.update(step, values)

    @property
    def value(self) -> float | None:
        """The noise scale now (samples), or None before it is measured."""
        return None if self._scale is None else self._scale.value

    def estimate(self) -> NoiseScaleEstimate | None:
        """The final estimate for ``FitResult``, or None."""
        return None if self._scale is None else self._scale.estimate()

    def findings(self, step: int) -> list[Finding]:
        """The ``batch-size`` finding at the end of ``fit``, when the noise scale was measured."""
        estimate = self.estimate()
        return [] if estimate is None else [batch_size_finding(estimate, step)]

    def forget(self) -> None:
        """A rollback undid the interval's steps: their sums go (the averages keep earlier steps)."""
        self.probe.forget()


def batch_size_finding(estimate: NoiseScaleEstimate, step: int) -> Finding:
    """The ``batch-size`` finding: where the run's batch stands against the measured noise scale."""
    batch, noise = estimate.batch_size, estimate.value
    ratio = noise / batch
    shown = _samples(noise)
    start = (
        f" It was ~{_samples(estimate.first)} at step {estimate.first_step}; the noise scale usually grows "
        "as the loss falls, so a larger batch tends to pay more later in training."
        if estimate.first is not None and estimate.first_step is not None and estimate.first_step < step
        else " The noise scale usually grows as the loss falls: judge a long run by its end."
    )
    basis = f"(measured over {estimate.steps} steps, {estimate.samples:,} samples)."
    if ratio >= 2:
        fewer = (1 + ratio) / 2  # steps at batch B over steps at the noise scale: (1 + Bn/B) / 2
        message = (
            f"Batch {batch} is about 1/{ratio:.0f} of the measured gradient noise scale (~{shown}) {basis} "
            f"Batches up to ~{shown} samples per step would need ~{fewer:.1f}x fewer steps for the same "
            f"progress, at ~{2 / (1 + 1 / ratio):.1f}x the samples.{start}"
        )
        fix = (
            f"Raise the batch towards ~{shown} samples per step (`gradient_accumulation_steps` or more "
            "processes when memory is short) and scale the learning rate with it (linearly for SGD, "
            "about with the square root for Adam), then check the loss per step."
        )
    elif ratio <= 0.5:
        waste = batch / noise
        more = (1 + waste) / 2  # samples at batch B over samples at the noise scale
        message = (
            f"Batch {batch} is ~{waste:.0f}x the measured gradient noise scale (~{shown}) {basis} Each "
            f"step uses more samples than it needs: the same progress would take ~{more:.1f}x fewer "
            f"samples at batch ~{shown}, in ~{2 / (1 + noise / batch):.1f}x the steps.{start}"
        )
        fix = (
            f"If samples (data, compute) are the limit, lower the batch towards ~{shown} and the learning "
            "rate with it; if wall-clock per step is the limit, the large batch is the price of speed."
        )
    else:
        message = (
            f"Batch {batch} is close to the measured gradient noise scale (~{shown}) {basis} Steps and "
            f"samples are both within ~2x of their minimum.{start}"
        )
        fix = "Nothing to change; as the loss falls the noise scale grows and a larger batch may pay later."
    far = ratio >= FAR_OFF or ratio <= 1 / FAR_OFF
    return Finding(
        code="batch-size", severity="warning" if far else "info", message=message, suggestion=fix, step=step
    )


def _samples(value: float) -> str:
    """A noise scale in samples with two significant digits (it is an estimate)."""
    if value >= 100:
        digits = 10 ** (int(math.log10(value)) - 1)
        return f"{round(value / digits) * digits:,.0f}"
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def describe_unmeasured(reasons: Iterable[str]) -> str:
    """One log line: why the noise scale is not measured in this run."""
    return "safeloop: gradient noise scale not measured: " + "; ".join(reasons)


def build_monitor(
    setting: str, accelerator: Any, prepared: torch.nn.Module, *, sharded: bool
) -> tuple[NoiseScaleMonitor | None, str | None]:
    """The run's noise-scale monitor for ``gradient_noise_scale=setting``, or None with the reason.

    Args:
        setting (`str`): ``"auto"``, ``"split"`` or ``"off"``.
        accelerator (`Accelerator`): the run's processes, accumulation and fp16 scaler.
        prepared (`torch.nn.Module`): the prepared model (DDP's communication hook, or FSDP2's
            reduce-scatter comm, goes on it).
        sharded (`bool`): FSDP or DeepSpeed (their gradients are not whole on one process).
    """
    from torch.nn.parallel import DistributedDataParallel

    from safeloop.diagnostics.noise_probe_ddp import attach_ddp_probe
    from safeloop.diagnostics.noise_probe_fsdp import attach_sharded_probe

    if setting == "off":
        return None, None
    params = [p for p in prepared.parameters() if p.requires_grad]
    accumulation, processes = accelerator.gradient_accumulation_steps, accelerator.num_processes
    if sharded:  # FSDP2: each process's gradient at the reduce-scatter; FSDP1, DeepSpeed: the reason
        probe = NoiseScaleProbe(params, "fsdp", accumulation, accelerator.scaler)
        reason = attach_sharded_probe(accelerator, prepared, params, probe)
        return (
            (None, reason)
            if reason is not None
            else (NoiseScaleMonitor(probe, accumulation, processes), None)
        )
    if accumulation > 1:
        probe = NoiseScaleProbe(params, "accumulation", accumulation, accelerator.scaler)
        return NoiseScaleMonitor(probe, accumulation, processes), None
    if isinstance(prepared, DistributedDataParallel):
        probe = NoiseScaleProbe(params, "ddp", 1, accelerator.scaler)
        reason = attach_ddp_probe(prepared, probe)
        return (None, reason) if reason is not None else (NoiseScaleMonitor(probe, 1, processes), None)
    if setting == "split":
        return NoiseScaleMonitor(NoiseScaleProbe(params, "split", 1, accelerator.scaler), 1, processes), None
    return None, (
        "one process without gradient accumulation has one batch size; `gradient_accumulation_steps` > 1, "
        'several processes, or `gradient_noise_scale="split"` (each batch run as two halves) measure it'
    )
