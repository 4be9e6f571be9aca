"""Where the run is in its data: the position in the epoch, the RNG, and batches to fast-forward.

One object owns the data position, so that a resume and a rollback move it the same way: both
load a position (micro-batches of the epoch already consumed) and the RNG states that go with
it; a rollback adds the batches it skips past the divergence. The next epoch then draws the
consumed batches again without running them (the shuffle order and the loader's state match the
run it continues), and puts back the RNG of the checkpoint once the last one is drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from safeloop.batch_errors import collate_problem
from safeloop.checkpoint.format import capture_rng, restore_rng
from safeloop.errors import ConfigError

__all__ = ["DataCursor", "RngSnapshot", "sampler_generator"]


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


class _RankState:
    """The cursor's per-process part of a checkpoint: this process's RNG states."""

    def __init__(self, cursor: DataCursor) -> None:
        self._cursor = cursor

    def state_dict(self) -> dict[str, Any]:
        cursor = self._cursor
        return {
            "rng": RngSnapshot(cursor.loader).as_state(),
            "rng_epoch_start": None if cursor.epoch_rng is None else cursor.epoch_rng.as_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cursor.pending_rng = (state.get("rng_epoch_start"), state["rng"])


class DataCursor:
    """The position of a run in its training data, and the batches still to fast-forward.

    Args:
        loader (`Any`): the prepared training dataloader.
        keep_epoch_rng (`bool`): capture the RNG at each epoch start (needed to resume an epoch
            mid-way: its shuffle order depends on it); on when checkpoints are written.

    Attributes:
        batch_in_epoch (`int`): micro-batches of the current epoch drawn so far, skipped ones
            included.
        epoch_rng (`RngSnapshot | None`): the RNG at the start of the current epoch.
        pending (`int | None`): micro-batches the next epoch start fast-forwards past (a resume
            or a rollback), None when there is none.
        pending_rng (`tuple | None`): the RNG at the start of that epoch and at the position.
        carry (`int`): fast-forward left over when the last one ran past an epoch's end.
        rank_state (`Stateful`): this process's RNG states, for its own checkpoint file.
    """

    def __init__(self, loader: Any, *, keep_epoch_rng: bool) -> None:
        self.loader = loader
        self.keep_epoch_rng = keep_epoch_rng
        self.batch_in_epoch = 0
        self.epoch_rng: RngSnapshot | None = None
        self.pending: int | None = None
        self.pending_rng: tuple[dict[str, Any] | None, dict[str, Any]] | None = None
        self.carry = 0
        self.drawn = 0  # micro-batches the last epoch's loader yielded
        self.rank_state = _RankState(self)

    def fast_forward(self, batches: int) -> None:
        """Skip ``batches`` more micro-batches past the loaded position (a rollback's data skip)."""
        self.pending = (self.pending or 0) + batches

    def epoch_batches(self) -> Iterator[tuple[int, Any]]:
        """Yield ``(batch_idx, batch)`` for the micro-batches of one epoch that are to run.

        Batches before the position are drawn but not yielded. The loader's iterator is closed
        when this generator is (its workers end now, not at collection); ``drawn`` then holds
        the micro-batches the loader yielded, when it ran to its end.
        """
        skip, now_rng = self._start_epoch()
        batches = iter(self.loader)
        seen = 0
        try:
            for batch_idx, batch in enumerate(batches):
                seen = batch_idx + 1
                self.batch_in_epoch = seen
                if batch_idx < skip:
                    if seen == skip and now_rng is not None:
                        RngSnapshot.restore(now_rng, self.loader)
                    continue
                yield batch_idx, batch
        except (TypeError, RuntimeError) as exc:  # torch's collate refusing a PIL image, a None: say so
            problem = collate_problem(exc)
            if problem is None:
                raise
            raise ConfigError(problem) from exc
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        self.drawn = seen
        if skip > seen:  # a rollback's skip runs past the epoch's end: it goes on in the next one
            if now_rng is not None:
                RngSnapshot.restore(now_rng, self.loader)
            self.carry = skip - seen

    def end_epoch(self) -> None:
        """The epoch ran to its end: the next one starts at its first batch."""
        self.batch_in_epoch = 0

    def _start_epoch(self) -> tuple[int, dict[str, Any] | None]:
        # A resumed epoch replays the RNG of its start (its shuffle order depends on it), skips
        # the micro-batches the checkpoint had consumed, then takes the RNG of the checkpoint.
        skip, now_rng = 0, None
        if self.pending is not None:
            epoch_rng, now_rng = self.pending_rng or (None, None)
            skip, self.pending, self.pending_rng = self.pending, None, None
            start = epoch_rng if skip and epoch_rng is not None else now_rng
            if start is not None:
                RngSnapshot.restore(start, self.loader)
        elif self.carry:  # the rest of a rollback's skip, from a fresh epoch
            skip, self.carry = self.carry, 0
        self.drawn = 0
        self.epoch_rng = RngSnapshot(self.loader) if self.keep_epoch_rng else None
        return skip, now_rng

    def state_dict(self) -> dict[str, Any]:
        """The position, for checkpoints (the RNG goes in each process's file: ``rank_state``)."""
        return {"batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next epoch start fast-forward to the saved position."""
        self.pending = int(state["batch_in_epoch"])
        self.carry = 0
