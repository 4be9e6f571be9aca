"""One Lightning fit's safeloop components, built from the ``Trainer`` as ``SafeTrainer`` builds its own.

``SafeTrainer._build`` wires the run's state objects and components; :class:`FitSession` does the
same for a ``trainer.fit`` that ``SafeLoopCallback`` watches, with the same classes: ``Progress``
and ``RunRecord`` (the run's state), ``Reporter`` (findings and events), ``Diagnostics``,
``SkipHandler`` and ``DivergencePolicy``, ``SpikeDetector``, ``MetricBuffer``, ``LogStep``,
``Checkpointer`` and ``Rollback``. What differs is only what Lightning owns: the loop, the
processes (:class:`LightningProcesses`), the optimizer's step (:class:`StepGate`), the first
forward (:class:`FirstBatchChecks`), the user's backward and clipping
(:class:`OptimizationChecks`) and the rollback, made in place (:class:`InPlaceRollback`). The
session holds no thresholds; the callback calls it from its hooks, and it says at which step
boundary each component acts (what ``RunLoop`` says for ``SafeTrainer``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from safeloop.checkpoint.checkpointer import NamedState
from safeloop.config import TrainerConfig
from safeloop.diagnostics.advice import check_lr_advice
from safeloop.diagnostics.session import Diagnostics
from safeloop.diagnostics.sharded import unwrapped_name
from safeloop.errors import SafeLoopError
from safeloop.findings import Reporter
from safeloop.guards.adaptive_clip import AdaptiveClip
from safeloop.guards.divergence import SpikeDetector
from safeloop.hooks import CallbackList
from safeloop.lightning.deepspeed import ZeroStepGate, zero_of
from safeloop.lightning.first_batch import FirstBatchChecks
from safeloop.lightning.fsdp import is_fsdp1
from safeloop.lightning.noise import lightning_batch_advice, noise_setting
from safeloop.lightning.optimization_checks import ClippingAwareReporter, OptimizationChecks
from safeloop.lightning.processes import LightningProcesses
from safeloop.lightning.rollback import InPlaceRollback
from safeloop.lightning.step_gate import StepGate
from safeloop.lightning.steps import GuardedSteps
from safeloop.log_step import LogStep
from safeloop.metrics import MetricBuffer
from safeloop.results import FitResult, report
from safeloop.rollback import DivergencePolicy
from safeloop.run_state import Progress, RunRecord
from safeloop.skips import SkipHandler
from safeloop.summary import fit_summary

__all__ = ["FitSession"]

logger = logging.getLogger("safeloop")


class FitSession:
    """The components of one ``trainer.fit`` under ``SafeLoopCallback``.

    Args:
        config (`TrainerConfig`): the callback's settings.
        trainer (`lightning.pytorch.Trainer`): the trainer, after its strategy's set-up.
        pl_module (`LightningModule`): the module being fitted.
        optimizer (`torch.optim.Optimizer`): its one optimizer.

    Attributes:
        processes (`LightningProcesses`): the run's processes and loggers.
        progress (`Progress`): the optimizer steps counted so far (skipped ones included).
        record (`RunRecord`): events, history and skip counts.
        reporter (`Reporter`): the findings.
        first (`FirstBatchChecks`, *optional*): None with ``diagnostics=False``.
        steps (`GuardedSteps`): the guarded steps.
        gate (`StepGate`): installed on the optimizer for the fit.
        checks (`OptimizationChecks`): the user's backward and clipping.
        rollbacks (`InPlaceRollback`): checkpoints and rollbacks (idle with ``rollback=False``).
    """

    def __init__(
        self, config: TrainerConfig, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer
    ) -> None:
        self.config = config
        processes = self.processes = LightningProcesses(trainer, pl_module)
        self.progress = Progress(
            global_step=int(trainer.global_step), step_lr=optimizer.param_groups[0]["lr"]
        )
        self.record = RunRecord()
        clips = any(
            v is not None for v in (config.clip_grad_norm, config.clip_grad_value, config.adaptive_clip)
        )
        checks = self.checks = OptimizationChecks(trainer, pl_module, callback_clips=clips)
        self.reporter: Reporter = ClippingAwareReporter(
            processes, self.progress, self.record, CallbackList(()),
            explain=lambda finding: lightning_batch_advice(checks.explain(finding)),
        )  # fmt: skip
        prepared = trainer.strategy.model
        # DeepSpeed: SafeTrainer's engine wrapper, whose partitions the components read
        zero = self.zero = zero_of(trainer, pl_module)
        self.diagnostics: Diagnostics | None = None
        self.first: FirstBatchChecks | None = None
        if config.diagnostics:
            # `custom_step`: the loss comes from `training_step`, as with SafeTrainer's `training_step=`
            self.diagnostics = Diagnostics(
                processes, prepared, optimizer, self.reporter, log_every=config.log_every,  # type: ignore[arg-type]
                custom_step=True, noise_scale=noise_setting(config.gradient_noise_scale, processes),
                zero=zero,
            )  # fmt: skip
            self.first = FirstBatchChecks(
                pl_module, prepared, optimizer, processes, self.reporter,
                checked_loss_fn=self.diagnostics.checked_loss_fn,
                zero_gradients_found=self.diagnostics.zero_gradients_found,
                # FSDP1's empty slices and DeepSpeed's partitions leave `.grad` None where a
                # gradient came (ZeRO's reach is read from hooks instead)
                gradient_reach=not (is_fsdp1(trainer.strategy) or zero is not None),
                reach_hooks=self.diagnostics.layout.reach_hooks,
            )  # fmt: skip
        self.gate = StepGate(optimizer, processes.scaler) if zero is None else ZeroStepGate(zero)
        policy = DivergencePolicy(config, self.progress, self.reporter, rollback_enabled=config.rollback)
        skips = SkipHandler(
            policy=config.nan_guard,
            max_consecutive_skips=config.max_consecutive_skips,
            # FSDP1's auto-wrapped submodules add `_fsdp_wrapped_module.` to the module's names
            param_names=[unwrapped_name(name) for name, _ in pl_module.named_parameters()],
            history_steps=1,  # no batch is kept: the replay needs a loss SafeTrainer can call itself
            accumulation=processes.gradient_accumulation_steps,
            model=pl_module,
            loss_of=_no_replay,
            record=self.record,
            reporter=self.reporter,
            divergences=policy,
        )
        metrics = MetricBuffer(config.log_every)
        guarded_on_device = config.nan_guard != "off" and self.gate.device_side
        spikes = SpikeDetector(config.spike_zscore, config.spike_patience, config.spike_warmup)
        log = LogStep(
            processes, metrics, self.progress, self.record,  # type: ignore[arg-type]
            skips=skips if guarded_on_device else None,
            spikes=spikes, divergences=policy, diagnostics=self.diagnostics,
        )  # fmt: skip
        adaptive = None if config.adaptive_clip is None else AdaptiveClip(config.adaptive_clip)
        self.steps = GuardedSteps(
            config, processes, pl_module, optimizer, self.gate, progress=self.progress,
            reporter=self.reporter, skips=skips, metrics=metrics, log=log, diagnostics=self.diagnostics,
            adaptive=adaptive, automatic=bool(pl_module.automatic_optimization), zero=zero,
            reached=lambda: None if self.first is None else self.first.reached,
        )  # fmt: skip
        schedulers = trainer.lr_scheduler_configs  # at most one with rollback (compat.py)
        self.rollbacks = InPlaceRollback(
            config, processes, pl_module, optimizer, schedulers[0].scheduler if schedulers else None,
            progress=self.progress, record=self.record, reporter=self.reporter, skips=skips, log=log,
            guard_state=[
                self.steps, NamedState("spike_detector", spikes), NamedState("adaptive_clip", adaptive),
            ],
            after_rollback=[self.steps],
            zero=zero,
        )  # fmt: skip
        self.skips = skips
        self._started = time.perf_counter()
        self._first_step = self.progress.global_step
        self.result: FitResult | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        """At the start of training (after Lightning restored a checkpoint): the gate goes on."""
        trainer = self.processes.trainer
        self.progress.global_step = int(trainer.global_step)
        self.progress.epoch = int(trainer.current_epoch)  # then at each on_train_epoch_start
        self._first_step = self.progress.global_step
        if self.config.nan_guard != "off":  # off: the optimizer's step stays untouched (LBFGS too)
            self.gate.install()
        self.checks.install()
        self.rollbacks.start()  # the state before the first step: a healthy rollback target
        self._started = time.perf_counter()

    def before_step(self) -> None:
        """``on_before_optimizer_step``: the previous step's end if it is still open, then this step's.

        Raises:
            NonFiniteError: under ``nan_guard="raise"``, before any update of a non-finite step.
        """
        if self.zero is not None and not self.zero.engine.is_gradient_accumulation_boundary():
            return  # a micro-batch inside DeepSpeed's window: its step comes at the window's end
        # a second step in one training_step (manual optimization): the first one ends here, and a
        # divergence it finds waits for the batch's end (this step's gradients are computed)
        self.rollbacks.step_ended(self.steps.finish(), in_step=True)
        finding = self.checks.before_step(self.progress.global_step + 1, had_loss=self.steps.window_has_loss)
        if finding is not None:
            self.reporter.add(finding)
        self.steps.before_step()

    def batch_end(self) -> None:
        """``on_train_batch_end``: the step boundary, then a rollback from a divergence it met.

        Raises:
            DivergenceError: a rollback was needed past ``max_rollbacks``, or no healthy
                checkpoint precedes the divergence.
        """
        self.rollbacks.step_ended(self.steps.finish(), in_step=False)
        self.rollbacks.batch_ended()

    def end_training(self) -> None:
        """``on_train_end`` (every process, before the strategy's teardown): the last reads."""
        # a divergence found here still rolls back: the module the fit leaves is the healthy one
        self.rollbacks.step_ended(self.steps.finish(), in_step=False)
        self.rollbacks.step_ended(self.steps.flush(), in_step=False)  # nothing left after a rollback
        self.rollbacks.end()
        self.checks.uninstall()
        if self.diagnostics is not None:
            self.diagnostics.finish()
        # advice the run can check is checked against it (as at the end of SafeTrainer.fit)
        self.reporter.findings[:] = check_lr_advice(self.reporter.findings, self.record)
        self.result = self.build_result()
        self.gate.uninstall()

    def build_result(self) -> FitResult:
        """What the fit did so far, as ``SafeTrainer.fit`` returns it."""
        record = self.record
        noise = None if self.diagnostics is None else self.diagnostics.noise
        return FitResult(
            global_step=self.progress.global_step,
            skipped_steps=record.skipped_steps,
            rollbacks=record.rollbacks,
            history=list(record.history),
            events=list(record.events),
            findings=list(self.reporter.findings),
            eval_loss=record.eval_loss,
            baseline_loss=None if self.diagnostics is None else self.diagnostics.baseline_value,
            trace=record.trace.copy(),
            gradient_noise_scale=None if noise is None else noise.estimate(),
        )

    def finish(self, summary: bool) -> None:
        """``on_fit_end``: the report at INFO and, with ``summary``, the summary printed (main process)."""
        result = self.result if self.result is not None else self.build_result()
        self.result = result
        checkpoint_dir = self.config.checkpoint_dir
        self.reporter.finish(result, checkpoint_dir)  # with checkpoint_dir: findings.json there
        self.rollbacks.remove_temporary()
        if summary and self.processes.is_main_process:
            text = fit_summary(
                result,
                seconds=time.perf_counter() - self._started,
                steps_run=result.global_step - self._first_step,
                checkpoint_dir=checkpoint_dir,
                latest=None,  # safeloop's checkpoints are rollback targets here, not resumed by Lightning
            )
            print(text, flush=True)

    def report(self) -> str:
        """``FitResult.report()`` of the fit; after an error, the same text opening with the error."""
        if self.error is None:
            return (self.result if self.result is not None else self.build_result()).report()
        record = self.record
        return report(
            self.reporter.findings,
            steps=self.progress.global_step,
            skipped=record.skipped_steps,
            rollbacks=record.rollbacks,
            status=f"stopped by {type(self.error).__name__}",
        )

    def abandon(self, exception: BaseException) -> None:
        """``on_exception``: nothing left watching or patched; the findings so far stay readable.

        No ``FitResult`` then (``trainer.fit`` raised, as ``SafeTrainer.fit`` returns none).
        """
        self.error, self.result = exception, None
        if self.first is not None:
            self.first.close()
        step, had_loss = self.progress.global_step + 1, self.steps.window_has_loss
        cause = self.checks.at_error(step, exception, had_loss=had_loss)
        if cause is not None:  # torch's fp16 error after `loss.backward()`: its cause, named
            self.reporter.add(cause)
        self.steps.abandon()
        self.gate.uninstall()
        self.checks.uninstall()
        self.rollbacks.remove_temporary()
        if isinstance(exception, SafeLoopError) and self.processes.is_main_process:
            logger.info("%s", self.report())


def _no_replay(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """``SkipHandler``'s loss for a replay: never called, since no batch is kept under Lightning."""
    raise NotImplementedError("safeloop does not replay a Lightning training_step")
