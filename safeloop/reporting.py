"""Reporting what the run measured: the log interval's history entry, trackers, progress bar.

A friend of ``SafeTrainer``: once per ``log_every`` steps it reads the device buffers in one
transfer and turns them into the history entry, tracker values, findings and skip reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safeloop.distributed import reduce_across_processes
from safeloop.rollback import RollbackRequest, check_spikes

if TYPE_CHECKING:
    from safeloop.trainer import SafeTrainer

__all__ = ["report_interval", "start_trackers"]


def report_interval(trainer: SafeTrainer) -> None:
    """Read the buffered metrics on the host (every process together) and report them."""
    diagnostics = trainer._diagnostics
    extra, health_len = (None, 0) if diagnostics is None else diagnostics.measurements()
    record, extra_values = trainer._metrics.collect(
        lambda t: reduce_across_processes(trainer.accelerator, t, "mean"), extra=extra
    )
    if record is None:
        return
    tracked: dict[str, float] = {}
    if diagnostics is not None:
        tracked = diagnostics.check(trainer.global_step, extra_values, health_len, record)
    rollback: RollbackRequest | None = None
    if trainer._guarded and trainer._stepper.device_side:  # skips decided on the device, learnt now
        try:
            for skip in trainer._skips.skipped_in_log(trainer.global_step, record.per_step):
                trainer._on_skip(skip)
        except RollbackRequest as request:
            rollback = request  # raised once this interval is in the history, as a spike's is
    lr = float(trainer._step_lr)
    entry = {
        "step": trainer.global_step,
        "epoch": trainer._step_epoch,
        "loss": record.loss,
        "lr": lr,
        "grad_norm": record.grad_norm,
        "steps_per_sec": record.steps_per_sec,
        "skipped_steps": trainer._skips.tracker.skipped,
        "overflow_skips": trainer._skips.overflow_skips,
        "rollbacks": trainer._rollbacks,
    }
    trainer._history.append(entry)
    trainer.accelerator.log(
        {**{f"train/{k}": v for k, v in entry.items() if k not in ("step", "epoch")}, **tracked},
        step=trainer.global_step,
    )
    trainer._bar.show(record, lr)  # type: ignore[union-attr]
    if rollback is not None:
        raise rollback
    check_spikes(trainer, record)  # last: a rollback it starts leaves this interval reported


def start_trackers(trainer: SafeTrainer) -> None:
    """Start the Accelerate trackers of ``log_with`` when safeloop built the Accelerator."""
    config = trainer.config
    if trainer._owns_accelerator and config.log_with and not trainer.accelerator.trackers:
        settings = {k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))}
        trainer.accelerator.init_trackers("safeloop", config=settings)
