"""Whole tensors in shard files: which process writes each, the writing, the reading by name.

A checkpoint of whole tensors (DeepSpeed ZeRO, ``zero_state.py``) splits them between the
processes, each writing its share as one plain safetensors file
``whole-0000R-of-0000W.safetensors``; any process of any later run reads any tensor back by name.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safeloop.errors import CheckpointError

__all__ = ["WholeShardFiles", "assign_owners", "write_share", "share_file_name"]


def share_file_name(rank: int, world: int) -> str:
    """The file of process ``rank`` of ``world``.

    Example:
        >>> share_file_name(1, 2)
        'whole-00001-of-00002.safetensors'
    """
    return f"whole-{rank:05d}-of-{world:05d}.safetensors"


def write_share(tensors: dict[str, torch.Tensor], folder: Path, rank: int, world: int) -> Path:
    """Write one process's tensors into ``folder`` as one safetensors file, fsynced; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / share_file_name(rank, world)
    save_file(tensors, str(path))
    with path.open("rb") as fh:
        os.fsync(fh.fileno())
    return path


class WholeShardFiles:
    """The whole tensors of a checkpoint's shard files, read one at a time by name.

    Args:
        folder (`Path`): the checkpoint's ``shards`` folder (verified against its manifest).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._stack = contextlib.ExitStack()
        self._where: dict[str, Any] = {}

    def __enter__(self) -> WholeShardFiles:
        for path in sorted(self.folder.glob("*.safetensors")):
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                self._where[key] = handle
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def get(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The tensor ``name``, checked to have this model's ``shape``.

        Raises:
            CheckpointError: no file holds it, or its shape differs (another model's checkpoint).
        """
        handle = self._where.get(name)
        if handle is None:
            raise CheckpointError(
                f"{self.folder} holds no `{name}`: the checkpoint is of another model, or of an "
                "optimizer with other state"
            )
        tensor = handle.get_tensor(name)
        if tensor.shape != shape:
            raise CheckpointError(
                f"`{name}` has shape {list(tensor.shape)} in {self.folder.parent}, this model's is "
                f"{list(shape)}: the checkpoint is of another model"
            )
        return tensor


def assign_owners(sizes: list[tuple[str, int]], world: int) -> dict[str, int]:
    """Which process writes each tensor: the largest first, each to the least-loaded process.

    Deterministic (ties by name, then by rank): every process computes the same assignment.

    Args:
        sizes (`list[tuple[str, int]]`): each tensor's name and number of elements.
        world (`int`): the number of processes.
    """
    load = [0] * world
    owner = {}
    for name, numel in sorted(sizes, key=lambda item: (-item[1], item[0])):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += numel
    return owner
