"""When and where the trainer's checkpoints are written and found, on any number of processes.

The trainer hands over its state as plain values (:class:`Snapshot`); this module decides the
folder, has every process write its own file, has the main process write the shared files and
publish the checkpoint, rotates old ones, and resolves ``resume_from``. Every public method is a
collective: all processes call it together. It never reads a file a manifest does not list.

Protocol of one save (``checkpoint_dir`` must be one folder all processes see):
1. the main process makes the temporary folder; every process learns whether it could;
2. every process writes and fsyncs ``rank-NNNNN.safetensors``; all agree that all did;
   with sharded state, every process then writes, fsyncs and hashes its shard files, all agree
   that all did, and the digests are gathered (``spread_hashing.gather_shard_digests``);
3. the main process writes the shared files, lists every file in the manifest and renames the
   folder into place (in a background thread with ``async_save``); all agree that it did.

With ``async_save``, sharded state and several processes, step 2's shards are only copied to
host memory at the step boundary (all agree that all could); writing them, gathering their
digests and step 3 run in a background thread on every process (``background.py``).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from safeloop.checkpoint.background import BackgroundShardSave, Publish, SideGroup, shard_write_problem
from safeloop.checkpoint.sharded import DCP_ERRORS, SHARD_DIR
from safeloop.checkpoint.spread_hashing import gather_shard_digests, shards_problem
from safeloop.checkpoint.state import SavedState, rank_file, read_state, state_files
from safeloop.checkpoint.store import CheckpointWriter, checkpoint_name, list_checkpoints
from safeloop.distributed import agree_any, broadcast_int
from safeloop.errors import CheckpointError

__all__ = ["CheckpointManager", "Snapshot"]

logger = logging.getLogger("safeloop")

# broadcast codes of ``resolve`` (steps are >= 0)
_FRESH, _FAILED = -1, -2


@dataclass(frozen=True)
class Snapshot:
    """The state of one process at a step boundary, as plain values.

    Attributes:
        step (`int`): the global step.
        model (`dict[str, Tensor]`): the unwrapped model's state dict (shared).
        shared (`dict[str, Any]`): optimizer, scheduler and scaler state dicts (None if absent).
        rank (`dict[str, Any]`): this process's RNG states.
        trainer (`dict[str, Any]`): the trainer's counters and guard state (JSON values).
        meta (`dict[str, Any]`): facts for the manifest (``healthy``, ``epoch``).
        write_shards (`Callable[..., dict[str, list[str]] | None]`, *optional*): sharded
            model and optimizer state (FSDP, DeepSpeed): every process writes its shards into the
            folder it is given (a collective, over the process group given second, else the
            default one) and returns the chunk digests it took of its files while writing them,
            by name (None: they are hashed from disk); ``model`` is then None.
        stage_shards (`Callable[[], None]`, *optional*): copies the shards ``write_shards``
            writes to host memory that nothing else holds, so that they can be written while
            training goes on; without it an asynchronous save writes them at the step boundary.
    """

    step: int
    model: dict[str, torch.Tensor] | None
    shared: dict[str, Any]
    rank: dict[str, Any]
    trainer: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    write_shards: Callable[..., dict[str, list[str]] | None] | None = None
    stage_shards: Callable[[], None] | None = None


class CheckpointManager:
    """Writes, rotates and finds the checkpoints of one run.

    Args:
        directory (`str | PathLike`, *optional*): ``checkpoint_dir``; None makes a temporary
            folder, removed by :meth:`close`.
        accelerator (`Accelerator`): the run's processes.
        every (`int`): global steps between checkpoints (counted from the run's start).
        keep (`int`): newest checkpoints kept.
        async_save (`bool`, *optional*, defaults to False): the main process writes the shared
            files in a background thread, and with several processes every process writes its
            shards in one (one save in flight at most; an error surfaces at the next save, at
            :meth:`close`, or at :meth:`poll` with one process).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        accelerator: Accelerator,
        *,
        every: int,
        keep: int,
        async_save: bool = False,
    ) -> None:
        self.accelerator = accelerator
        self.temporary = directory is None
        self.directory = _temporary_folder(accelerator) if directory is None else Path(directory)
        self.every = every
        self.keep = keep
        self.async_save = async_save
        self.last_saved_step: int | None = None
        self.saved_steps: list[int] = []  # written in this run
        self.resumed_step: int | None = None  # the checkpoint of this folder the run resumed from
        self.protected_step: int | None = None  # the newest checkpoint known healthy: never rotated
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: tuple[int, Future[Path | None]] | None = None
        self._side = SideGroup()  # the background saves' own process group, made when first needed
        self._failure = ""
        self.durable: list[tuple[int, Path]] = []  # async saves finished inside save(), to report

    def in_lineage(self, step: int) -> bool:
        """Whether the checkpoint of ``step`` in this folder belongs to this run's history.

        Those written by this run, and those up to the one it resumed from (its past). Others
        (another run's, or a branch beyond the resumed step) must never be restored.
        """
        return step in self.saved_steps or (self.resumed_step is not None and step <= self.resumed_step)

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint is due after global step ``step``."""
        return step % self.every == 0 and step != self.last_saved_step

    # -- saving ----------------------------------------------------------------------------

    def save(self, snapshot: Snapshot) -> Path | None:
        """Write the checkpoint of ``snapshot.step``; return its folder once it is durable.

        With ``async_save`` the main process returns None at once; :meth:`poll` reports the
        folder when the write is durable. With sharded state on several processes, every
        process returns once its shards are copied to host memory and writes them in the
        background (``background.py``).

        Raises:
            CheckpointError: on every process, when any process failed to write its part.
        """
        self.durable.extend(self._finish_inflight())  # at most one save in flight
        if self.async_save:  # a failed background write is raised before a new one starts
            self._agree("", "finishing the previous save", snapshot.step)
        acc = self.accelerator
        main = acc.is_main_process
        writer: CheckpointWriter | None = None
        problem = ""
        try:
            if main:
                writer = CheckpointWriter(self.directory, snapshot.step)
        except OSError as err:
            problem = f"cannot create a folder in {self.directory}: {err}"
        self._agree(problem, "preparing the checkpoint folder", snapshot.step)
        try:  # every process writes its own RNG file into the folder the main process made
            writer = writer or CheckpointWriter(self.directory, snapshot.step, create=False)
            writer.add(*rank_file(acc.process_index, snapshot.rank))
            writer.wait()
        except (OSError, CheckpointError) as err:
            problem = f"process {acc.process_index} could not write its file: {err}"
        self._agree(problem, "writing the per-process files", snapshot.step)
        shard_digests: dict[str, list[str] | None] = {}
        files: dict[str, Any] | None = None
        background = self._in_background(snapshot)
        if background:  # the boundary waits for the copies only; the shards are written behind it
            try:
                snapshot.stage_shards()  # type: ignore[misc]  # set when in the background
                if main:  # before the agreement: past it, every process has its part in flight
                    files = state_files(snapshot.model, snapshot.shared, snapshot.trainer, copy=True)
            except (RuntimeError, OSError, TypeError, CheckpointError) as err:  # out of host memory, a bug
                problem = f"process {acc.process_index} could not copy its state to host memory: {err}"
            self._agree(problem, "copying the model and optimizer shards to host memory", snapshot.step)
        elif snapshot.write_shards is not None:
            written: dict[str, list[str]] = {}
            try:  # every process its own shards, into the folder's shards/ (DCP: a collective)
                written = snapshot.write_shards(writer.tmp / SHARD_DIR) or {}
            except DCP_ERRORS as err:
                problem = shard_write_problem(err, acc.process_index)
            self._agree(problem, "writing the model and optimizer shards", snapshot.step)
            # the digests each process took while writing, gathered (a collective); files no
            # writer hashed are hashed by all processes, or with async_save by the main process
            # in the background, with the rest
            shard_digests, problem = gather_shard_digests(
                acc, writer.tmp, written, hash_rest=not self.async_save
            )
            self._agree(problem, "hashing the shards", snapshot.step)
        self.last_saved_step = snapshot.step
        self.saved_steps.append(snapshot.step)
        job: Publish | None = None
        if main:
            if files is None:
                files = state_files(snapshot.model, snapshot.shared, snapshot.trainer, copy=self.async_save)
            job = Publish(
                writer, files, acc.num_processes, snapshot.meta, self.keep, self._protect(), shard_digests,
            )  # fmt: skip
        if background:
            group = self._side.get()  # every process, at the same point (a collective when made)
            assert snapshot.write_shards is not None  # invariant: checked by _in_background
            shards = BackgroundShardSave(acc, group, writer.tmp, snapshot.write_shards, job)
            self._submit(snapshot.step, shards.run)
            return None
        if not main:
            if not self.async_save:
                self._agree("", "publishing the checkpoint", snapshot.step)
            return None if self.async_save else self.directory / checkpoint_name(snapshot.step)
        assert job is not None  # invariant: made on the main process
        if self.async_save:
            self._submit(snapshot.step, job.run)
            return None
        path = None
        try:
            path = job.run()
        except (OSError, CheckpointError) as err:
            problem = f"the main process could not publish it: {err}"
        self._agree(problem, "publishing the checkpoint", snapshot.step)
        return path

    def _in_background(self, snapshot: Snapshot) -> bool:
        # the same answer on every process: the settings and the engine are the run's
        return (
            self.async_save
            and self.accelerator.num_processes > 1
            and snapshot.write_shards is not None
            and snapshot.stage_shards is not None
        )

    def _submit(self, step: int, job: Callable[[], Path | None]) -> None:
        self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="safeloop-save")
        self._inflight = (step, self._pool.submit(job))

    def poll(self, wait: bool = False) -> list[tuple[int, Path]]:
        """Return ``(step, folder)`` of an asynchronous save that has become durable.

        The main process reports it. The other processes have saves in flight only for sharded
        state (their shards), and report nothing. A failed background write is kept and raised
        by :meth:`raise_failure` (at once with one process; at the next collective call with
        several, so that every process raises together).
        """
        if self._inflight is None or not (wait or self._inflight[1].done()):
            return []
        step, future = self._inflight
        self._inflight = None
        try:
            path = future.result()
        except (OSError, CheckpointError) as err:
            self._failure = f"the asynchronous save of step {step} to {self.directory} failed: {err}"
            return []
        return [] if path is None else [(step, path)]

    def raise_failure(self) -> None:
        """Raise a failed asynchronous save now (single process; see :meth:`poll`)."""
        if self._failure and self.accelerator.num_processes == 1:
            self._agree("", "", 0)

    def _finish_inflight(self) -> list[tuple[int, Path]]:
        return self.poll(wait=True) if self._inflight is not None else []

    def _protect(self) -> list[Path]:
        if self.protected_step is None:
            return []
        return [self.directory / checkpoint_name(self.protected_step)]

    def _agree(self, problem: str, stage: str, step: int) -> None:
        # doubles as the barrier between stages: nobody goes on before every process got here
        if self._failure:  # an earlier background write failed: every process raises it now
            failure, self._failure = self._failure, ""
            agree_any(self.accelerator, True)
            raise CheckpointError(
                f"{failure}. The previous checkpoints are intact; free space or fix permissions, then resume."
            )
        if agree_any(self.accelerator, bool(problem)):
            raise CheckpointError(
                f"checkpoint of step {step} failed while {stage}"
                + (f": {problem}" if problem else " on another process (see its log)")
                + ". The previous checkpoints are intact."
            )

    # -- finding and loading ---------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints in the folder (manifest present), oldest first."""
        return [step for step, path in list_checkpoints(self.directory) if (path / "manifest.json").is_file()]

    def resolve_and_load(self, resume_from: str | os.PathLike[str]) -> tuple[Path, SavedState] | None:
        """Load ``resume_from`` (a folder, or ``"latest"``) on every process; None: start fresh.

        The main process finds and verifies the checkpoint (falling back past damaged ones with
        a warning naming the file) and tells the others which one; all processes then hash its
        shards together (each its share), and each reads its own RNG file.

        Raises:
            CheckpointError: an explicit folder that is not a valid checkpoint, or ``"latest"``
                when checkpoints with manifests exist and none verifies.
        """
        acc = self.accelerator
        latest = str(resume_from) == "latest"
        refused: dict[int, str] = {}  # main process: candidates whose shards did not verify
        while True:
            found: tuple[Path, SavedState] | None = None
            error: CheckpointError | None = None
            if acc.is_main_process:  # every file but the shards, which all processes hash below
                try:
                    found = self._load_latest(refused) if latest else self._load_folder(Path(resume_from))
                except CheckpointError as err:
                    error = err
            code = _FAILED if error else (_FRESH if found is None else int(found[1].trainer["global_step"]))
            code = broadcast_int(acc, code)
            if code == _FAILED:
                raise error or CheckpointError(
                    f"the main process found no valid checkpoint for resume_from={str(resume_from)!r}; "
                    "see its log."
                )
            if code == _FRESH:
                return None
            path = self.directory / checkpoint_name(code) if latest else Path(resume_from)
            problem = shards_problem(acc, path)  # a collective: each process hashes its share
            if not problem:
                break
            if not latest:
                raise CheckpointError(f"`resume_from={str(path)!r}` is not a valid checkpoint: {problem}")
            if acc.is_main_process:
                logger.warning("safeloop: skipping damaged checkpoint %s: %s", path.name, problem)
                refused[code] = problem
        if not acc.is_main_process:
            found = (path, read_state(path, acc.process_index, shards_verified=True))
        assert found is not None  # invariant: set on every branch above
        if found[1].world_size != acc.num_processes:
            logger.warning(
                "safeloop: %s was written by %d processes and resumes on %d; model and optimizer "
                "are restored, per-process RNG states are reused modulo %d (not bit for bit).",
                found[0], found[1].world_size, acc.num_processes, found[1].world_size,
            )  # fmt: skip
        return found

    def load_step(self, step: int) -> SavedState:
        """Load the checkpoint of ``step`` on every process (a rollback target already chosen).

        The target's shards were verified by all processes together when it was chosen: they
        are not hashed again (the files every process reads itself are).
        """
        self.durable.extend(self._finish_inflight())
        path = self.directory / checkpoint_name(step)
        return read_state(path, self.accelerator.process_index, shards_verified=True)

    def _load_latest(self, refused: dict[int, str]) -> tuple[Path, SavedState] | None:
        damaged = [f"{checkpoint_name(step)}: {problem}" for step, problem in refused.items()]
        for step, path in reversed(list_checkpoints(self.directory)):
            if not (path / "manifest.json").is_file() or step in refused:
                continue  # an unfinished write (not damage), or one found damaged already
            try:
                return path, read_state(path, self.accelerator.process_index, shards_verified=True)
            except CheckpointError as err:
                damaged.append(str(err))
                logger.warning("safeloop: skipping damaged checkpoint %s: %s", path.name, err)
        if damaged:
            listed = "\n".join(f"  - {problem}" for problem in damaged)
            raise CheckpointError(
                f"{len(damaged)} checkpoints in {self.directory} have manifests but none verifies:\n"
                f"{listed}\nRestore them from a copy, or start fresh in another checkpoint_dir; "
                "safeloop does not restart silently over damaged state."
            )
        return None

    def _load_folder(self, path: Path) -> tuple[Path, SavedState]:
        try:  # the shards are hashed by all processes together afterwards
            return path, read_state(path, self.accelerator.process_index, shards_verified=True)
        except CheckpointError as err:
            raise CheckpointError(
                f"`resume_from={str(path)!r}` is not a valid checkpoint: {err}. Pass a folder such "
                f'as {self.directory / checkpoint_name(500)} or `resume_from="latest"`.'
            ) from err

    def close(self) -> list[tuple[int, Path]]:
        """Finish an asynchronous save; remove a temporary folder. Returns saves made durable.

        Raises:
            CheckpointError: on every process, when the last asynchronous save failed.
        """
        done = self._finish_inflight()
        self._agree("", "finishing the last save", self.last_saved_step or 0)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        return done

    def remove_temporary(self) -> None:
        """Delete the temporary folder (main process; no collective, safe on an error path).

        A save still in flight (``fit`` ended by an error) is let finish first, on every process:
        its folder must not go from under it, nor its process group before its last collective.
        """
        if self._inflight is not None:
            self._inflight[1].exception()  # its error, if any, goes with the one ending the fit
            self._inflight = None
        if self.temporary and self.accelerator.is_main_process:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self.temporary:  # a next fit starts over in an empty folder
            self.last_saved_step = None
            self.saved_steps = []
            self.resumed_step = None


def _temporary_folder(accelerator: Accelerator) -> Path:
    # the same name on every process, from a token the main process draws (no pickled broadcast);
    # a run over several machines needs a checkpoint_dir on a filesystem they share
    token = broadcast_int(accelerator, secrets.randbits(62) if accelerator.is_main_process else 0)
    return Path(tempfile.gettempdir()) / f"safeloop-{token:016x}"  # made by the first save
