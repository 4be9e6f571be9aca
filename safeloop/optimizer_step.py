"""One optimizer step: loss and backward per micro-batch, then measure, guard and apply.

:meth:`OptimizerStep.micro_batch` runs the forward and backward of one micro-batch (the first
one under the first-batch checks). :meth:`OptimizerStep.finish` ends an accumulation window:
the first step's checks on the gradients, the one global gradient norm (reused by clipping, the
guard and logging), the finite flag agreed by every process, ``on_before_optimizer_step``, the
update applied or refused on that flag, ``zero_grad`` and the scheduler. It returns a
:class:`StepOutcome` for the loop: the values stay on the device, and ``applied`` says whether
the decision was read on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from safeloop.batching import LossComputer, batch_size_of
from safeloop.config import TrainerConfig
from safeloop.diagnostics.noise_scale import NoiseScaleProbe, split_halves
from safeloop.diagnostics.session import Diagnostics
from safeloop.distributed import agree_all_finite
from safeloop.findings import Reporter
from safeloop.guards.adaptive_clip import AdaptiveClip
from safeloop.guards.clipping import GradNorms, clip_and_measure
from safeloop.guards.nonfinite import finite_flag, true_overflow
from safeloop.hooks import CallbackList
from safeloop.preflight import run_preflight
from safeloop.skips import SkipHandler
from safeloop.stepping import GatedStep
from safeloop.zero import ZeroEngine

__all__ = ["OptimizerStep", "StepOutcome"]


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step measured and did; tensors stay on the device.

    Attributes:
        loss (`torch.Tensor`): the window's loss (mean over its micro-batches).
        norms (`GradNorms`): the global gradient norm before clipping, and per parameter.
        flag (`torch.Tensor | None`): the agreed finite flag (float32 0/1); None with the guard off.
        overflow (`torch.Tensor | None`): the fp16 loss scaler refused the step on its own.
        applied (`bool | None`): whether the update was applied, when that was read on the host
            this step; None when the decision stayed on the device (or the guard is off).
        lr (`float`): the first param group's learning rate at the step.
    """

    loss: torch.Tensor
    norms: GradNorms
    flag: torch.Tensor | None
    overflow: torch.Tensor | None
    applied: bool | None
    lr: float


class OptimizerStep:
    """The micro-batches and the optimizer step of a run, guarded.

    Args:
        config (`TrainerConfig`): clipping, ``nan_guard``, re-initialisation, ``log_every``.
        accelerator (`Accelerator`): the run's accelerator.
        model (`torch.nn.Module`): the prepared model.
        optimizer (`torch.optim.Optimizer`): the prepared optimizer.
        lr_scheduler (`LRScheduler`, *optional*): stepped once per optimizer step.
        losses (`LossComputer`): the batch conventions.
        callbacks (`CallbackList`): ``on_after_backward``, ``on_before_optimizer_step``.
        reporter (`Reporter`): the first step's re-initialisations and findings.
        skips (`SkipHandler`): told of a refused step under ``nan_guard="raise"`` (it raises).
        diagnostics (`Diagnostics`, *optional*): first-batch checks and per-step measurements.
        zero (`ZeroEngine`, *optional*): DeepSpeed's engine, whose backward and step are apart.
        adaptive (`AdaptiveClip`, *optional*): ZClip's adaptive clipping.

    Attributes:
        preflight_done (`bool`): the first step's checks on the gradients have run.
    """

    def __init__(
        self,
        config: TrainerConfig,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        *,
        losses: LossComputer,
        callbacks: CallbackList,
        reporter: Reporter,
        skips: SkipHandler,
        diagnostics: Diagnostics | None,
        zero: ZeroEngine | None,
        adaptive: AdaptiveClip | None,
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.losses = losses
        self.callbacks = callbacks
        self.reporter = reporter
        self.skips = skips
        self.diagnostics = diagnostics
        self.zero = zero
        self.adaptive = adaptive
        self.guarded = config.nan_guard != "off"
        self.stepper = GatedStep(optimizer, accelerator.scaler)
        self.preflight_done = False
        self._window_losses: list[torch.Tensor] = []

    # -- micro-batches ---------------------------------------------------------------------

    def micro_batch(self, batch: Any) -> torch.Tensor:
        """Forward and backward one micro-batch (inside ``accelerator.accumulate``); return its loss."""
        diagnostics = self.diagnostics
        noise = None if diagnostics is None or diagnostics.noise is None else diagnostics.noise.probe
        if noise is not None:
            noise.see(batch_size_of(batch))
        if diagnostics is not None and not diagnostics.first_done:
            loss = diagnostics.first_loss(
                batch, lambda loss_fn: self.losses.with_loss_fn(self.model, batch, loss_fn)
            )
        elif diagnostics is not None and (sampled := diagnostics.loss_fn_now()) is not None:
            loss = self.losses.with_loss_fn(self.model, batch, sampled)  # the baseline's targets
        elif noise is not None and noise.mode == "split":
            return self._split_micro_batch(batch, noise)
        else:
            loss = self.losses(self.model, batch)
        if self.zero is not None:  # Accelerate's backward would also take DeepSpeed's step, unguarded
            self.zero.backward(loss, sync=self.accelerator.sync_gradients)
        else:
            self.accelerator.backward(loss)
        if diagnostics is not None:
            diagnostics.after_first_backward()
        if noise is not None:
            noise.after_backward(first=not self._window_losses)
        self.callbacks.call("on_after_backward")
        self._window_losses.append(loss.detach())
        return loss

    def _split_micro_batch(self, batch: Any, noise: NoiseScaleProbe) -> torch.Tensor:
        """``gradient_noise_scale="split"``: the batch as two halves, each loss weighted by its share."""
        halves = split_halves(batch)
        if halves is None:  # (a batch that cannot be cut: this step is not measured)
            return self._whole_micro_batch(batch)
        total = batch_size_of(batch)
        losses = []
        for index, half in enumerate(halves):
            share = batch_size_of(half) / total
            loss = self.losses(self.model, half)
            self.accelerator.backward(loss * share)
            if index == 0:
                noise.after_first_half(share)
            losses.append(loss.detach() * share)
        self.callbacks.call("on_after_backward")
        loss = losses[0] + losses[1]  # the whole batch's mean loss
        self._window_losses.append(loss)
        return loss

    def _whole_micro_batch(self, batch: Any) -> torch.Tensor:
        loss = self.losses(self.model, batch)
        self.accelerator.backward(loss)
        self.callbacks.call("on_after_backward")
        self._window_losses.append(loss.detach())
        return loss

    def after_rollback(self) -> None:
        """Forget the losses of an abandoned window."""
        self._window_losses = []

    # -- the optimizer step ----------------------------------------------------------------

    def finish(self, step: int) -> StepOutcome:
        """End the accumulation window with the optimizer step ``step`` (applied or refused).

        Args:
            step (`int`): the global step this is (``global_step + 1``).

        Returns:
            `StepOutcome`: the device values and, when read on the host, the decision.

        Raises:
            NonFiniteError: under ``nan_guard="raise"``, before any update.
        """
        if not self.preflight_done:
            self._preflight()
        losses, self._window_losses = self._window_losses, []
        window_loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        norms, flag = self._measure(window_loss)
        # the scaler's own verdict, read before the guard's flag is merged into it
        overflow = true_overflow(self.stepper.overflow(), window_loss) if self.guarded else None
        if self.diagnostics is not None and self.diagnostics.noise is not None:
            self.diagnostics.noise.probe.at_step(norms.total, flag)
        if self.config.nan_guard == "raise":
            # host sync, once per optimizer step: "raise" must stop before any update; an fp16
            # scaler overflow is the scaler's business (it skips and lowers its scale), not an error
            ok = flag if overflow is None else torch.maximum(flag, overflow.to(flag))  # type: ignore[arg-type]
            if not bool(ok.item()):
                self.skips.learn(step, [self.skips.host_values(window_loss, norms.total, norms.per_param)])
        self.callbacks.call("on_before_optimizer_step", self.optimizer)
        lr = self.optimizer.param_groups[0]["lr"]  # a Python float: no device read
        if self.diagnostics is None:
            applied = self._apply(flag)
        else:
            self.diagnostics.record(norms.per_param)
            with self.diagnostics.around_update(step % self.config.log_every == 0):
                applied = self._apply(flag)
        if self.zero is None:
            self.stepper.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        if self.zero is not None and self.zero.overflowed:
            # DeepSpeed refused the step on its own (an fp16 overflow: its loss scaler's business)
            overflow = torch.ones((), device=window_loss.device)
        return StepOutcome(window_loss, norms, flag, overflow, applied, lr)

    def _measure(self, window_loss: torch.Tensor) -> tuple[GradNorms, torch.Tensor | None]:
        if self.zero is not None:
            # DeepSpeed clips inside its step, with its own config; the global norm and the
            # finite flag come from one all-reduce
            return self.zero.measure(window_loss if self.guarded else None)
        norms = clip_and_measure(
            self.accelerator,
            self.model.parameters(),
            max_norm=self.config.clip_grad_norm,
            max_value=self.config.clip_grad_value,
        )
        if self.adaptive is not None:  # after the measure: the logged norm is the one before clipping
            self.adaptive.apply(self.model.parameters(), norms.total)
        if not self.guarded:
            return norms, None
        return norms, agree_all_finite(self.accelerator, finite_flag(window_loss, norms.total))

    def _apply(self, flag: torch.Tensor | None) -> bool | None:
        if self.zero is not None:
            return self.zero.step(flag)
        return self.stepper.step(flag)

    def _preflight(self) -> None:
        self.preflight_done = True
        diagnostics = self.diagnostics
        left_zero = run_preflight(
            self.accelerator.unwrap_model(self.model),
            self.accelerator,
            self.config,
            self.reporter,
            zero_engine=self.zero,
            reached=None if diagnostics is None else diagnostics.reached,
            prepared=self.model,
        )
        if diagnostics is not None and left_zero is not None:
            diagnostics.note_zero_at_start(left_zero)

    def state_dict(self) -> dict[str, Any]:
        """Whether the first step's checks ran, for checkpoints."""
        return {"preflight_done": self.preflight_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.preflight_done = bool(state["preflight_done"])
