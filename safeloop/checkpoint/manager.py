"""When and where the trainer's checkpoints are written and found (single process for now).

The trainer hands over its state as plain values; this module decides the folder, writes it
through the store, rotates old ones, and resolves ``resume_from``. It never reads a file that a
verified manifest does not list.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from safeloop.checkpoint.state import SavedState, read_state, state_files
from safeloop.checkpoint.store import (
    checkpoint_name,
    latest_valid,
    rotate,
    verify_checkpoint,
    write_checkpoint,
)
from safeloop.errors import CheckpointError

__all__ = ["CheckpointManager"]

logger = logging.getLogger("safeloop")


class CheckpointManager:
    """Writes, rotates and finds the checkpoints of one run.

    Args:
        directory (`str | PathLike`): ``checkpoint_dir``.
        every (`int`): global steps between checkpoints (counted from the run's start).
        keep (`int`): newest checkpoints kept.
    """

    def __init__(self, directory: str | os.PathLike[str], *, every: int, keep: int) -> None:
        self.directory = Path(directory)
        self.every = every
        self.keep = keep
        self.last_saved_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint is due after global step ``step``."""
        return step % self.every == 0 and step != self.last_saved_step

    def save(
        self, step: int, model_state: dict[str, torch.Tensor], parts: dict[str, Any], trainer: dict[str, Any]
    ) -> Path:
        """Write the checkpoint of ``step`` (durable when this returns) and rotate old ones."""
        files = state_files(model_state, parts, trainer)
        path = write_checkpoint(
            self.directory, step, files, meta={"healthy": True, "epoch": trainer.get("epoch")}
        )
        self.last_saved_step = step
        rotate(self.directory, self.keep, protect=[path])
        return path

    def resolve(self, resume_from: str | os.PathLike[str] | None) -> Path | None:
        """Turn ``resume_from`` into a verified checkpoint folder, or None for a fresh start.

        Raises:
            CheckpointError: an explicit folder that is not a valid checkpoint, or ``"latest"``
                when checkpoints with manifests exist and none verifies.
        """
        if resume_from is None:
            return None
        if str(resume_from) == "latest":
            path, warnings = latest_valid(self.directory)
            for warning in warnings:
                logger.warning(warning)
            return path
        check = verify_checkpoint(resume_from)
        if not check.ok:
            raise CheckpointError(
                f"`resume_from={str(resume_from)!r}` is not a valid checkpoint: {check.problem}. "
                f'Pass a folder such as {self.directory / checkpoint_name(500)} or `resume_from="latest"`.'
            )
        return Path(resume_from)

    @staticmethod
    def load(path: Path) -> SavedState:
        """Read a verified checkpoint."""
        return read_state(path)
