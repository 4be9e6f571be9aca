"""The checkpoint manifest: format, chunked SHA-256 digests, and verification against it.

``manifest.json`` lists every file of a checkpoint with its size and the SHA-256 of each 16 MiB
chunk. Chunked digests exist for speed: SHA-256 runs at about 1.5 GB/s on one core, slower than
reading from the page cache, and one digest per file can only use one core. Chunks are hashed by
a pool of threads (hashlib releases the GIL) while files are written or deserialised.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load

from safeloop.errors import CheckpointError

__all__ = [
    "valid_file_name",
    "FORMAT_VERSION",
    "MANIFEST",
    "CHUNK_BYTES",
    "HASH_SPEC",
    "hash_pool",
    "file_digests",
    "bytes_digests",
    "results",
    "Verification",
    "verify_checkpoint",
    "VerifiedReader",
]

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CHUNK_BYTES = 16 << 20
HASH_SPEC = {"algorithm": "sha256", "chunk_bytes": CHUNK_BYTES}


def hash_pool() -> ThreadPoolExecutor:
    """A pool of hashing threads: one per core up to 8 (more only contend for memory bandwidth)."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="safeloop-sha256")


_buffers = threading.local()


def _hash_file_chunk(path: Path, offset: int) -> str:
    # read into a buffer reused by this thread: no mapping that a truncation could turn into
    # SIGBUS, and no fresh 16 MiB allocation (page faults) per chunk
    buffer = getattr(_buffers, "chunk", None)
    if buffer is None:
        buffer = _buffers.chunk = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    count = 0
    with path.open("rb", buffering=0) as fh:
        fh.seek(offset)
        while count < CHUNK_BYTES and (got := fh.readinto(view[count:])):
            count += got
    return hashlib.sha256(view[:count]).hexdigest()


def file_digests(path: Path, size: int, pool: ThreadPoolExecutor) -> list[Future[str]]:
    """Start hashing a file's chunks (read from disk) in ``pool``; one digest per chunk."""
    if size == 0:
        return [pool.submit(lambda: hashlib.sha256(b"").hexdigest())]
    return [pool.submit(_hash_file_chunk, path, offset) for offset in range(0, size, CHUNK_BYTES)]


def bytes_digests(data: bytes, pool: ThreadPoolExecutor) -> list[Future[str]]:
    """Start hashing the chunks of bytes held in memory (the very bytes that will be used)."""
    feeder = _ChunkFeeder(pool)
    feeder.add(data)
    return feeder.finish()


def results(futures: list[Future[str]]) -> list[str]:
    """Wait for digests started by :func:`file_digests` or :func:`bytes_digests`."""
    return [future.result() for future in futures]


class _ChunkFeeder:
    """Hashes a file's chunks from pieces of memory handed in file order, without copying them.

    A chunk may span pieces (the header and several tensors): its digest runs in ``pool`` as
    soon as its last byte arrives, over views of the pieces, which the task keeps alive.
    """

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._pending: list[memoryview] = []
        self._filled = 0
        self.futures: list[Future[str]] = []

    def add(self, buffer: Any) -> None:
        view = memoryview(buffer).cast("B")
        while len(view):
            take = min(CHUNK_BYTES - self._filled, len(view))
            self._pending.append(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == CHUNK_BYTES:
                self._submit()

    def finish(self) -> list[Future[str]]:
        if self._pending or not self.futures:  # an empty file has one digest, of no bytes
            self._submit()
        return self.futures

    def _submit(self) -> None:
        pieces, self._pending, self._filled = self._pending, [], 0

        def digest() -> str:
            sha = hashlib.sha256()
            for piece in pieces:
                sha.update(piece)
            return sha.hexdigest()

        self.futures.append(self._pool.submit(digest))


def _tensor_bytes(tensor: torch.Tensor) -> Any:
    # the tensor's own memory as bytes (numpy: accelerate depends on it); on a little-endian host
    # these are the bytes of the file, which safetensors stores little-endian
    return tensor.reshape(-1).view(torch.uint8).numpy()


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


def valid_file_name(name: str) -> bool:
    """Whether ``name`` may be listed in a manifest: a plain file name, or one in ``shards/``.

    Never the manifest itself, a hidden name, an absolute path or a step up (``..``).
    """
    parts = name.split("/")
    if len(parts) == 2 and parts[0] != "shards":
        return False
    if len(parts) > 2 or any(not part or part.startswith(".") for part in parts):
        return False
    return name != MANIFEST and "\\" not in name


def check_manifest(path: Path) -> Verification:
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
    if version == 1:
        return Verification(
            path, True, False,
            f"{manifest_path} was written by an older safeloop (manifest format 1; this one reads "
            f"format {FORMAT_VERSION}): resume it with the safeloop that wrote it, or start fresh",
        )  # fmt: skip
    if version != FORMAT_VERSION:
        return Verification(
            path, True, False, f"{manifest_path} has format_version {version!r}, expected {FORMAT_VERSION}"
        )
    if manifest.get("hash") != HASH_SPEC:
        return Verification(
            path, True, False, f"{manifest_path} names hash {manifest.get('hash')!r}, expected {HASH_SPEC}"
        )
    # a manifest that parses but has the wrong shape is damage, never an exception later (on the
    # main process alone, an exception would leave the others waiting in a collective)
    if not entries:
        return Verification(path, True, False, f"{manifest_path} lists no files")
    for name, entry in entries:
        if not _valid_entry(entry):
            return Verification(path, True, False, f"{manifest_path} has a malformed entry for {name!r}")
    for name, entry in entries:
        file = path / name
        if not valid_file_name(name) or not file.is_file():
            return Verification(path, True, False, f"{file} is missing", manifest)
        size = file.stat().st_size
        if size != entry.get("size"):
            return Verification(
                path, True, False, f"{file} has {size} bytes, the manifest says {entry.get('size')}", manifest
            )
    return Verification(path, True, True, "", manifest)


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    size, digests = entry.get("size"), entry.get("sha256")
    return (
        type(size) is int
        and size >= 0
        and isinstance(digests, list)
        and len(digests) == max(1, -(-size // CHUNK_BYTES))
        and all(isinstance(d, str) for d in digests)
    )


def digest_mismatch(
    path: Path, name: str, expected: object, found: list[str], size: int | None = None
) -> str | None:
    """Why a file's chunk digests are not the manifest's, naming the first bytes that differ; None if equal.

    Args:
        path (`Path`): the checkpoint folder.
        name (`str`): the file's name in it.
        expected (`object`): the manifest's ``sha256`` list for the file.
        found (`list[str]`): the digests computed, one per chunk.
        size (`int`, *optional*): the file's size in the manifest. The byte range of the first
            differing chunk ends at the end of the file: the manifest's size or the size on disk,
            the smaller of those that reach into the chunk (both are named when they differ).
    """
    if found == expected:
        return None
    if not isinstance(expected, list) or len(expected) != len(found):
        return f"{path / name} does not match the manifest's SHA-256 list (wrong number of chunks)"
    chunk = next(i for i, (want, got) in enumerate(zip(expected, found, strict=True)) if want != got)
    start, end = chunk * CHUNK_BYTES, (chunk + 1) * CHUNK_BYTES
    try:
        on_disk: int | None = (path / name).stat().st_size
    except OSError:
        on_disk = None
    ends = {"the manifest's size": size, "the size on disk": on_disk}
    fits = sorted((n, which) for which, n in ends.items() if n is not None and start < n < end)
    if fits:
        end = fits[0][0]
    note = ""
    if size is not None and on_disk is not None and size != on_disk:
        clipped = f", up to {fits[0][1]}" if fits else ""
        note = (
            f"{clipped}; the file has {on_disk} bytes on disk, the manifest says {size}: something "
            "wrote to it after its size was checked"
        )
    return f"{path / name} does not match its SHA-256 in the manifest (bytes {start}-{end - 1} differ{note})"


def verify_checkpoint(path: str | os.PathLike[str], *, shards: bool = True) -> Verification:
    """Check a checkpoint folder against its manifest; never reads files it does not list.

    ``shards=False`` leaves the hashes of the shard files (``shards/``) to a check made by all
    processes together (``spread_hashing.shards_problem``); their presence and sizes are checked.
    """
    path = Path(path)
    check = check_manifest(path)
    if not check.ok:
        return check
    entries = [
        (name, entry)
        for name, entry in sorted(check.manifest["files"].items())  # type: ignore[index]
        if shards or not name.startswith("shards/")
    ]
    with hash_pool() as pool:
        started = [(name, entry, file_digests(path / name, entry["size"], pool)) for name, entry in entries]
        for name, entry, futures in started:
            problem = digest_mismatch(path, name, entry.get("sha256"), results(futures), entry["size"])
            if problem:
                pool.shutdown(cancel_futures=True)
                return Verification(path, True, False, problem, check.manifest)
    return check


class VerifiedReader:
    """Reads the files of one checkpoint, checking each against the manifest meanwhile.

    Every chunk's SHA-256 runs in a pool of threads while the calling thread deserialises, and
    :meth:`confirm` waits for them all and raises on a mismatch, before anything read is used.
    What is hashed is what will be used: the bytes returned by :meth:`read`, and the header and
    the tensors' own memory for :meth:`tensors`. Only files the manifest lists can be read.

    Args:
        path (`str | PathLike`): the checkpoint folder.

    Raises:
        CheckpointError: the manifest is missing or unreadable, or a file's size is wrong.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        check = check_manifest(self.path)
        if check.manifest is None or check.problem:
            raise CheckpointError(check.problem)
        self.manifest: dict = check.manifest
        self._pool = hash_pool()
        self._digests: dict[str, list[Future[str]]] = {}

    def _entry(self, name: str) -> dict:
        if name not in self.manifest["files"]:
            raise CheckpointError(f"{self.path / name} is not listed in {self.path / MANIFEST}; not read.")
        return self.manifest["files"][name]

    def read(self, name: str) -> bytes:
        """Return a listed file's bytes; its hash is checked by :meth:`confirm`."""
        self._entry(name)
        data = (self.path / name).read_bytes()
        self._digests[name] = bytes_digests(data, self._pool)
        return data

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Return a listed safetensors file's tensors (in memory); checked by :meth:`confirm`.

        The digests are computed from the header as read and from the loaded tensors' own
        memory, chunk by chunk while the next tensors load: the very bytes that will be used,
        read from disk once.
        """
        self._entry(name)
        path = self.path / name
        if sys.byteorder != "little":  # memory bytes differ from the file's: hash the bytes read
            data = path.read_bytes()
            self._digests[name] = bytes_digests(data, self._pool)
            return load(data)
        with path.open("rb") as fh:
            prefix = fh.read(8)
            header_bytes = prefix + fh.read(int.from_bytes(prefix, "little"))
        header = json.loads(header_bytes[8:])
        # the data section is the tensors back to back, in the order of their offsets
        order = sorted(
            (info["data_offsets"][0], key) for key, info in header.items() if key != "__metadata__"
        )
        feeder = _ChunkFeeder(self._pool)
        feeder.add(header_bytes)
        loaded: dict[str, torch.Tensor] = {}
        try:
            # pread: the tensors own their memory (no mapping of a file that rotation may delete)
            opened = safe_open(str(path), framework="pt", backend="pread")
        except TypeError:  # safetensors before "backend": read, then deserialise (one more copy)
            data = path.read_bytes()
            self._digests[name] = bytes_digests(data, self._pool)
            return load(data)
        with opened as tensors:
            if sorted(tensors.keys()) != sorted(key for _, key in order):
                raise CheckpointError(f"{path} changed while it was read (its tensor names differ)")
            for _, key in order:
                piece = tensors.get_slice(key)
                # what safetensors parsed is what was hashed: the file was not swapped in between
                if (
                    piece.get_dtype() != header[key]["dtype"]
                    or list(piece.get_shape()) != header[key]["shape"]
                ):
                    raise CheckpointError(f"{path} changed while it was read (`{key}` differs)")
                loaded[key] = tensors.get_tensor(key)
                if loaded[key].numel():
                    feeder.add(_tensor_bytes(loaded[key]))
        self._digests[name] = feeder.finish()
        return loaded

    def close(self) -> None:
        """Stop the hashing threads (after :meth:`confirm`, or when reading was interrupted)."""
        self._pool.shutdown(cancel_futures=True)

    def confirm(self, trusted: Callable[[str], bool] = lambda name: False) -> None:
        """Check every listed file (hashing those not read); raise on the first mismatch.

        Args:
            trusted (`Callable[[str], bool]`, *optional*): names of files not read here that
                were verified already (by another process, moments ago): not hashed again.

        Raises:
            CheckpointError: naming the file (and the byte range) that does not match.
        """
        try:
            files = [
                (n, e)
                for n, e in sorted(self.manifest["files"].items())
                if n in self._digests or not trusted(n)
            ]
            for name, entry in files:
                if name not in self._digests:
                    self._digests[name] = file_digests(self.path / name, entry["size"], self._pool)
            for name, entry in files:
                found = results(self._digests[name])
                problem = digest_mismatch(self.path, name, entry.get("sha256"), found, entry["size"])
                if problem:
                    raise CheckpointError(problem)
        finally:
            self._pool.shutdown(cancel_futures=True)
