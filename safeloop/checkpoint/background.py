"""The part of a save that runs while training goes on: shard files, digests, the manifest, the rename.

With ``async_checkpoint=True`` and several processes, a sharded save (FSDP2, FSDP1, DeepSpeed)
splits in two. At the step boundary every process copies its shards to host memory (staging,
``staging.py``) and writes its small per-process file; then :class:`BackgroundShardSave` runs in
one background thread on every process:

1. every process writes and fsyncs its shard files from the copies, hashing them as it writes
   (under FSDP, ``torch.distributed.checkpoint`` plans the save with its collectives);
2. all gather their digests and what went wrong (JSON), and hash the files no writer hashed,
   each its share; every process then knows that every shard is durable, or what failed;
3. the main process writes the shared files and the manifest (written last, listing and hashing
   every process's files), renames the folder into place and rotates old checkpoints
   (:class:`Publish`).

The background collectives run over a gloo process group of their own (:class:`SideGroup`),
which only this thread uses, so they never interleave with the training's collectives on the
default group; one save is in flight at most (the manager waits for the previous one first), so
two threads never use it at once. Every process runs the same collectives in the same order
whatever fails: a failure is decided from what all processes gathered, and all raise it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from safeloop.checkpoint.sharded import DCP_ERRORS, SHARD_DIR
from safeloop.checkpoint.spread_hashing import gather_shard_digests
from safeloop.checkpoint.state import rank_file_name
from safeloop.checkpoint.store import CheckpointWriter, rotate
from safeloop.errors import CheckpointError

__all__ = ["BackgroundShardSave", "Publish", "SideGroup", "gather_json_over", "shard_write_problem"]


class SideGroup:
    """A gloo process group of all processes, for the collectives of background saves only.

    gloo because the staged shards, the plans and the digests are all in host memory, whatever
    the training's backend (torch recommends a CPU group for ``dcp.async_save`` too).
    """

    def __init__(self) -> None:
        self._group: Any = None

    def get(self) -> Any:
        """The group, made at the first call: a collective, every process calls it at the same point."""
        if self._group is None:
            self._group = torch.distributed.new_group(backend="gloo")
        return self._group


def gather_json_over(group: Any, value: Any) -> list[Any]:
    """Every process's JSON-able ``value`` by rank, over ``group`` (a collective of its processes).

    JSON bytes in a tensor, never a pickle: ``all_gather_object`` would unpickle what the other
    processes send.
    """
    data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)
    world = torch.distributed.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64), group=group)
    longest = max(int(size.item()) for size in sizes)
    padded = torch.nn.functional.pad(data, (0, longest - data.numel()))
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded, group=group)
    return [
        json.loads(bytes(part[: int(size.item())].tolist()).decode())
        for part, size in zip(parts, sizes, strict=True)
    ]


def shard_write_problem(err: BaseException, rank: int) -> str:
    """What failed when process ``rank`` wrote its shards, naming the process it failed on.

    DCP raises its ``CheckpointException`` on every process when one failed, with the failed
    processes' own exceptions (``failures``, by rank): those are named, not the traceback text.
    """
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(
            f"process {failed} could not write its shards: {_exception_text(wrapped)}"
            for failed, wrapped in sorted(failures.items())
        )
    return f"process {rank} could not write its shards: {type(err).__name__}: {err}"


def _exception_text(wrapped: Any) -> str:
    exc = wrapped[0] if isinstance(wrapped, tuple) and wrapped else wrapped  # (exception, traceback)
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Publish:
    """The main process's part of a save: shared files, the manifest, rotation."""

    writer: CheckpointWriter
    files: dict[str, Any]
    processes: int
    meta: dict[str, Any]
    keep: int
    protect: list[Path]
    shard_digests: dict[str, list[str] | None] = field(default_factory=dict)  # None: hash here

    def run(self) -> Path:
        """Write the shared files and the manifest, rename the folder into place, rotate; its path."""
        try:
            for name, content in self.files.items():
                self.writer.add(name, content)
            for rank in range(1, self.processes):
                self.writer.adopt(rank_file_name(rank))
            for name, digests in sorted(self.shard_digests.items()):
                self.writer.adopt(name, digests)
            path = self.writer.finish({**self.meta, "world_size": self.processes})
        except BaseException:
            self.writer.abort()
            raise
        rotate(self.writer.root, self.keep, protect=[path, *self.protect])
        return path


@dataclass
class BackgroundShardSave:
    """One process's background part of an asynchronous sharded save (see the module's docstring).

    Args:
        accelerator (`Accelerator`): the run's processes.
        group (`ProcessGroup`): the :class:`SideGroup`'s group.
        root (`Path`): the checkpoint's temporary folder (its per-process files are in it).
        write_shards (`Callable[[Path, Any], dict[str, list[str]] | None]`): writes this process's
            staged shards into the folder it is given, over the group it is given.
        publish (`Publish`, *optional*): the main process's part; None on the others.
    """

    accelerator: Accelerator
    group: Any
    root: Path
    write_shards: Callable[[Path, Any], dict[str, list[str]] | None]
    publish: Publish | None = None

    def run(self) -> Path | None:
        """Write, gather, publish; the checkpoint's folder on the main process, None on the others.

        Raises:
            CheckpointError: on every process, when any process failed to write its shards; on
                the main process, when it failed to publish (or ``OSError``).
        """
        rank = self.accelerator.process_index
        written: dict[str, list[str]] = {}
        problem = ""
        try:
            written = self.write_shards(self.root / SHARD_DIR, self.group) or {}
        except (*DCP_ERRORS, Exception) as err:
            # whatever failed, this process still meets the others at the gathering below, so
            # that none waits there alone; they all learn it there
            problem = shard_write_problem(err, rank)
        # every process's digests and problems (a collective); files no writer hashed (DeepSpeed's)
        # are hashed from disk, each by one process
        gather = functools.partial(gather_json_over, self.group)
        try:
            digests, problem = gather_shard_digests(
                self.accelerator, self.root, written, problem=problem, gather=gather
            )
        except RuntimeError as err:  # the group itself failed (a process gone): said at the next save
            raise CheckpointError(
                f"process {rank} lost the other processes while saving in the background: {err}"
            ) from err
        if problem:
            if self.publish is not None:
                self.publish.writer.abort()  # nothing of this checkpoint is published
            raise CheckpointError(problem)
        if self.publish is None:
            return None
        self.publish.shard_digests = digests
        return self.publish.run()
