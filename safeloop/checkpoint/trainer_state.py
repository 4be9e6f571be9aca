"""What of a ``SafeTrainer`` goes into a checkpoint, and putting it back.

A friend of the trainer: it reads and writes the trainer's counters and guard state, so that
``trainer.py`` only says when to save and restore.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from safeloop.checkpoint.format import capture_rng, restore_rng
from safeloop.checkpoint.state import SavedState

if TYPE_CHECKING:
    from safeloop.trainer import SafeTrainer

__all__ = ["capture_trainer", "apply_trainer", "RngSnapshot"]


class RngSnapshot:
    """RNG states of this process at one moment (the start of an epoch, or a checkpoint)."""

    def __init__(self) -> None:
        self.tree, self.tensors = capture_rng()

    def as_state(self) -> dict[str, Any]:
        """A state dict for the checkpoint format."""
        return {"tree": self.tree, "tensors": dict(self.tensors)}

    @staticmethod
    def restore(state: dict[str, Any]) -> None:
        """Put RNG states saved by :meth:`as_state` back."""
        restore_rng(state["tree"], state["tensors"])


def capture_trainer(trainer: SafeTrainer) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Return the model state, the other state dicts, and the trainer's JSON state."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    scaler = trainer.accelerator.scaler
    parts = {
        "optimizer": trainer.optimizer.state_dict(),
        "lr_scheduler": None if trainer.lr_scheduler is None else trainer.lr_scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": RngSnapshot().as_state(),
        "rng_epoch_start": trainer._epoch_rng.as_state() if trainer._epoch_rng is not None else None,
    }
    tracker = trainer._skips.tracker
    state = {
        "global_step": trainer.global_step,
        "epoch": trainer.epoch,
        "batch_in_epoch": trainer._batch_in_epoch,
        "skipped_steps": tracker.skipped,
        "consecutive_skips": tracker.consecutive,
        "overflow_skips": trainer._skips.overflow_skips,
        "preflight_done": trainer._preflight_done,
        "history": trainer._history,
        "events": [event.to_dict() for event in trainer._events],
        "eval_loss": trainer._eval_loss,
        "step_lr": trainer._step_lr,
    }
    return dict(model.state_dict()), parts, state


def apply_trainer(trainer: SafeTrainer, saved: SavedState) -> None:
    """Load a checkpoint's state into the trainer (model, optimizer, scheduler, scaler, counters).

    The RNG states are applied by the trainer when the resumed epoch has skipped to its position.
    """
    from safeloop.results import Event

    model = trainer.accelerator.unwrap_model(trainer.model)
    model.load_state_dict(saved.model)
    trainer.optimizer.load_state_dict(saved.parts["optimizer"])
    if trainer.lr_scheduler is not None and saved.parts.get("lr_scheduler") is not None:
        trainer.lr_scheduler.load_state_dict(saved.parts["lr_scheduler"])
    if trainer.accelerator.scaler is not None and saved.parts.get("scaler") is not None:
        trainer.accelerator.scaler.load_state_dict(saved.parts["scaler"])
    state = saved.trainer
    trainer.global_step = int(state["global_step"])
    trainer.epoch = int(state["epoch"])
    trainer._resume_position = int(state["batch_in_epoch"])
    trainer._resume_rng = (saved.parts.get("rng_epoch_start"), saved.parts["rng"])
    tracker = trainer._skips.tracker
    tracker.skipped = int(state["skipped_steps"])
    tracker.consecutive = int(state["consecutive_skips"])
    trainer._skips.overflow_skips = int(state["overflow_skips"])
    trainer._preflight_done = bool(state["preflight_done"])
    trainer._history = list(state["history"])
    trainer._events = [Event(e["kind"], e["step"], e["detail"]) for e in state["events"]]
    trainer._eval_loss = state["eval_loss"]
    trainer._step_lr = state["step_lr"]
