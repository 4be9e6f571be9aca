"""The log step: once per ``log_every`` steps, the buffered metrics read and turned into a report.

Every process runs it at the same step boundary. It reads the device buffers in one transfer
(means over processes), hands the values to the diagnostics, tells the skip handler of steps the
guard decided on the device, writes the history entry, the tracker values and the progress bar,
and feeds the spike detector. It returns what the loop must act on (a divergence), and raises
nothing of its own.

It also keeps the policy's ``NormTrail`` (the global gradient norms that an ``exploding-grad``
before a refused step or a divergence is measured from) fed: each interval's norms, the layers
whose norms rose most at the check, and, for a step refused between two log steps, a read of the
norms not yet read (``MetricBuffer.unread_norms``, at that refused step only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from safeloop.diagnostics.session import Diagnostics
from safeloop.distributed import reduce_across_processes
from safeloop.guards.divergence import Divergence, SpikeDetector
from safeloop.metrics import LogRecord, MetricBuffer
from safeloop.progress import ProgressBar
from safeloop.report.record import RecordWriter
from safeloop.rollback import DivergencePolicy
from safeloop.run_state import Progress, RunRecord
from safeloop.skips import SkipHandler

__all__ = ["LogStep", "LogOutcome"]


@dataclass(frozen=True)
class LogOutcome:
    """What a log step found.

    Attributes:
        divergence (`Divergence | None`): a divergence to roll back from (skips or a spike).
        window_start (`int | None`): the step before the interval's first; when the run is
            healthy after the log step, the checkpoints up to it are known healthy. None when
            there was nothing to read or a divergence was found.
    """

    divergence: Divergence | None = None
    window_start: int | None = None


class LogStep:
    """Reads and reports the steps since the previous log step.

    Args:
        accelerator (`Accelerator`): reduces over processes and logs to the trackers.
        metrics (`MetricBuffer`): the per-step device rows.
        progress (`Progress`): the step, epoch and learning rate the entry is of.
        record (`RunRecord`): where the history entry goes.
        skips (`SkipHandler`, *optional*): told of each step when the guard decides on the
            device (fused optimizers, the fp16 scaler); None when it learns at the step itself.
        spikes (`SpikeDetector`): fed with every applied step's loss.
        divergences (`DivergencePolicy`): what a confirmed spike leads to.
        diagnostics (`Diagnostics`, *optional*): their measurements ride along in the same read.
        run_file (`RecordWriter`, *optional*): the run's record (``metrics.jsonl``), appended the
            entry and the per-layer values, already on the host here.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        metrics: MetricBuffer,
        progress: Progress,
        record: RunRecord,
        *,
        skips: SkipHandler | None,
        spikes: SpikeDetector,
        divergences: DivergencePolicy,
        diagnostics: Diagnostics | None,
        run_file: RecordWriter | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.metrics = metrics
        self.progress = progress
        self.record = record
        self.skips = skips
        self.spikes = spikes
        self.divergences = divergences
        self.diagnostics = diagnostics
        self.run_file = run_file
        divergences.norms.unread = self._unread_norms

    def _unread_norms(self) -> tuple[int, list[float]]:
        """The steps done and the global norms of those not read yet (all processes together)."""

        def mean(tensor: torch.Tensor) -> torch.Tensor:
            return reduce_across_processes(self.accelerator, tensor, "mean")

        return self.progress.global_step, self.metrics.unread_norms(mean)

    def after_rollback(self) -> None:
        """Drop unread measurements and a suspected spike (a rollback undid their steps)."""
        self.metrics.clear()
        self.spikes.reset_run()
        self.divergences.norms.forget_after(self.progress.global_step)
        if self.diagnostics is not None:
            self.diagnostics.forget_interval()

    def run(self, bar: ProgressBar) -> LogOutcome:
        """Read the buffered metrics on the host (every process together) and report them."""
        diagnostics = self.diagnostics
        extra, health_len = (None, 0) if diagnostics is None else diagnostics.measurements()
        record, extra_values = self.metrics.collect(
            lambda t: reduce_across_processes(self.accelerator, t, "mean"), extra=extra
        )
        if record is None:
            return LogOutcome()
        step = self.progress.global_step
        norms = self.divergences.norms
        norms.observe(step, [values.grad_norm for values in record.per_step])
        tracked: dict[str, float] = {}
        if diagnostics is not None:
            tracked = diagnostics.check(step, extra_values, health_len, record, lr=self.progress.step_lr)
        # an exploding-grad reported at a step refused since the last check is told its layers now
        text, names = ("", ()) if diagnostics is None else diagnostics.monitor.layer_rise
        for old, new in norms.name_layers(step, text, names):
            self.divergences.reporter.replace(old, new)
        # skips decided on the device are learnt now; a divergence they confirm is acted on once
        # this interval is in the history, as a spike's is
        divergence = None if self.skips is None else self.skips.learn(step, record.per_step)
        entry = {
            "step": step,
            "epoch": self.progress.step_epoch,
            "loss": record.loss,
            "lr": float(self.progress.step_lr),
            "grad_norm": record.grad_norm,
            "steps_per_sec": record.steps_per_sec,
            "skipped_steps": self.record.skipped_steps,
            "overflow_skips": self.record.overflow_skips,
            "rollbacks": self.record.rollbacks,
        }
        noise_scale = None if diagnostics is None else diagnostics.noise_scale_value
        if noise_scale is not None:  # absent until measured
            entry["gradient_noise_scale"] = noise_scale
        self.record.history.append(entry)
        self.accelerator.log(
            {**{f"train/{k}": v for k, v in entry.items() if k not in ("step", "epoch")}, **tracked},
            step=step,
        )
        if self.run_file is not None:
            self.run_file.log(entry, tracked)
        bar.show(record, entry["lr"])
        if divergence is not None:
            return LogOutcome(divergence)
        return self._check_spikes(record)  # last: a rollback it starts leaves this interval reported

    def _check_spikes(self, record: LogRecord) -> LogOutcome:
        first = self.progress.global_step - len(record.per_step) + 1
        for offset, values in enumerate(record.per_step):
            if values.finite is False or values.overflow:
                continue
            spike = self.spikes.update(first + offset, values.loss, values.grad_norm)
            if spike is not None:
                divergence = self.divergences.on_spike(spike)
                if divergence is not None:
                    return LogOutcome(divergence)
        return LogOutcome(window_start=first - 1)
