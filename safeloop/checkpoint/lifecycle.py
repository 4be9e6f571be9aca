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

from safeloop.checkpoint.manager import CheckpointManager
from safeloop.checkpoint.store import checkpoint_name
from safeloop.checkpoint.trainer_state import RngSnapshot, apply_trainer, capture_trainer
from safeloop.config import TrainerConfig
from safeloop.errors import ConfigError
from safeloop.results import Event, Finding

if TYPE_CHECKING:
    from safeloop.trainer import SafeTrainer

__all__ = ["build_manager", "save_checkpoint", "resume", "stop_for_preemption", "start_epoch"]

logger = logging.getLogger("safeloop")


def build_manager(config: TrainerConfig, accelerator: Accelerator) -> CheckpointManager | None:
    """The run's checkpoint manager, or None without ``checkpoint_dir``.

    Raises:
        ConfigError: with ``checkpoint_dir`` on several processes (not implemented yet).
    """
    if config.checkpoint_dir is None:
        return None
    if accelerator.num_processes > 1:
        raise ConfigError(
            f"`checkpoint_dir` is set and the run has {accelerator.num_processes} processes; "
            "multi-process checkpoints are not implemented yet. Leave `checkpoint_dir=None`."
        )
    return CheckpointManager(
        config.checkpoint_dir, every=config.checkpoint_every, keep=config.keep_checkpoints
    )


def save_checkpoint(trainer: SafeTrainer) -> None:
    """Write the checkpoint of the current global step, then fire ``on_checkpoint``."""
    model_state, parts, state = capture_trainer(trainer)
    path = trainer._checkpoints.save(trainer.global_step, model_state, parts, state)  # type: ignore[union-attr]
    event = Event("checkpoint", trainer.global_step, {"path": str(path)})
    trainer._events.append(event)
    trainer._callbacks.call("on_checkpoint", trainer, event)


def resume(trainer: SafeTrainer, resume_from: str | os.PathLike[str] | None) -> None:
    """Load the checkpoint ``resume_from`` names into the trainer (nothing for None)."""
    if resume_from is None:
        return
    if trainer._checkpoints is None and str(resume_from) == "latest":
        raise ConfigError('`fit(resume_from="latest")` needs `checkpoint_dir`; none was given.')
    manager = trainer._checkpoints or CheckpointManager(Path(resume_from).parent, every=1, keep=1)
    path = manager.resolve(resume_from)
    if path is None:
        message = f"no complete checkpoint in {manager.directory}: starting fresh"
        trainer._add_finding(Finding("resume-fresh-start", "info", message))
        return
    apply_trainer(trainer, manager.load(path))
    manager.last_saved_step = trainer.global_step
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
        RngSnapshot.restore(epoch_rng if skip and epoch_rng is not None else now_rng)
    trainer._epoch_rng = RngSnapshot() if trainer._checkpoints is not None else None
    return skip, now_rng


def stop_for_preemption(trainer: SafeTrainer) -> None:
    """Checkpoint now (unless this step has one) and make the loop end after this step."""
    trainer._preempted = True
    path = None
    if trainer._checkpoints is not None:
        if trainer._checkpoints.last_saved_step != trainer.global_step:
            save_checkpoint(trainer)
        path = str(trainer._checkpoints.directory / checkpoint_name(trainer.global_step))
    name = trainer._preemption.name
    trainer._events.append(
        Event("preempt", trainer.global_step, {"signal": name or "another rank's", "path": path})
    )
    where = f", checkpoint {path}" if path else " (no checkpoint_dir: nothing saved)"
    logger.warning("safeloop: %s received; stopped after step %d%s", name, trainer.global_step, where)
