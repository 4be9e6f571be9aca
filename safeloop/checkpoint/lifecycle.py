"""The trainer's checkpoint moments: periodic and final saves, resuming, preemption stops.

A friend of ``SafeTrainer`` (it reads and sets the trainer's run state), so that the trainer's
loop only says *when*; what is saved and restored is in ``trainer_state``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from accelerate.utils import DistributedType

from safeloop.checkpoint.manager import CheckpointManager
from safeloop.checkpoint.store import checkpoint_name
from safeloop.checkpoint.trainer_state import RngSnapshot, apply_trainer, capture_trainer
from safeloop.config import TrainerConfig
from safeloop.errors import ConfigError
from safeloop.results import Event, Finding

if TYPE_CHECKING:
    from safeloop.trainer import SafeTrainer

__all__ = [
    "build_manager",
    "save_checkpoint",
    "poll_checkpoints",
    "close_checkpoints",
    "resume",
    "stop_for_preemption",
    "start_epoch",
]

logger = logging.getLogger("safeloop")


def build_manager(
    config: TrainerConfig, accelerator: Accelerator
) -> tuple[CheckpointManager | None, Finding | None]:
    """The run's checkpoint manager (None without checkpoints) and a note about it, if any.

    ``rollback`` needs checkpoints: without ``checkpoint_dir`` they go to a temporary folder.

    Raises:
        ConfigError: with ``checkpoint_dir`` under FSDP or DeepSpeed (sharded state is planned,
            see docs/checkpoints.md).
    """
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if config.checkpoint_dir is not None and sharded:
        raise ConfigError(
            f"`checkpoint_dir` is set under {accelerator.distributed_type.value}: safeloop checkpoints "
            "hold full (unsharded) model and optimizer state, and sharded state is not written yet. "
            "Use DDP, or leave `checkpoint_dir=None` and save with `accelerator.save_state`."
        )
    if config.checkpoint_dir is None and (not config.rollback or sharded):
        note = None
        if config.rollback:
            note = Finding(
                "rollback-unavailable", "info",
                "rollback needs checkpoints, which are not written under "
                f"{accelerator.distributed_type.value} yet: loss spikes are reported (`loss-spike`), "
                "non-finite runs raise NonFiniteError, and nothing is restored.",
            )  # fmt: skip
        return None, note
    manager = CheckpointManager(
        config.checkpoint_dir,
        accelerator,
        every=config.checkpoint_every,
        keep=config.keep_checkpoints,
        async_save=config.async_checkpoint,
    )
    return manager, None


def save_checkpoint(trainer: SafeTrainer) -> None:
    """Write the checkpoint of the current global step (every process together).

    ``on_checkpoint`` fires once the checkpoint is durable: now, or, for an asynchronous save,
    when :func:`poll_checkpoints` sees the write finished (on the main process).
    """
    manager = trainer._checkpoints
    assert manager is not None  # invariant: only called with checkpoints on
    path = manager.save(capture_trainer(trainer))
    if path is not None:
        _checkpoint_event(trainer, trainer.global_step, path)


def poll_checkpoints(trainer: SafeTrainer) -> None:
    """Report asynchronous saves that have become durable since the last call (no collective)."""
    manager = trainer._checkpoints
    if manager is not None and manager.async_save:
        done, manager.durable = [*manager.durable, *manager.poll()], []
        for step, path in done:
            _checkpoint_event(trainer, step, path)
        manager.raise_failure()


def close_checkpoints(trainer: SafeTrainer) -> None:
    """Wait for the last asynchronous save and report it (every process together)."""
    manager = trainer._checkpoints
    if manager is not None:
        done, manager.durable = [*manager.durable, *manager.close()], []
        for step, path in done:
            _checkpoint_event(trainer, step, path)


def _checkpoint_event(trainer: SafeTrainer, step: int, path: Path) -> None:
    event = Event("checkpoint", step, {"path": str(path)})
    trainer._events.append(event)
    trainer._callbacks.call("on_checkpoint", trainer, event)


def resume(trainer: SafeTrainer, resume_from: str | os.PathLike[str] | None) -> None:
    """Load the checkpoint ``resume_from`` names into the trainer (nothing for None)."""
    if resume_from is None:
        return
    if trainer.config.checkpoint_dir is None and str(resume_from) == "latest":
        raise ConfigError('`fit(resume_from="latest")` needs `checkpoint_dir`; none was given.')
    manager = trainer._checkpoints if trainer.config.checkpoint_dir is not None else None
    manager = manager or CheckpointManager(Path(resume_from).parent, trainer.accelerator, every=1, keep=1)
    found = manager.resolve_and_load(resume_from)
    if found is None:
        message = f"no complete checkpoint in {manager.directory}: starting fresh"
        trainer._add_finding(Finding("resume-fresh-start", "info", message))
        return
    path, saved = found
    apply_trainer(trainer, saved)
    own = trainer._checkpoints
    if own is not None and path.parent.resolve() == own.directory.resolve():
        own.last_saved_step = trainer.global_step
        own.resumed_step = trainer.global_step  # it and the checkpoints before it: this run's past
    # else: a checkpoint from elsewhere; the trainer's folder gets one of the resume step when fit
    # starts (with rollback on), so that a spike before the first periodic save has a target
    trainer._events.append(Event("resume", trainer.global_step, {"path": str(path)}))


def start_epoch(trainer: SafeTrainer) -> tuple[int, dict | None]:
    """Set the RNG for the epoch about to start; return micro-batches to skip and the RNG after.

    A resumed epoch replays the RNG of its start (its shuffle order depends on it), skips the
    micro-batches the checkpoint had consumed, then takes the RNG of the checkpoint itself.
    """
    skip, now_rng = 0, None
    if trainer._resume_position is not None:
        epoch_rng, now_rng = trainer._resume_rng  # type: ignore[misc]
        skip, trainer._resume_position = trainer._resume_position, None
        RngSnapshot.restore(
            epoch_rng if skip and epoch_rng is not None else now_rng, trainer.train_dataloader
        )
    elif trainer._carry_skip:  # the rest of a rollback's skip, from a fresh epoch
        skip, trainer._carry_skip = trainer._carry_skip, 0
    trainer._epoch_rng = RngSnapshot(trainer.train_dataloader) if trainer._checkpoints is not None else None
    return skip, now_rng


def stop_for_preemption(trainer: SafeTrainer) -> None:
    """Checkpoint now (unless this step has one) and make the loop end after this step."""
    trainer._preempted = True
    path = None
    if trainer._checkpoints is not None:
        if trainer._checkpoints.last_saved_step != trainer.global_step:
            save_checkpoint(trainer)
        if not trainer._checkpoints.temporary:  # a temporary folder is removed when fit returns
            path = str(trainer._checkpoints.directory / checkpoint_name(trainer.global_step))
    name = trainer._preemption.name
    trainer._events.append(
        Event("preempt", trainer.global_step, {"signal": name or "another rank's", "path": path})
    )
    where = f", checkpoint {path}" if path else " (no checkpoint_dir: nothing saved)"
    logger.warning("safeloop: %s received; stopped after step %d%s", name, trainer.global_step, where)
