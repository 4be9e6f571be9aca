"""Checkpoint folders on disk: atomic writes, a manifest written last, verification, rotation.

Layout: ``root/step-00000500/`` holds the files of one checkpoint and ``manifest.json``
(see ``manifest.py``), written last. Writes go to a hidden temporary folder beside the target,
every file and the folder are fsynced, then the folder is renamed into place and the parent
fsynced: a crash at any moment leaves either no folder or a complete one, plus at most a
temporary folder that discovery ignores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from safeloop.checkpoint.manifest import (
    FORMAT_VERSION,
    HASH_SPEC,
    MANIFEST,
    bytes_digests,
    file_digests,
    hash_pool,
    results,
    valid_file_name,
    verify_checkpoint,
)
from safeloop.errors import CheckpointError

__all__ = [
    "checkpoint_name",
    "write_checkpoint",
    "CheckpointWriter",
    "list_checkpoints",
    "latest_valid",
    "rotate",
    "discard_checkpoint",
]

_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    """Return the folder name of the checkpoint of global step ``step``.

    Example:
        >>> checkpoint_name(500)
        'step-00000500'
    """
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


FileContent = bytes | Callable[[Path], None]


def _check_name(name: str) -> None:
    if not valid_file_name(name):
        raise CheckpointError(
            f"checkpoint file names must be plain names other than {MANIFEST!r} (or in `shards/`); "
            f"got {name!r}."
        )


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


class CheckpointWriter:
    """One checkpoint being written: files go into a temporary folder, ``finish`` publishes it.

    The temporary folder's name depends only on the step, so every process of a run finds it:
    each writes its own files there (:meth:`add`), then one process lists the others' files
    (:meth:`adopt`) and publishes. A written file's fsync and the hashing of its chunks (from
    the page cache) run in threads while the next file is written; :meth:`finish` waits for both.

    Args:
        root (`str | PathLike`): the checkpoint directory (created if missing).
        step (`int`): the global step; names the folder.
        create (`bool`, *optional*, defaults to True): make a fresh temporary folder (a stale one,
            left by a killed run, is removed); False joins the folder another process made.
    """

    def __init__(self, root: str | os.PathLike[str], step: int, *, create: bool = True) -> None:
        self.root = Path(root)
        self.step = step
        self.final = self.root / checkpoint_name(step)
        self.tmp = self.root / f".{self.final.name}.tmp"
        self._sizes: dict[str, int] = {}
        self._digests: dict[str, list[Future[str]]] = {}
        self._sync_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safeloop-fsync")
        self._hash_pool = hash_pool()
        self._syncs: list[Future[None]] = []
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()

    def add(self, name: str, content: FileContent) -> None:
        """Write one file: ``bytes``, or a function that writes the file at the path it gets."""
        _check_name(name)
        target = self.tmp / name
        if isinstance(content, bytes):
            with target.open("wb") as fh:
                fh.write(content)
            self._digests[name] = bytes_digests(content, self._hash_pool)
            self._sizes[name] = len(content)
        else:
            content(target)
            self._sizes[name] = target.stat().st_size
            self._digests[name] = file_digests(target, self._sizes[name], self._hash_pool)
        self._syncs.append(self._sync_pool.submit(_fsync_file, target))

    def adopt(self, name: str, digests: list[str] | None = None) -> None:
        """List a file another process wrote (and fsynced) into the temporary folder.

        Args:
            name (`str`): the file's name in the checkpoint.
            digests (`list[str]`, *optional*): its chunk digests, when another process hashed
                it already; else it is hashed here.
        """
        _check_name(name)
        target = self.tmp / name
        if not target.is_file():
            raise CheckpointError(
                f"{target} was not written by its process; the checkpoint is not published."
            )
        self._sizes[name] = target.stat().st_size
        if digests is None:
            self._digests[name] = file_digests(target, self._sizes[name], self._hash_pool)
        else:
            self._digests[name] = [_done(digest) for digest in digests]

    @property
    def listed(self) -> dict[str, dict[str, object]]:
        """The manifest's file entries so far (waits for the hashes of the files added)."""
        return {
            name: {"size": self._sizes[name], "sha256": results(self._digests[name])} for name in self._sizes
        }

    def wait(self) -> None:
        """Block until every file added so far is durable and hashed."""
        try:
            for sync in self._syncs:
                sync.result()
            for futures in self._digests.values():
                results(futures)
        finally:
            self._syncs = []

    def finish(self, meta: Mapping[str, object]) -> Path:
        """Write the manifest, make everything durable and rename the folder into place."""
        try:
            self.wait()
            files = self.listed
        finally:
            self._shutdown()
        manifest = {
            "format_version": FORMAT_VERSION,
            "hash": dict(HASH_SPEC),
            "step": self.step,
            "files": files,
            "meta": dict(meta),
        }
        _write_file(self.tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        for folder in sorted({(self.tmp / name).parent for name in files} - {self.tmp}):
            _fsync_dir(folder)  # the entries of a subfolder (shards/) are durable before the rename
        _fsync_dir(self.tmp)
        if self.final.exists():  # a re-save of the same step: the old folder goes only once the new is whole
            aside = self.root / f".{self.final.name}.old-{os.getpid()}"
            os.replace(self.final, aside)
            os.replace(self.tmp, self.final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        _fsync_dir(self.root)
        return self.final

    def abort(self) -> None:
        """Drop the temporary folder (after a failed write)."""
        self._shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _shutdown(self) -> None:
        self._sync_pool.shutdown()
        self._hash_pool.shutdown(cancel_futures=True)


def _done(value: str) -> Future[str]:
    future: Future[str] = Future()
    future.set_result(value)
    return future


def write_checkpoint(
    root: str | os.PathLike[str], step: int, files: Mapping[str, FileContent], *, meta: Mapping[str, object]
) -> Path:
    """Write one checkpoint atomically (one process) and return its folder.

    Args:
        root (`str | PathLike`): the checkpoint directory (created if missing).
        step (`int`): the global step; names the folder.
        files (`Mapping[str, bytes | Callable[[Path], None]]`): file name -> its bytes, or a
            function that writes the file at the path it is given (large tensors go straight
            to disk this way, without a copy in memory).
        meta (`Mapping[str, object]`): JSON-able facts stored in the manifest (health, epoch...).

    Returns:
        `Path`: ``root/step-NNNNNNNN``, complete and durable.

    Raises:
        CheckpointError: when a file name is not a plain name, or is the manifest's.
    """
    for name in files:
        _check_name(name)
    writer = CheckpointWriter(root, step)
    try:
        for name, content in files.items():
            writer.add(name, content)
        return writer.finish(meta)
    except BaseException:
        writer.abort()
        raise


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Return ``(step, folder)`` for every checkpoint-named folder in ``root``, by step (by name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_valid(root: str | os.PathLike[str]) -> tuple[Path | None, list[str]]:
    """Return the valid checkpoint with the highest step, and warnings about damaged newer ones.

    Returns:
        `tuple[Path | None, list[str]]`: None when no folder has a manifest (a fresh start).

    Raises:
        CheckpointError: when checkpoints with manifests exist and none verifies.
    """
    warnings: list[str] = []
    damaged: list[str] = []
    for _, path in reversed(list_checkpoints(root)):
        check = verify_checkpoint(path)
        if check.ok:
            return path, warnings
        if check.complete:
            damaged.append(check.problem)
            warnings.append(f"skipping damaged checkpoint {path.name}: {check.problem}")
    if damaged:
        listed = "\n".join(f"  - {problem}" for problem in damaged)
        raise CheckpointError(
            f"{len(damaged)} checkpoints in {root} have manifests but none verifies:\n{listed}\n"
            "Restore them from a copy, or start fresh in another checkpoint_dir; safeloop does not "
            "restart silently over damaged state."
        )
    return None, warnings


def rotate(root: str | os.PathLike[str], keep: int, protect: Iterable[Path] = ()) -> list[Path]:
    """Delete the oldest checkpoints beyond the newest ``keep``; never those in ``protect``.

    Args:
        root (`str | PathLike`): the checkpoint directory.
        keep (`int`): how many of the newest to keep (>= 1).
        protect (`Iterable[Path]`): folders never deleted (the newest healthy one).

    Returns:
        `list[Path]`: the folders deleted.
    """
    protected = {Path(p).resolve() for p in protect}
    ordered = list_checkpoints(root)
    deleted = []
    for _, path in ordered[: max(len(ordered) - keep, 0)]:
        if path.resolve() in protected:
            continue
        discard_checkpoint(path)
        deleted.append(path)
    return deleted


def discard_checkpoint(path: Path) -> None:
    """Delete one checkpoint folder safely."""
    # renamed first (atomic), so that a crash mid-deletion leaves a hidden folder, never a
    # step folder with some files gone that would then look damaged
    doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
