"""The run loop: the one orchestrator of a run, and the only place that handles a rollback.

It says which micro-batches run, when an optimizer step is taken, what happens at each step
boundary, when an epoch ends and when the run is over. The components say what each part does:
``OptimizerStep`` one step, ``LogStep`` a log step, ``Checkpointer`` a save, ``Rollback`` a
restore, ``DataCursor`` the data position. Components return what the loop must act on (a step's
outcome, a divergence); the loop alone turns a divergence into a rollback and starts over.

The loop, as :meth:`RunLoop.run` drives it::

    save the state before the first step (a healthy rollback target, with rollback on)
    until done (max_steps, max_epochs or a preemption):
        per epoch: the cursor fast-forwards past consumed batches
                   -> per micro-batch: loss, backward; on the sync step: the optimizer step,
                      then the step boundary (progress, log step, checkpoint, preemption stop)
                   -> evaluate -> next epoch
    log the steps since the last log step
    on a divergence (every process, same step): roll back, then run the loop again from there
    the final checkpoint, unless the last step has one
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from accelerate import Accelerator

from safeloop.checkpoint.checkpointer import Checkpointer
from safeloop.config import TrainerConfig
from safeloop.data_cursor import DataCursor
from safeloop.diagnostics.session import Diagnostics
from safeloop.evaluation import evaluate
from safeloop.findings import Reporter
from safeloop.guards.divergence import Divergence
from safeloop.hooks import CallbackList
from safeloop.log_step import LogOutcome, LogStep
from safeloop.metrics import MetricBuffer, StepValues
from safeloop.optimizer_step import OptimizerStep, StepOutcome
from safeloop.preemption import PreemptionWatch
from safeloop.progress import ProgressBar
from safeloop.results import Event
from safeloop.rollback import Rollback
from safeloop.run_state import Progress, RunRecord
from safeloop.skips import SkipHandler

__all__ = ["RunLoop"]

logger = logging.getLogger("safeloop")

# an applied step learnt on the host: it ends a run of skips, and nothing of it is read
_APPLIED = StepValues(loss=math.nan, grad_norm=math.nan, finite=True)


class _Diverged(Exception):
    """Unwinds the epoch and batch loops to :meth:`RunLoop.run` (raised and caught in this module)."""

    def __init__(self, divergence: Divergence) -> None:
        super().__init__(str(divergence))
        self.divergence = divergence


class RunLoop:
    """Drives epochs and micro-batches through the run's components.

    Args:
        config (`TrainerConfig`): ``max_steps``, ``max_epochs``, ``log_every``.
        accelerator (`Accelerator`): the run's accelerator.
        model (`torch.nn.Module`): the prepared model.
        eval_dataloader (`DataLoader`, *optional*): evaluated at the end of each epoch.
        progress (`Progress`): the counters this loop advances.
        record (`RunRecord`): the evaluation loss goes here.
        cursor (`DataCursor`): the epoch's batches, fast-forwarded past consumed ones.
        step (`OptimizerStep`): micro-batches and optimizer steps.
        skips (`SkipHandler`): learns of skips read on the host at the step.
        metrics (`MetricBuffer`): one device row per step.
        log (`LogStep`): the log step.
        checkpoints (`Checkpointer`): saves.
        rollback (`Rollback`, *optional*): None when divergences do not roll back.
        callbacks (`CallbackList`): the batch, validation and rollback hooks.
        reporter (`Reporter`): the preemption event.
        diagnostics (`Diagnostics`, *optional*): shown each training micro-batch (data profile).
    """

    def __init__(
        self,
        config: TrainerConfig,
        accelerator: Accelerator,
        model: torch.nn.Module,
        eval_dataloader: Any,
        *,
        progress: Progress,
        record: RunRecord,
        cursor: DataCursor,
        step: OptimizerStep,
        skips: SkipHandler,
        metrics: MetricBuffer,
        log: LogStep,
        checkpoints: Checkpointer,
        rollback: Rollback | None,
        callbacks: CallbackList,
        reporter: Reporter,
        diagnostics: Diagnostics | None,
    ) -> None:
        self.config = config
        self.accelerator = accelerator
        self.model = model
        self.eval_dataloader = eval_dataloader
        self.progress = progress
        self.record = record
        self.cursor = cursor
        self.step = step
        self.skips = skips
        self.metrics = metrics
        self.log = log
        self.checkpoints = checkpoints
        self.rollback = rollback
        self.callbacks = callbacks
        self.reporter = reporter
        self.diagnostics = diagnostics
        self.preempted = False
        self._bar: ProgressBar | None = None
        self._preemption = PreemptionWatch()

    # -- the outline -----------------------------------------------------------------------

    def run(self, bar: ProgressBar, preemption: PreemptionWatch) -> None:
        """Train until the run is done, rolling back and going on after each divergence.

        Args:
            bar (`ProgressBar`): this fit's progress bar.
            preemption (`PreemptionWatch`): this fit's signal watch, installed for the loop.

        Raises:
            DivergenceError: a rollback was needed past ``max_rollbacks``, or no healthy
                checkpoint precedes the divergence.
        """
        self._bar, self._preemption, self.preempted = bar, preemption, False
        with preemption:
            if self.rollback is not None and self.checkpoints.last_saved_step != self.progress.global_step:
                self._save()  # the state before the first step: a healthy rollback target
            while True:
                try:
                    self._train_epochs()
                    self._log()  # the steps since the last log step, if any
                    break
                except _Diverged as diverged:  # every process, at the same step boundary
                    self._roll_back(diverged.divergence)
        if self.checkpoints.enabled and self.progress.global_step != self.checkpoints.last_saved_step:
            self._save()  # the final one, unless the last step already has one
        self.checkpoints.close()

    def _done(self) -> bool:
        if self.preempted:
            return True
        if self.config.max_steps is not None:
            return self.progress.global_step >= self.config.max_steps
        return self.progress.epoch >= self.config.max_epochs

    def _train_epochs(self) -> None:
        while not self._done():
            finished_epoch = self._run_epoch()
            if self.preempted:
                return
            if not finished_epoch and not self._done():
                return  # the dataloader yielded nothing this epoch: nothing more will come
            if self.eval_dataloader is not None:
                self._evaluate()
            if finished_epoch:
                self.progress.epoch += 1
                self.cursor.end_epoch()

    def _run_epoch(self) -> bool:
        """Run one epoch's micro-batches; True when the dataloader was exhausted (epoch complete)."""
        with contextlib.closing(self.cursor.epoch_batches()) as batches:
            for batch_idx, batch in batches:
                self._micro_batch(batch, batch_idx)
                if self._done():
                    # stopped by max_steps: the epoch is complete only if that was its last batch
                    return bool(self.accelerator.gradient_state.end_of_dataloader)
        return self.cursor.drawn > 0

    # -- one micro-batch and the step boundary ---------------------------------------------

    def _micro_batch(self, batch: Any, batch_idx: int) -> None:
        # Accelerate's `accumulate` decides whether this micro-batch ends a window
        # (`sync_gradients`); only then does the optimizer step run, inside the context, as in
        # the hand-written Accelerate loop whose updates `fit` must match bitwise.
        self.callbacks.call("on_train_batch_start", batch, batch_idx)
        if self.step.guarded:
            self.skips.remember(self.progress.global_step + 1, batch_idx, batch)
        if self.diagnostics is not None:
            self.diagnostics.see_train_batch(batch)
        stepped = False
        with self.accelerator.accumulate(self.model):
            loss = self.step.micro_batch(batch)
            if self.accelerator.sync_gradients:
                outcome = self.step.finish(self.progress.global_step + 1)
                self.progress.advance(outcome.lr)
                self.metrics.record(
                    outcome.loss,
                    outcome.norms.total,
                    outcome.flag,
                    outcome.norms.per_param if outcome.flag is not None else None,
                    outcome.overflow,
                )
                divergence = self._learn_at_step(outcome)
                if divergence is not None:
                    raise _Diverged(divergence)
                stepped = True
        self.callbacks.call("on_train_batch_end", loss, batch, batch_idx)
        if stepped:
            self._after_step()

    def _learn_at_step(self, outcome: StepOutcome) -> Divergence | None:
        if outcome.applied is None:  # decided on the device (or no guard): learnt at the log step
            return None
        values = (
            _APPLIED
            if outcome.applied
            else self.skips.host_values(outcome.loss, outcome.norms.total, outcome.norms.per_param)
        )
        return self.skips.learn(self.progress.global_step, [values])

    def _after_step(self) -> None:
        # Called on every process at the same boundary. The log step comes first, so that a
        # checkpoint of this step holds its history entry and the spike detector's view of its
        # interval (a resumed run then logs what an uninterrupted one does), and so that a
        # divergence it confirms leaves no checkpoint of the diverging step and pre-empts a
        # preemption stop (the signal is still honoured at a later boundary). A due checkpoint
        # is written before a preemption stop, which then needs no second one.
        step, every = self.progress.global_step, self.config.log_every
        self._bar.advance()  # type: ignore[union-attr]
        self.checkpoints.poll()
        if step % every == 0:
            self._log()
        if self.checkpoints.due(step):
            self._save()
        # the signal is agreed across processes (at log steps under several), so all stop together
        if not self.preempted and self._preemption.agreed(self.accelerator, step, every):
            if step % every:
                self._log()  # the partial interval, so that the checkpoint's history holds it
            self._stop_for_preemption()

    # -- what the components report --------------------------------------------------------

    def _log(self) -> None:
        outcome: LogOutcome = self.log.run(self._bar)  # type: ignore[arg-type]
        if outcome.divergence is not None:
            raise _Diverged(outcome.divergence)
        if outcome.window_start is not None and self._healthy():
            self.checkpoints.mark_healthy(outcome.window_start)

    def _healthy(self) -> bool:
        """No suspected spike and no run of skips under way: a checkpoint now is a rollback target."""
        return self.skips.healthy and not self.log.spikes.suspicious

    def _save(self) -> None:
        self.checkpoints.save(healthy=self._healthy())

    def _roll_back(self, divergence: Divergence) -> None:
        assert self.rollback is not None  # invariant: divergences are returned only with rollback on
        event = self.rollback.roll_back(divergence)  # restores the step, epoch and data position
        for component in (self.step, self.skips, self.log):
            component.after_rollback()  # what they held belongs to the abandoned branch
        self.callbacks.call("on_rollback", event)

    def _evaluate(self) -> None:
        assert self.eval_dataloader is not None  # invariant: only called with one
        loss = evaluate(self.accelerator, self.model, self.eval_dataloader, self.step.losses)
        self.record.eval_loss = loss
        if self.diagnostics is not None:
            self.diagnostics.after_evaluation(self.progress.global_step, loss)
        self.accelerator.log({"eval/loss": loss}, step=self.progress.global_step)
        self.callbacks.call("on_validation_end", loss)

    def _stop_for_preemption(self) -> None:
        """Checkpoint now (unless this step has one) and make the loop end after this step."""
        self.preempted = True
        step = self.progress.global_step
        path = None
        if self.checkpoints.enabled:
            if self.checkpoints.last_saved_step != step:
                self._save()
            lasting = self.checkpoints.lasting_path_of(step)  # a temporary folder is removed at the end
            path = None if lasting is None else str(lasting)
        name = self._preemption.name
        kind = "interrupt" if self._preemption.interrupted else "preempt"
        self.reporter.event(Event(kind, step, {"signal": name or "another rank's", "path": path}))
        where = f", checkpoint {path}" if path else " (no checkpoint_dir: nothing saved)"
        logger.warning("safeloop: %s received; stopped after step %d%s", name or "a stop signal", step, where)
