"""One Lightning fit's safeloop components, built from the ``Trainer`` as ``SafeTrainer`` builds its own.

``SafeTrainer._build`` wires the run's state objects and components; :class:`FitSession` does the
same for a ``trainer.fit`` that ``SafeLoopCallback`` watches, with the same classes: ``Progress``
and ``RunRecord`` (the run's state), ``Reporter`` (findings and events), ``Diagnostics``,
``SkipHandler`` and ``DivergencePolicy`` (without rollback), ``SpikeDetector``, ``MetricBuffer``
and ``LogStep``. What differs is only what Lightning owns: the loop, the processes
(:class:`LightningProcesses`), the optimizer's step (:class:`StepGate`) and the first forward
(:class:`FirstBatchChecks`). The session holds no thresholds; the callback calls it from its hooks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from safeloop.config import TrainerConfig
from safeloop.diagnostics.advice import check_lr_advice
from safeloop.diagnostics.session import Diagnostics
from safeloop.errors import SafeLoopError
from safeloop.findings import Reporter
from safeloop.guards.adaptive_clip import AdaptiveClip
from safeloop.guards.divergence import SpikeDetector
from safeloop.hooks import CallbackList
from safeloop.lightning.first_batch import FirstBatchChecks
from safeloop.lightning.processes import LightningProcesses
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
        self.reporter = Reporter(processes, self.progress, self.record, CallbackList(()))  # type: ignore[arg-type]
        prepared = trainer.strategy.model
        self.diagnostics: Diagnostics | None = None
        self.first: FirstBatchChecks | None = None
        if config.diagnostics:
            # `custom_step`: the loss comes from `training_step`, as with SafeTrainer's `training_step=`
            self.diagnostics = Diagnostics(
                processes, prepared, optimizer, self.reporter, log_every=config.log_every,  # type: ignore[arg-type]
                custom_step=True, noise_scale="off",
            )  # fmt: skip
            self.first = FirstBatchChecks(
                pl_module, prepared, optimizer, processes, self.reporter,
                checked_loss_fn=self.diagnostics.checked_loss_fn,
            )  # fmt: skip
        self.gate = StepGate(optimizer, processes.scaler)
        policy = DivergencePolicy(config, self.progress, self.reporter, rollback_enabled=False)
        skips = SkipHandler(
            policy=config.nan_guard,
            max_consecutive_skips=config.max_consecutive_skips,
            param_names=[name for name, _ in pl_module.named_parameters()],
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
        log = LogStep(
            processes, metrics, self.progress, self.record,  # type: ignore[arg-type]
            skips=skips if guarded_on_device else None,
            spikes=SpikeDetector(config.spike_zscore, config.spike_patience, config.spike_warmup),
            divergences=policy, diagnostics=self.diagnostics,
        )  # fmt: skip
        adaptive = None if config.adaptive_clip is None else AdaptiveClip(config.adaptive_clip)
        self.steps = GuardedSteps(
            config, processes, pl_module, optimizer, self.gate, progress=self.progress,
            reporter=self.reporter, skips=skips, metrics=metrics, log=log, diagnostics=self.diagnostics,
            adaptive=adaptive, automatic=bool(pl_module.automatic_optimization),
        )  # fmt: skip
        self.skips = skips
        self._started = time.perf_counter()
        self._first_step = self.progress.global_step
        self.result: FitResult | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        """At the start of training (after Lightning restored a checkpoint): the gate goes on."""
        self.progress.global_step = int(self.processes.trainer.global_step)
        self._first_step = self.progress.global_step
        if self.config.nan_guard != "off":  # off: the optimizer's step stays untouched (LBFGS too)
            self.gate.install()
        self._started = time.perf_counter()

    def end_training(self) -> None:
        """``on_train_end`` (every process, before the strategy's teardown): the last reads."""
        self.steps.end()
        if self.diagnostics is not None:
            self.diagnostics.finish()
        # advice the run can check is checked against it (as at the end of SafeTrainer.fit)
        self.reporter.findings[:] = check_lr_advice(self.reporter.findings, self.record)
        self.result = self.build_result()
        self.gate.uninstall()

    def build_result(self) -> FitResult:
        """What the fit did so far, as ``SafeTrainer.fit`` returns it."""
        record = self.record
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
        )

    def finish(self, summary: bool) -> None:
        """``on_fit_end``: the report at INFO and, with ``summary``, the summary printed (main process)."""
        result = self.result if self.result is not None else self.build_result()
        self.result = result
        self.reporter.finish(result, None)
        if summary and self.processes.is_main_process:
            text = fit_summary(
                result,
                seconds=time.perf_counter() - self._started,
                steps_run=result.global_step - self._first_step,
                checkpoint_dir=None,
                latest=None,
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
        self.steps.abandon()
        self.gate.uninstall()
        if isinstance(exception, SafeLoopError) and self.processes.is_main_process:
            logger.info("%s", self.report())


def _no_replay(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """``SkipHandler``'s loss for a replay: never called, since no batch is kept under Lightning."""
    raise NotImplementedError("safeloop does not replay a Lightning training_step")
