"""Checkpointing as one component over stateful objects: save, resume, restore for a rollback.

The trainer hands it the objects to save, each with ``state_dict()`` / ``load_state_dict()``:
the model, the shared training objects (optimizer, scheduler, scaler: tensor trees), the run's
JSON state (counters, record, data position, guard state: merged into one flat object, each
object owning its keys) and each process's own state (its RNG). It knows nothing of the loop or
the trainer; how the files are laid out and written is the manager's business
(``CheckpointManager``), so another backend plugs in here without the loop knowing which.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from safeloop.checkpoint.manager import CheckpointManager, Snapshot
from safeloop.checkpoint.manifest import verify_checkpoint
from safeloop.checkpoint.sharded import SHARD_DIR, SHARD_INFO_PART, ShardedState, dcp_support_problem
from safeloop.checkpoint.spread_hashing import shards_problem
from safeloop.checkpoint.staging import ShardWrite
from safeloop.checkpoint.state import SavedState
from safeloop.checkpoint.store import checkpoint_name, discard_checkpoint, list_checkpoints
from safeloop.checkpoint.zero_state import WHOLE_LAYOUT, ZeroState
from safeloop.config import TrainerConfig
from safeloop.distributed import broadcast_int
from safeloop.errors import CheckpointError, ConfigError
from safeloop.findings import Reporter
from safeloop.results import Event, Finding
from safeloop.run_state import Progress, Stateful

__all__ = ["ENGINE_NAMES", "Checkpointer", "NamedState", "build_manager"]

logger = logging.getLogger("safeloop")
_NONE = -1
# each sharding engine's name in messages (``sharded_engine`` gives the keys)
ENGINE_NAMES = {"fsdp2": "FSDP2", "fsdp1": "FSDP1", "deepspeed": "DeepSpeed"}
_SHARDED_VALUES = "optimizer_values"  # the part of state.json with a sharded optimizer's hyper-parameters


_DCP_LAYOUT = "dcp"  # shard_info's "layout" of DCP shards (also of checkpoints older than the key)


def _layout(shards: ShardedState | ZeroState | None) -> str:
    return WHOLE_LAYOUT if isinstance(shards, ZeroState) else _DCP_LAYOUT


class NamedState:
    """An object's state under one key of the run's JSON state (None: nothing to save).

    Args:
        name (`str`): the key.
        obj (`Stateful`, *optional*): the object; None saves ``{name: None}`` and loads nothing.
    """

    def __init__(self, name: str, obj: Stateful | None) -> None:
        self.name = name
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        """``{name: obj.state_dict()}``."""
        return {self.name: None if self.obj is None else self.obj.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load ``state[name]`` into the object, when both are there."""
        if self.obj is not None and state.get(self.name) is not None:
            self.obj.load_state_dict(state[self.name])


def build_manager(
    config: TrainerConfig,
    accelerator: Accelerator,
    engine: str | None = None,
    engine_problem: str | None = None,
) -> tuple[CheckpointManager | None, Finding | None]:
    """The run's checkpoint manager (None without checkpoints) and a note about it, if any.

    ``rollback`` needs checkpoints: without ``checkpoint_dir`` they go to a temporary folder.

    Args:
        config (`TrainerConfig`): ``checkpoint_dir``, ``rollback`` and the checkpoint settings.
        accelerator (`Accelerator`): the run's processes.
        engine (`str`, *optional*): the sharding engine (``sharded_engine``): FSDP1, FSDP2 and
            DeepSpeed state is written in shards.
        engine_problem (`str`, *optional*): why this engine's state cannot be written here (a
            torch without DCP's safetensors writer, a DeepSpeed without the calls a restore
            needs), or None.

    Raises:
        ConfigError: with ``checkpoint_dir`` when ``engine_problem`` says its state cannot be written.
    """
    name = ENGINE_NAMES.get(engine or "", engine)
    if config.checkpoint_dir is not None and engine_problem:
        raise ConfigError(
            f"`checkpoint_dir` is set under {name}, but {engine_problem}. Or leave "
            "`checkpoint_dir=None` and save with `accelerator.save_state`."
        )
    if config.checkpoint_dir is None and (not config.rollback or engine_problem):
        note = None
        if config.rollback:
            note = Finding(
                "rollback-unavailable", "info",
                f"rollback needs checkpoints, which cannot be written under {name} here "
                f"({engine_problem}): loss spikes are reported (`loss-spike`), non-finite runs "
                "raise NonFiniteError, and nothing is restored.",
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


class Checkpointer:
    """Saves and restores a run's stateful objects through a ``CheckpointManager``.

    Args:
        manager (`CheckpointManager`, *optional*): None when the run writes no checkpoints
            (resuming from a folder still works).
        accelerator (`Accelerator`): the run's processes.
        model (`torch.nn.Module`, *optional*): the unwrapped model; None when ``sharded`` holds it.
        shared (`Mapping[str, Stateful | None]`): ``optimizer`` (unless sharded), ``lr_scheduler``,
            ``scaler``.
        run_state (`Sequence[Stateful]`): JSON state, merged flat (keys must not collide).
        rank_state (`Stateful`): this process's own state (its RNG), in its own file.
        progress (`Progress`): the step and epoch a checkpoint is of.
        reporter (`Reporter`): checkpoint and resume events, ``on_checkpoint``.
        shards (`ShardedState | ZeroState`, *optional*): the model's and optimizer's state in
            shards: through DCP (``ShardedState``: reads a DCP checkpoint at any world size,
            sharded or not; None on a torch without DCP's safetensors reader), or as whole
            tensors under DeepSpeed (``ZeroState``).
        shard_engine (`str`, *optional*): the sharding engine (``"fsdp2"``, ``"fsdp1"``,
            ``"deepspeed"``) when the model and optimizer are saved as shards, every process its
            own, into the checkpoint's ``shards/``; None saves them whole.
    """

    def __init__(
        self,
        manager: CheckpointManager | None,
        accelerator: Accelerator,
        *,
        model: torch.nn.Module | None,
        shared: Mapping[str, Stateful | None],
        run_state: Sequence[Stateful],
        rank_state: Stateful,
        progress: Progress,
        reporter: Reporter,
        shards: ShardedState | ZeroState | None = None,
        shard_engine: str | None = None,
    ) -> None:
        self.manager = manager
        if shard_engine and shards is None:  # a wiring mistake: the model would not be saved at all
            raise ValueError("shard_engine needs the ShardedState that writes the shards")
        self.shards = shards
        self.shard_engine = shard_engine
        self.accelerator = accelerator
        self.model = model
        self.shared = dict(shared)
        self.run_state = tuple(run_state)
        self.rank_state = rank_state
        self.progress = progress
        self.reporter = reporter

    @property
    def enabled(self) -> bool:
        """Whether this run writes checkpoints."""
        return self.manager is not None

    @property
    def directory(self) -> Path | None:
        """The checkpoint folder (a temporary one when ``checkpoint_dir`` was None), or None."""
        return None if self.manager is None else self.manager.directory

    @property
    def last_saved_step(self) -> int | None:
        """The step of the newest checkpoint written or restored by this run."""
        return None if self.manager is None else self.manager.last_saved_step

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint is due after global step ``step``."""
        return self.manager is not None and self.manager.due(step)

    def path_of(self, step: int) -> Path:
        """The folder of the checkpoint of ``step`` (checkpoints on)."""
        assert self.manager is not None  # invariant: only asked with checkpoints on
        return self.manager.directory / checkpoint_name(step)

    def lasting_path_of(self, step: int) -> Path | None:
        """Like :meth:`path_of`, None when the folder is temporary (removed when ``fit`` returns)."""
        if self.manager is None or self.manager.temporary:
            return None
        return self.path_of(step)

    # -- saving ----------------------------------------------------------------------------

    def save(self, *, healthy: bool) -> None:
        """Write the checkpoint of the current step (every process together).

        ``on_checkpoint`` fires once the checkpoint is durable: now, or, for an asynchronous save,
        when :meth:`poll` sees the write finished (on the main process).

        Args:
            healthy (`bool`): no suspected spike or skip run under way (a rollback target).
        """
        assert self.manager is not None  # invariant: only called with checkpoints on
        path = self.manager.save(self._snapshot(healthy))
        if path is not None:
            self._announce(self.progress.global_step, path)

    def poll(self) -> None:
        """Report asynchronous saves that have become durable since the last call (no collective)."""
        manager = self.manager
        if manager is not None and manager.async_save:
            done, manager.durable = [*manager.durable, *manager.poll()], []
            for step, path in done:
                self._announce(step, path)
            manager.raise_failure()

    def close(self) -> None:
        """Wait for the last asynchronous save and report it (every process together)."""
        manager = self.manager
        if manager is not None:
            done, manager.durable = [*manager.durable, *manager.close()], []
            for step, path in done:
                self._announce(step, path)

    def remove_temporary(self) -> None:
        """Delete a temporary checkpoint folder (no collective: safe on an error path)."""
        if self.manager is not None:
            self.manager.remove_temporary()

    def mark_healthy(self, up_to: int) -> None:
        """Every checkpoint up to step ``up_to`` is known healthy now: keep the newest from rotation."""
        if self.manager is None:
            return
        known = [step for step in self.manager.saved_steps if step <= up_to]
        if known:
            self.manager.protected_step = max(known)

    def _snapshot(self, healthy: bool) -> Snapshot:
        state: dict[str, Any] = {}
        for obj in self.run_state:
            part = obj.state_dict()
            clash = state.keys() & part.keys()
            if clash:  # a wiring mistake: two objects would overwrite each other's state
                raise RuntimeError(f"run state keys saved twice: {sorted(clash)}")
            state.update(part)
        shared = {name: None if obj is None else obj.state_dict() for name, obj in self.shared.items()}
        model, write_shards, stage_shards = None, None, None
        meta: dict[str, Any] = {"healthy": healthy, "epoch": self.progress.epoch}
        if self.shard_engine:
            meta["engine"] = self.shard_engine
            assert self.shards is not None  # invariant: checked in __init__
            taken = self.shards.capture()
            shared[_SHARDED_VALUES] = taken.values  # hyper-parameters: JSON, never handed to DCP
            shared[SHARD_INFO_PART] = {
                "shapes": taken.shapes,
                "fresh_optimizer": taken.fresh_optimizer,
                "layout": _layout(self.shards),
            }
            shard_write = ShardWrite(self.shards, taken.tensors)  # staged by an asynchronous save
            write_shards, stage_shards = shard_write.write, shard_write.stage
        elif self.model is not None:
            model = dict(self.model.state_dict())
        return Snapshot(
            step=self.progress.global_step,
            model=model,
            shared=shared,
            rank=self.rank_state.state_dict(),
            trainer=state,
            meta=meta,
            write_shards=write_shards,
            stage_shards=stage_shards,
        )

    def _announce(self, step: int, path: Path) -> None:
        self.reporter.event(Event("checkpoint", step, {"path": str(path)}), "on_checkpoint")

    # -- loading ---------------------------------------------------------------------------

    def resume(self, resume_from: str | os.PathLike[str] | None) -> None:
        """Load the checkpoint ``resume_from`` names (nothing for None).

        Raises:
            ConfigError: ``"latest"`` without ``checkpoint_dir``.
            CheckpointError: ``resume_from`` names no valid checkpoint.
        """
        if resume_from is None:
            return
        own = None if self.manager is None or self.manager.temporary else self.manager
        if own is None and str(resume_from) == "latest":
            raise ConfigError('`fit(resume_from="latest")` needs `checkpoint_dir`; none was given.')
        manager = own or CheckpointManager(Path(resume_from).parent, self.accelerator, every=1, keep=1)
        found = manager.resolve_and_load(resume_from)
        if found is None:
            message = f"no complete checkpoint in {manager.directory}: starting fresh"
            self.reporter.add(Finding("resume-fresh-start", "info", message))
            return
        path, saved = found
        self._apply(saved)
        step = self.progress.global_step
        if own is not None and path.parent.resolve() == own.directory.resolve():
            own.last_saved_step = step
            own.resumed_step = step  # it and the checkpoints before it: this run's past
        # else: a checkpoint from elsewhere; the run's folder gets one of the resume step when
        # fit starts (with rollback on), so that a spike before the first periodic save has a target
        self.reporter.event(Event("resume", step, {"path": str(path)}))

    def rollback_target(self, before: int) -> int | None:
        """The newest healthy checkpoint of this run before step ``before`` (every process together)."""
        manager = self.manager
        assert manager is not None  # invariant: rollback on means checkpoints on
        manager.durable.extend(manager.poll(wait=True))  # an asynchronous save must be whole first
        refused: set[int] = set()  # main process: candidates whose shards did not verify
        while True:
            target = _NONE
            if self.accelerator.is_main_process:  # every file but the shards, hashed below by all
                for step, path in reversed(list_checkpoints(manager.directory)):
                    if step >= before or not manager.in_lineage(step) or step in refused:
                        continue  # after the anomaly, another run's (a stale folder), or damaged
                    check = verify_checkpoint(path, shards=False)
                    if check.ok and (check.manifest or {}).get("meta", {}).get("healthy", True):
                        target = step
                        break
                    if check.complete:
                        logger.warning(
                            "safeloop: rollback passes over %s: %s", path.name, check.problem or "unhealthy"
                        )
            target = broadcast_int(self.accelerator, target)
            if target == _NONE:
                return None
            problem = shards_problem(self.accelerator, manager.directory / checkpoint_name(target))
            if not problem:
                return target
            if self.accelerator.is_main_process:
                logger.warning("safeloop: rollback passes over %s: %s", checkpoint_name(target), problem)
                refused.add(target)

    def restore_step(self, step: int, *, keep: Sequence[Stateful] = ()) -> dict[str, Any]:
        """Load the checkpoint of ``step`` into every object but ``keep``; drop those after it.

        Returns:
            `dict`: the checkpoint's JSON run state, as saved.
        """
        manager = self.manager
        assert manager is not None  # invariant: rollback on means checkpoints on
        saved = manager.load_step(step)
        self._apply(saved, keep)
        if self.accelerator.is_main_process:  # the diverged branch's checkpoints must never be resumed
            for later, path in list_checkpoints(manager.directory):
                if later > step:
                    discard_checkpoint(path)
        manager.saved_steps = [s for s in manager.saved_steps if s <= step]
        manager.last_saved_step = step
        return saved.trainer

    def _check_layout(self, saved: SavedState, layout: str) -> None:
        """Refuse a sharded checkpoint this run's engine cannot read, naming both sides."""
        live = _layout(self.shards)
        if layout == live:
            return
        written = "under DeepSpeed (whole tensors)" if layout == WHOLE_LAYOUT else "under FSDP (DCP shards)"
        here = "under DeepSpeed" if live == WHOLE_LAYOUT else "not under DeepSpeed"
        raise CheckpointError(
            f"{saved.path} was written {written} by {saved.world_size} processes; this run is {here} "
            f"on {self.accelerator.num_processes}. A DeepSpeed checkpoint resumes under DeepSpeed "
            "(any world size, ZeRO stage 1-3), an FSDP one without DeepSpeed (FSDP at any world "
            "size, DDP, one process). Resume it the way it was written, or take its weights with "
            "`safeloop consolidate CHECKPOINT OUT_DIR` and start afresh from them."
        )

    def _apply(self, saved: SavedState, keep: Sequence[Stateful] = ()) -> None:
        values = saved.parts.get(_SHARDED_VALUES)
        info = saved.parts.get(SHARD_INFO_PART) or {}
        if values is not None:  # a sharded checkpoint: read at any world size
            if self.shards is None or saved.path is None:
                raise CheckpointError(
                    f"{saved.path} is sharded and this torch cannot read it: {dcp_support_problem()}"
                )
            self._check_layout(saved, info.get("layout", _DCP_LAYOUT))
            fresh = bool(info.get("fresh_optimizer"))
            self.shards.load(saved.path / SHARD_DIR, values, fresh)  # a collective: every process
        elif self.shard_engine:  # whole tensors, from one process or DDP, sharded out here
            assert self.shards is not None  # invariant: checked in __init__
            if isinstance(self.shards, ZeroState):
                raise CheckpointError(
                    f"{saved.path} was written without DeepSpeed (one process, DDP); this run is "
                    "under DeepSpeed, which loads only checkpoints written under DeepSpeed (at any "
                    "world size and ZeRO stage). Resume it the way it was written, or load its "
                    "model.safetensors into the model before `SafeTrainer` and start afresh."
                )
            optimizer = saved.parts.get("optimizer")
            if optimizer is None:
                raise CheckpointError(f"{saved.path} holds no optimizer state")
            self.shards.load_whole(saved.model, optimizer)
        elif self.model is not None:
            self.model.load_state_dict(saved.model)
        for name, obj in self.shared.items():
            part = saved.parts.get(name)
            if name == "optimizer" and values is not None:
                continue  # read from the shards, with the model
            if obj is not None and part is not None:
                obj.load_state_dict(part)
            elif obj is not None and name == "optimizer":
                raise CheckpointError("the checkpoint holds no optimizer state")
        for obj in self.run_state:
            if not any(obj is kept for kept in keep):
                obj.load_state_dict(saved.trainer)
        self.rank_state.load_state_dict(saved.parts)
