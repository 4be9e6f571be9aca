"""Checkpoint folders on disk: atomic writes, a manifest written last, verification, rotation.

Layout: ``root/step-00000500/`` holds the files of one checkpoint and ``manifest.json``, which
lists every file with its size and SHA-256 and is written last. Writes go to a hidden temporary
folder beside the target, every file and the folder are fsynced, then the folder is renamed into
place and the parent fsynced: a crash at any moment leaves either no folder or a complete one,
plus at most a temporary folder that discovery ignores. Only files the manifest lists are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from safeloop.errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "checkpoint_name",
    "write_checkpoint",
    "CheckpointWriter",
    "VerifiedReader",
    "verify_checkpoint",
    "list_checkpoints",
    "latest_valid",
    "rotate",
    "discard_checkpoint",
    "Verification",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step-(\d{8})$")
_CHUNK = 1 << 20


def checkpoint_name(step: int) -> str:
    """Return the folder name of the checkpoint of global step ``step``.

    Example:
        >>> checkpoint_name(500)
        'step-00000500'
    """
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
    if name == MANIFEST or Path(name).name != name or name.startswith("."):
        raise CheckpointError(
            f"checkpoint file names must be plain names other than {MANIFEST!r}; got {name!r}."
        )


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


class CheckpointWriter:
    """One checkpoint being written: files go into a temporary folder, ``finish`` publishes it.

    The temporary folder's name depends only on the step, so every process of a run finds it:
    each writes its own files there (:meth:`add`), then one process lists the others' files
    (:meth:`adopt`) and publishes. Each file's fsync runs in a thread while the calling thread
    hashes it from the page cache: the disk wait hides the hashing.

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
        self.listed: dict[str, dict[str, object]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safeloop-fsync")
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
            digest = hashlib.sha256(content).hexdigest()
            self._syncs.append(self._pool.submit(_fsync_file, target))
            self.listed[name] = {"size": len(content), "sha256": digest}
            return
        content(target)
        self._syncs.append(self._pool.submit(_fsync_file, target))
        self.listed[name] = {"size": target.stat().st_size, "sha256": _sha256(target)}

    def adopt(self, name: str) -> None:
        """List a file another process wrote (and fsynced) into the temporary folder."""
        _check_name(name)
        target = self.tmp / name
        if not target.is_file():
            raise CheckpointError(
                f"{target} was not written by its process; the checkpoint is not published."
            )
        self.listed[name] = {"size": target.stat().st_size, "sha256": _sha256(target)}

    def wait(self) -> None:
        """Block until every file added so far is durable."""
        try:
            for sync in self._syncs:
                sync.result()
        finally:
            self._syncs = []

    def finish(self, meta: Mapping[str, object]) -> Path:
        """Write the manifest, make everything durable and rename the folder into place."""
        try:
            self.wait()
        finally:
            self._pool.shutdown()
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "files": self.listed,
            "meta": dict(meta),
        }
        _write_file(self.tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
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
        self._pool.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


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


@dataclass(frozen=True)
class Verification:
    """The result of checking one checkpoint folder.

    Attributes:
        path (`Path`): the folder.
        complete (`bool`): it has a manifest (a folder without one is an unfinished write).
        ok (`bool`): the manifest parses and every listed file matches its size and hash.
        problem (`str`): what is wrong, naming the file, when not ok.
        manifest (`dict`): the parsed manifest when it could be read.
    """

    path: Path
    complete: bool
    ok: bool
    problem: str = ""
    manifest: dict | None = None


def _check_manifest(path: Path) -> Verification:
    """Parse the manifest and check every listed file's presence and size (not the hashes)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return Verification(path, complete=False, ok=False, problem=f"{manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_bytes())
        files = manifest["files"]
        version = manifest["format_version"]
        entries = sorted(files.items())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return Verification(path, True, False, f"{manifest_path} cannot be parsed ({err})")
    if version != FORMAT_VERSION:
        return Verification(
            path, True, False, f"{manifest_path} has format_version {version!r}, expected {FORMAT_VERSION}"
        )
    for name, entry in entries:
        file = path / name
        if Path(name).name != name or not file.is_file():
            return Verification(path, True, False, f"{file} is missing", manifest)
        size = file.stat().st_size
        if size != entry.get("size"):
            return Verification(
                path, True, False, f"{file} has {size} bytes, the manifest says {entry.get('size')}", manifest
            )
    return Verification(path, True, True, "", manifest)


def verify_checkpoint(path: str | os.PathLike[str]) -> Verification:
    """Check a checkpoint folder against its manifest; never reads files it does not list."""
    path = Path(path)
    check = _check_manifest(path)
    if not check.ok:
        return check
    for name, entry in sorted(check.manifest["files"].items()):  # type: ignore[index]
        if _sha256(path / name) != entry.get("sha256"):
            return Verification(
                path, True, False, f"{path / name} does not match its SHA-256 in the manifest", check.manifest
            )
    return check


class VerifiedReader:
    """Reads the files of one checkpoint once, checking each against the manifest as it goes.

    A file's bytes are handed out at once and its SHA-256 runs in a thread meanwhile, so that
    deserialising overlaps with hashing; :meth:`confirm` waits for every hash and raises on a
    mismatch, before anything read is used. Only files the manifest lists can be read.

    Args:
        path (`str | PathLike`): the checkpoint folder.

    Raises:
        CheckpointError: the manifest is missing or unreadable, or a file's size is wrong.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        check = _check_manifest(self.path)
        if check.manifest is None or check.problem:
            raise CheckpointError(check.problem)
        self.manifest: dict = check.manifest
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safeloop-verify")
        self._hashes: dict[str, Future[str]] = {}

    def read(self, name: str) -> bytes:
        """Return a listed file's bytes; its hash is checked by :meth:`confirm`."""
        if name not in self.manifest["files"]:
            raise CheckpointError(f"{self.path / name} is not listed in {self.path / MANIFEST}; not read.")
        data = (self.path / name).read_bytes()
        self._hashes[name] = self._pool.submit(lambda: hashlib.sha256(data).hexdigest())
        return data

    def confirm(self) -> None:
        """Check every listed file (hashing those not read); raise on the first mismatch.

        Raises:
            CheckpointError: naming the file whose SHA-256 does not match.
        """
        try:
            for name, entry in sorted(self.manifest["files"].items()):
                future = self._hashes.get(name)
                digest = future.result() if future is not None else _sha256(self.path / name)
                if digest != entry.get("sha256"):
                    raise CheckpointError(f"{self.path / name} does not match its SHA-256 in the manifest")
        finally:
            self._pool.shutdown()


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
