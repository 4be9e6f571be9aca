"""Writing a safetensors file and taking its manifest digests at once, without reading it back.

The manifest holds the SHA-256 of every 16 MiB chunk of every file. Hashing a shard file after
it is written reads all of it again; here the process that writes a file hashes it at once,
while the file's fsync runs in a thread: the header as written (read back from the file, a few
KiB) and then the tensors' own memory in the order of their offsets in the file, which are the
bytes ``save_file`` copied to disk. The digests are those of the file's bytes (what verification
hashes later) as long as the header's entries are the tensors handed in, back to back; when
they are not (another safetensors layout) or the host is big-endian (the memory's bytes are
not the file's), the file is hashed from disk instead, after its fsync.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from safeloop.checkpoint.manifest import _ChunkFeeder, _tensor_bytes, file_digests, hash_pool, results
from safeloop.errors import CheckpointError

__all__ = ["save_hashed"]

_HEADER_LIMIT = 100 * 2**20  # safetensors' own bound on a header's size


def save_hashed(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> list[str]:
    """Write ``tensors`` to ``path`` with ``save_file``, fsync it, and return its chunk digests.

    Args:
        tensors (`dict[str, torch.Tensor]`): contiguous CPU tensors that share no memory (what
            ``save_file`` takes); they must not change until this returns.
        path (`Path`): the file to write.
        metadata (`dict[str, str]`, *optional*): the header's ``__metadata__``.

    Returns:
        `list[str]`: the SHA-256 of each ``CHUNK_BYTES`` chunk of the file, as the manifest lists
        them (one digest, of no bytes, for an empty file).

    Raises:
        OSError: the file could not be written, synced or read.
        CheckpointError: the file's size is not what its header says.
    """
    save_file(tensors, str(path), metadata=metadata)
    sync_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safeloop-fsync")
    pool = hash_pool()
    try:
        synced = sync_pool.submit(_fsync_file, path)  # the disk's wait overlaps the hashing
        pieces = _file_pieces(path, tensors)
        if pieces is None:
            synced.result()
            futures = file_digests(path, path.stat().st_size, pool)
        else:
            feeder = _ChunkFeeder(pool)
            for piece in pieces:
                feeder.add(piece)
            futures = feeder.finish()
        digests = results(futures)
        synced.result()
    finally:
        pool.shutdown(cancel_futures=True)
        sync_pool.shutdown()
    return digests


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _file_pieces(path: Path, tensors: dict[str, torch.Tensor]) -> list[Any] | None:
    """The file's bytes as pieces of memory in file order (its header, then tensors), or None.

    None when the memory's bytes may not be the file's: a big-endian host, or a header whose
    entries are not exactly ``tensors`` (shapes, byte lengths) tiling the data section.
    """
    if sys.byteorder != "little":
        return None
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 <= length <= min(_HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{path} was just written but has no valid safetensors header")
        header_bytes = prefix + fh.read(length)
    try:
        header = json.loads(header_bytes[8:])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} was just written but its header is not JSON ({err})") from err
    if not isinstance(header, dict):
        return None
    entries = {key: value for key, value in header.items() if key != "__metadata__"}
    if entries.keys() != tensors.keys():
        return None
    order = []
    for key, entry in entries.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        tensor = tensors[key]
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and offsets[1] - offsets[0] == tensor.nbytes
            and entry.get("shape") == list(tensor.shape)
            and tensor.is_contiguous()
        ):
            return None
        order.append((offsets[0], key))
    end = 0
    pieces: list[Any] = [header_bytes]
    for start, key in sorted(order):
        if start != end:
            return None  # a gap or an overlap: not the layout hashed here
        end += tensors[key].nbytes
        if tensors[key].numel():
            pieces.append(_tensor_bytes(tensors[key].detach()))
    if 8 + length + end != size:
        raise CheckpointError(
            f"{path} was just written but is {size} bytes, not the {8 + length + end} its header says"
        )
    return pieces
