"""What of a ``SafeTrainer`` goes into a checkpoint, and putting it back.

A friend of the trainer: it reads and writes the trainer's counters and guard state, so that
``trainer.py`` only says when to save and restore.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from safeloop.checkpoint.format import capture_rng, restore_rng
from safeloop.checkpoint.manager import Snapshot
from safeloop.checkpoint.state import SavedState

if TYPE_CHECKING:
    from safeloop.trainer import SafeTrainer

__all__ = ["capture_trainer", "apply_trainer", "RngSnapshot", "sampler_generator"]


def sampler_generator(loader: Any) -> torch.Generator | None:
    """The ``torch.Generator`` that decides a dataloader's shuffle order, if it has its own.

    Under several processes Accelerate gives the sampler a generator of its own (drawn from the
    global RNG at ``prepare``) and broadcasts rank 0's state at each ``iter``; a user may pass
    one too. Without one, shuffling draws from the global torch RNG, which is saved anyway.
    """
    paths = (
        "synchronized_generator",
        "sampler.generator",
        "batch_sampler.sampler.generator",
        "batch_sampler.batch_sampler.sampler.generator",  # Accelerate's BatchSamplerShard
        "generator",
    )
    candidates = (_follow(loader, path) for path in paths)
    return next((g for g in candidates if isinstance(g, torch.Generator)), None)


def _follow(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


class RngSnapshot:
    """RNG states of this process at one moment (the start of an epoch, or a checkpoint).

    Args:
        loader (`Any`, *optional*): the training dataloader, whose own shuffle generator and
            epoch counter (Accelerate's ``iteration``) are captured too.
    """

    def __init__(self, loader: Any = None) -> None:
        self.tree, self.tensors = capture_rng()
        generator = sampler_generator(loader)
        if generator is not None:
            self.tensors["sampler_generator"] = generator.get_state()
        iteration = getattr(loader, "iteration", None)
        if isinstance(iteration, int):
            self.tree["loader_iteration"] = iteration

    def as_state(self) -> dict[str, Any]:
        """A state dict for the checkpoint format."""
        return {"tree": self.tree, "tensors": dict(self.tensors)}

    @staticmethod
    def restore(state: dict[str, Any], loader: Any = None) -> None:
        """Put RNG states saved by :meth:`as_state` back (and the dataloader's, when given)."""
        restore_rng(state["tree"], state["tensors"])
        generator = sampler_generator(loader)
        if generator is not None and "sampler_generator" in state["tensors"]:
            generator.set_state(state["tensors"]["sampler_generator"])
        if loader is not None and "loader_iteration" in state["tree"] and hasattr(loader, "iteration"):
            loader.iteration = int(state["tree"]["loader_iteration"])


def capture_trainer(trainer: SafeTrainer, *, healthy: bool = True) -> Snapshot:
    """Return the trainer's state at this step boundary."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    scaler = trainer.accelerator.scaler
    shared = {
        "optimizer": trainer.optimizer.state_dict(),
        "lr_scheduler": None if trainer.lr_scheduler is None else trainer.lr_scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
    }
    rank = {
        "rng": RngSnapshot(trainer.train_dataloader).as_state(),
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
        "lr_scale": trainer._lr_scale,
        "rollbacks": trainer._rollbacks,
        "spike_detector": trainer._spikes.state_dict(),
        "adaptive_clip": None if trainer._adaptive is None else trainer._adaptive.state_dict(),
    }
    from safeloop.rollback import checkpoint_health

    healthy = healthy and checkpoint_health(trainer)
    return Snapshot(
        step=trainer.global_step,
        model=dict(model.state_dict()),
        shared=shared,
        rank=rank,
        trainer=state,
        meta={"healthy": healthy, "epoch": trainer.epoch},
    )


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
    trainer._lr_scale = float(state.get("lr_scale", 1.0))
    trainer._rollbacks = int(state.get("rollbacks", 0))
    if "spike_detector" in state:
        trainer._spikes.load_state_dict(state["spike_detector"])
    if trainer._adaptive is not None and state.get("adaptive_clip") is not None:
        trainer._adaptive.load_state_dict(state["adaptive_clip"], trainer.accelerator.device)
