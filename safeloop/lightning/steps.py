"""Each optimizer step of a Lightning fit, measured and guarded as ``SafeTrainer`` guards its own.

What ``OptimizerStep.finish`` and the run loop's step boundary do in ``SafeTrainer``, cut along
Lightning's hooks:

- ``on_train_batch_start`` and ``on_after_backward``: where the gradient noise scale is measured
  (``noise.py``), each micro-batch's size and a window's first gradient;
- ``on_before_backward``: the micro-batch's loss joins the window (:meth:`GuardedSteps.see_loss`);
- ``on_before_optimizer_step`` (after accumulation and the fp16 unscale, before Lightning's own
  clipping): the first step's all-zero weight check, the one global gradient norm (clipped with
  it when the callback clips), the finite flag agreed by every process, ``nan_guard="raise"``,
  the diagnostics' per-step record (the noise scale's pair), and the decision handed to the :class:`StepGate`
  (:meth:`GuardedSteps.before_step`);
- the step boundary, at ``on_train_batch_end`` (or at the next step, or the end of training):
  the step counted, its device row kept, a skip read on the host learnt at once, and every
  ``log_every`` steps the log step (:meth:`GuardedSteps.finish`), whose outcome (a divergence,
  or the interval known healthy) it returns for the rollback to act on.

The components are ``SafeTrainer``'s own (``measure_and_clip``, ``finite_flag``,
``agree_all_finite``, ``run_preflight``, ``SkipHandler``, ``MetricBuffer``, ``LogStep``,
``Diagnostics``); this module only says when each runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType

from safeloop.batching import batch_size_of
from safeloop.config import TrainerConfig
from safeloop.diagnostics.session import Diagnostics
from safeloop.distributed import agree_all_finite
from safeloop.findings import Reporter
from safeloop.guards.adaptive_clip import AdaptiveClip
from safeloop.guards.clipping import GradNorms, measure_and_clip
from safeloop.guards.nonfinite import finite_flag, true_overflow
from safeloop.lightning.deepspeed import ZeroStepGate
from safeloop.lightning.fsdp import Fsdp1Norms, is_fsdp1, measure_and_clip_sharded
from safeloop.lightning.processes import LightningProcesses
from safeloop.lightning.step_gate import StepGate
from safeloop.log_step import LogOutcome, LogStep
from safeloop.metrics import MetricBuffer, StepValues
from safeloop.preflight import run_preflight
from safeloop.progress import ProgressBar
from safeloop.run_state import Progress
from safeloop.skips import SkipHandler
from safeloop.zero import ZeroEngine

__all__ = ["GuardedSteps"]

# an applied step learnt on the host: it ends a run of skips, and nothing of it is read
_APPLIED = StepValues(loss=math.nan, grad_norm=math.nan, finite=True)
# a step boundary that is no log step found nothing (immutable: one for all of them)
_NOTHING = LogOutcome()


@dataclass
class _Measured:
    """A step measured in ``on_before_optimizer_step`` whose boundary has not run yet."""

    step: int
    loss: torch.Tensor
    norms: GradNorms
    flag: torch.Tensor | None
    overflow: torch.Tensor | None
    lr: float
    around_update: contextlib.AbstractContextManager[None] | None


class GuardedSteps:
    """The optimizer steps of one Lightning fit: measured, guarded, counted and logged.

    Args:
        config (`TrainerConfig`): ``nan_guard``, clipping, re-initialisation, ``log_every``.
        processes (`LightningProcesses`): the run's processes (flags are agreed over them).
        model (`LightningModule`): the module (its parameters, in ``parameters()`` order).
        optimizer (`torch.optim.Optimizer`): the one optimizer.
        gate (`StepGate`): carries out each step's decision.
        progress (`Progress`): advanced at each step boundary.
        reporter (`Reporter`): the first step's re-initialisations and findings.
        skips (`SkipHandler`): learns of refused steps read on the host.
        metrics (`MetricBuffer`): one device row per step.
        log (`LogStep`): every ``log_every`` steps (it learns device-side skips itself).
        diagnostics (`Diagnostics`, *optional*): per-step gradient norms and update sizes.
        adaptive (`AdaptiveClip`, *optional*): ZClip's adaptive clipping.
        automatic (`bool`): automatic optimization (Lightning divides each micro-batch's loss by
            ``accumulate_grad_batches`` before ``on_before_backward``; it is multiplied back).
        zero (`ZeroEngine`, *optional*): DeepSpeed's engine: the step is measured on its
            partitions (the finite flag agreed with the norm) and its ``step`` gated (``gate``).
        reached (`Callable`, *optional*): the parameters the first backward reached (DeepSpeed
            ZeRO's gradient hooks), for the first step's all-zero weight check.

    Attributes:
        preflight_done (`bool`): the first step's all-zero weight check has run.
    """

    def __init__(
        self,
        config: TrainerConfig,
        processes: LightningProcesses,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        gate: StepGate | ZeroStepGate,
        *,
        progress: Progress,
        reporter: Reporter,
        skips: SkipHandler,
        metrics: MetricBuffer,
        log: LogStep,
        diagnostics: Diagnostics | None,
        adaptive: AdaptiveClip | None,
        automatic: bool,
        zero: ZeroEngine | None = None,
        reached: Callable[[], set[str] | None] = lambda: None,
    ) -> None:
        self.config = config
        self.processes = processes
        self.model = model
        self.optimizer = optimizer
        self.gate = gate
        self.progress = progress
        self.reporter = reporter
        self.skips = skips
        self.metrics = metrics
        self.log = log
        self.diagnostics = diagnostics
        self.adaptive = adaptive
        self._zero = zero
        self._reached = reached
        self.guarded = config.nan_guard != "off"
        self.preflight_done = False
        self._loss_factor = processes.gradient_accumulation_steps if automatic else 1
        # the precision plugin's fp16 scaler (the StepGate holds the same one), fixed for the fit
        self._scaler = processes.scaler
        # FSDP2: DTensor gradients, whose norms are made whole over the processes; FSDP1 (set at
        # the first step, with the parameters): flat slices, measured as FSDP1 measures (fsdp.py)
        self._measure: Callable[..., GradNorms] = measure_and_clip
        if processes.distributed_type == DistributedType.FSDP:
            self._measure = measure_and_clip_sharded
        # the module's parameters, listed once at the first step (after a lazy module's first
        # forward): re-initialisation and rollback copy into the same tensors, never replace them
        self._params: list[torch.nn.Parameter] | None = None
        self._losses: list[torch.Tensor] = []
        # the gradient noise scale's probe, where this fit measures it (noise.py)
        self._noise = None if diagnostics is None or diagnostics.noise is None else diagnostics.noise.probe
        self._measured: _Measured | None = None
        self._bar = ProgressBar(None, enabled=False)  # Lightning draws its own; the log step wants one

    # -- the hooks ---------------------------------------------------------------------------------

    def see_loss(self, loss: torch.Tensor) -> None:
        """Keep a micro-batch's loss as it reaches backward (``on_before_backward``); device only."""
        value = loss.detach()
        scaler = self._scaler
        scale = None if scaler is None else getattr(scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):  # fp16: the loss arrives multiplied by the loss scale
            value = value / scale.to(value.device)  # the scale tensor itself: no host read
        if self._loss_factor != 1:
            value = value * self._loss_factor
        self._losses.append(value)

    def see_batch(self, batch: Any) -> None:
        """A micro-batch starts (``on_train_batch_start``): its size, for the gradient noise scale."""
        if self._noise is not None:
            self._noise.see(batch_size_of(batch))

    def after_backward(self) -> None:
        """After a micro-batch's backward: the window's first gradient, for the gradient noise scale."""
        if self._noise is not None:  # its loss went in at on_before_backward
            self._noise.after_backward(first=len(self._losses) == 1)

    @property
    def window_has_loss(self) -> bool:
        """Some loss reached ``on_before_backward`` since the last step (Lightning's backward ran)."""
        return bool(self._losses)

    def before_step(self) -> None:
        """Measure and decide the step about to be taken (``on_before_optimizer_step``).

        The previous step's :meth:`finish` must have run (a second step in one ``training_step``
        meets the first one's end here).

        Raises:
            NonFiniteError: under ``nan_guard="raise"``, before any update of a non-finite step.
        """
        step = self.progress.global_step + 1
        if not self.preflight_done:
            self._preflight()
        loss, row_loss = self._window_loss()
        params = self._params
        if params is None:
            params = self._params = list(self.model.parameters())
            if is_fsdp1(self.processes.trainer.strategy):
                self._measure = Fsdp1Norms(self.processes.trainer.strategy.model, params)
        config = self.config
        agreed = None
        if self._zero is not None:  # DeepSpeed: its partitions, the flag agreed with the norm (no clipping)
            norms, agreed = self._zero.measure(loss if self.guarded else None)
        else:
            norms = self._measure(params, max_norm=config.clip_grad_norm, max_value=config.clip_grad_value)
        scale = self.gate.gradient_scale()
        if scale is not None:  # fp16 with a fused optimizer: the gradients are still scaled
            per_param = None if norms.per_param is None else norms.per_param / scale
            norms = GradNorms(total=norms.total / scale, per_param=per_param)
        if self.adaptive is not None:  # after the measure: the logged norm is the one before clipping
            self.adaptive.apply(params, norms.total)
        flag = overflow = None
        if self.guarded:
            flag = agreed
            if flag is None:
                flag = agree_all_finite(self.processes, finite_flag(loss, norms.total))  # type: ignore[arg-type]
            # the scaler's own verdict, read before the guard's flag is merged into it
            overflow = true_overflow(self.gate.overflow(), loss)
            if config.nan_guard == "raise":
                # host sync, once per optimizer step: "raise" must stop before any update
                ok = flag if overflow is None else torch.maximum(flag, overflow.to(flag))
                if not bool(ok.item()):
                    self.skips.learn(step, [self.skips.host_values(loss, norms.total, norms.per_param)])
        if self._noise is not None:  # the large batch's norm (unscaled, before clipping), as SafeTrainer's
            self._noise.at_step(norms.total, flag)
        around = None
        if self.diagnostics is not None:
            self.diagnostics.record(norms.per_param)
            if step % config.log_every == 0:  # the update sizes: measured at log steps only
                # entered here and left at the step's boundary: the update happens between two hooks
                around = self.diagnostics.around_update(True)
                around.__enter__()
        lr = self.optimizer.param_groups[0]["lr"]  # a Python float: no device read
        self.gate.decide(flag)
        self._measured = _Measured(step, row_loss, norms, flag, overflow, lr, around)

    def finish(self) -> LogOutcome | None:
        """End the measured step, if any: count it, keep its row, learn a host-read skip, log.

        Called at ``on_train_batch_end``, before the next step and at the end of training, so
        that every process ends each step at the same point.

        Returns:
            `LogOutcome | None`: a divergence (a run of skips read at the step, or what the log
            step found), or the interval the log step found healthy; None when no step was open.

        Raises:
            NonFiniteError: more skipped steps in a row than ``max_consecutive_skips`` without
                rollback.
        """
        measured, self._measured = self._measured, None
        if measured is None:
            return None
        if measured.around_update is not None:
            measured.around_update.__exit__(None, None, None)  # ||dw|| of the update just made
        self.progress.advance(measured.lr)
        norms = measured.norms
        self.metrics.record(
            measured.loss,
            norms.total,
            measured.flag,
            norms.per_param if measured.flag is not None else None,
            measured.overflow,
        )
        applied = self.gate.take_applied()
        if applied is not None:  # read on the host at the step: learnt now, as SafeTrainer does
            values = (
                _APPLIED if applied else self.skips.host_values(measured.loss, norms.total, norms.per_param)
            )
            # past the limit: a divergence with rollback on (acted on before any log step, as
            # SafeTrainer's loop does), NonFiniteError without
            divergence = self.skips.learn(measured.step, [values])
            if divergence is not None:
                return LogOutcome(divergence)
        if measured.step % self.config.log_every == 0:
            return self.log.run(self._bar)
        return _NOTHING

    def flush(self) -> LogOutcome | None:
        """At the end of training, after the last :meth:`finish`: the steps not logged yet, if any."""
        return self.log.run(self._bar) if len(self.metrics) else None

    def abandon(self) -> None:
        """After an error: leave an update measurement open no longer (nothing is logged)."""
        measured, self._measured = self._measured, None
        if measured is not None and measured.around_update is not None:
            measured.around_update.__exit__(None, None, None)

    def after_rollback(self) -> None:
        """A rollback restored the weights: nothing measured before it belongs to what follows."""
        self.abandon()
        self._losses = []

    # -- parts -------------------------------------------------------------------------------------

    def _window_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's loss for the flag, and for the metrics row (NaN when none reached backward)."""
        losses, self._losses = self._losses, []
        if losses:
            loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
            return loss, loss
        # backward ran outside Lightning's (`loss.backward()` in manual optimization), or the step
        # had no loss: the flag rests on the gradients alone, and the history leaves the loss out
        device = self.processes.device
        return torch.zeros((), device=device), torch.full((), math.nan, device=device)

    def _preflight(self) -> None:
        self.preflight_done = True
        left_zero = run_preflight(
            self.model, self.processes, self.config, self.reporter,  # type: ignore[arg-type]
            zero_engine=self._zero, reached=self._reached(), prepared=self.processes.trainer.strategy.model,
        )  # fmt: skip
        if self.diagnostics is not None and left_zero is not None:
            self.diagnostics.note_zero_at_start(left_zero)

    def state_dict(self) -> dict[str, Any]:
        """Whether the first step's checks ran, for Lightning's checkpoints."""
        return {"preflight_done": self.preflight_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.preflight_done = bool(state.get("preflight_done", self.preflight_done))
