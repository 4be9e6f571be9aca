"""The state of one run, as small objects with ``state_dict()`` and ``load_state_dict()``.

Components receive the pieces they need instead of a trainer: ``Progress`` (where the run is)
and ``RunRecord`` (what happened so far). Both are JSON-only; a checkpoint merges their state
dicts with those of the guards into one flat JSON object (``state.json``'s ``"trainer"``), so
each object owns its keys and reads only those back.

What survives a rollback is decided here, in one place: a rollback restores every stateful
object of the checkpoint except the ``RunRecord``, which goes on (:meth:`RunRecord.note_rollback`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from safeloop.report.trace import RunTrace
from safeloop.results import Event

__all__ = ["Stateful", "Progress", "RunRecord"]


class Stateful(Protocol):
    """What a checkpoint holds of an object: a JSON-able dict, and reading it back."""

    def state_dict(self) -> dict[str, Any]:
        """Return the object's state as plain values."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a state returned by :meth:`state_dict` (keys of other objects are ignored)."""
        ...


@dataclass
class Progress:
    """Where the run is: counters every component may read, and only the loop advances.

    Attributes:
        global_step (`int`): optimizer steps completed, skipped ones included.
        epoch (`int`): the current epoch (0-based).
        step_epoch (`int`): the epoch of the last optimizer step (an epoch may end before its
            log step reports it); not saved, it is set again by the next step.
        step_lr (`float`): the first param group's learning rate at the last optimizer step
            (read from the param group, a Python float: no device read).
    """

    global_step: int = 0
    epoch: int = 0
    step_epoch: int = 0
    step_lr: float = 0.0

    def advance(self, lr: float) -> None:
        """Count one optimizer step taken at learning rate ``lr``."""
        self.global_step += 1
        self.step_epoch = self.epoch
        self.step_lr = lr

    def state_dict(self) -> dict[str, Any]:
        """The counters, for checkpoints."""
        return {"global_step": self.global_step, "epoch": self.epoch, "step_lr": self.step_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.step_lr = state["step_lr"]


@dataclass
class RunRecord:
    """What the run has done and measured so far; it goes on across rollbacks.

    Attributes:
        history (`list[dict]`): one entry per log step (``FitResult.history``).
        events (`list[Event]`): what the trainer did, in order.
        eval_loss (`float | None`): the last evaluation loss.
        skipped_steps (`int`): steps the NaN/Inf guard skipped.
        applied_steps (`int`): steps of this ``fit`` whose update the host knows was applied (the
            guard's flag read, at the step or at a log step); a learning rate can only be blamed
            after one. Not saved in checkpoints: a resumed run has applied updates before.
        overflow_skips (`int`): steps the fp16 loss scaler skipped on its own (overflows).
        rollbacks (`int`): rollbacks made.
        lr_scale (`float`): the product of every rollback's learning-rate factor.
        divergences (`list[dict]`): each divergence met (reason, step, numbers, learning rate),
            for the error that ends a run out of rollbacks; not saved in checkpoints.
        trace (`RunTrace`): per-layer values and evaluations, downsampled to a bounded size, for
            ``FitResult.plot`` (fed by the record's writer); not saved in checkpoints: a resume
            starts it again.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    eval_loss: float | None = None
    skipped_steps: int = 0
    applied_steps: int = 0
    overflow_skips: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0
    divergences: list[dict[str, Any]] = field(default_factory=list)
    trace: RunTrace = field(default_factory=RunTrace)

    def note_rollback(self, factor: float) -> float:
        """Count a rollback that scales learning rates by ``factor``; return the new total scale."""
        self.rollbacks += 1
        self.lr_scale *= factor
        return self.lr_scale

    def events_of(self, kind: str) -> list[Event]:
        """The events of one kind, in order."""
        return [event for event in self.events if event.kind == kind]

    def state_dict(self) -> dict[str, Any]:
        """The record as JSON values, for checkpoints."""
        return {
            "history": self.history,
            "events": [event.to_dict() for event in self.events],
            "eval_loss": self.eval_loss,
            "skipped_steps": self.skipped_steps,
            "overflow_skips": self.overflow_skips,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resume; a rollback keeps the record as it is)."""
        self.history = list(state["history"])
        self.events = [Event(e["kind"], e["step"], e["detail"]) for e in state["events"]]
        self.eval_loss = state["eval_loss"]
        self.skipped_steps = int(state["skipped_steps"])
        self.overflow_skips = int(state["overflow_skips"])
        self.rollbacks = int(state.get("rollbacks", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        # its columns point into the history replaced above: what follows the resume is traced anew
        self.trace = RunTrace(settings=self.trace.settings)
