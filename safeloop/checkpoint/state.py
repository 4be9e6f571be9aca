"""The training state of a run, as the files of one checkpoint and back.

Shared files, written by the main process: ``model.safetensors`` (the unwrapped model, tied
weights stored once), ``state.safetensors`` (every other shared tensor: optimizer moments...) and
``state.json`` (param groups, scheduler, scaler, counters, data position, guard state). One file
per process, ``rank-00000.safetensors``, ... holds that process's RNG states: its tensors, with
the JSON rest in the safetensors header's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from safeloop.checkpoint.format import dedupe_tensors, join_state, split_state, tensors_from_bytes
from safeloop.checkpoint.manifest import VerifiedReader
from safeloop.checkpoint.sharded import SHARD_DIR, safetensors_problem
from safeloop.checkpoint.store import FileContent
from safeloop.errors import CheckpointError

__all__ = ["SavedState", "state_files", "rank_file", "rank_file_name", "read_state", "saved_ranks"]

MODEL_FILE = "model.safetensors"
TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"
_RANK_PREFIX = "rank-"


def rank_file_name(rank: int) -> str:
    """The name of process ``rank``'s own file in a checkpoint.

    Example:
        >>> rank_file_name(1)
        'rank-00001.safetensors'
    """
    return f"{_RANK_PREFIX}{rank:05d}.safetensors"


@dataclass(frozen=True)
class SavedState:
    """Everything a checkpoint holds for one process, in memory.

    Attributes:
        model (`dict[str, Tensor]`): the unwrapped model's state dict.
        parts (`dict[str, Any]`): shared state dicts (``optimizer``, ``lr_scheduler``,
            ``scaler``) and this process's (``rng``, ``rng_epoch_start``); absent ones are None.
        trainer (`dict[str, Any]`): counters, data position and guard state (JSON values).
        world_size (`int`): the number of processes that wrote the checkpoint.
        path (`Path`, *optional*): the checkpoint's folder (its ``shards/`` are read from there).
    """

    model: dict[str, torch.Tensor]
    parts: dict[str, Any]
    trainer: dict[str, Any]
    world_size: int = 1
    path: Path | None = None


def _split_parts(parts: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    trees: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, part in parts.items():
        if part is None:
            trees[name] = None
            continue
        tree, part_tensors = split_state(part, name)
        trees[name] = tree
        # keys inside each tree point at "<part>/<key>": the prefix keeps parts apart
        tensors.update({f"{name}/{key}": value for key, value in part_tensors.items()})
    return trees, tensors


def _join_parts(trees: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for name, tree in trees.items():
        if tree is None:
            parts[name] = None
            continue
        prefix = f"{name}/"
        own = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        parts[name] = join_state(tree, own)
    return parts


def state_files(
    model_state: Mapping[str, torch.Tensor] | None,
    parts: Mapping[str, Any],
    trainer: Mapping[str, Any],
    *,
    copy: bool = False,
) -> dict[str, FileContent]:
    """Return the shared files: JSON as bytes, tensors as writers straight to disk.

    Args:
        model_state (`Mapping[str, Tensor]`, *optional*): the unwrapped model's state dict; None
            when the model is in the checkpoint's shards (FSDP2).
        parts (`Mapping[str, Any]`): shared state dicts by name (None for absent ones).
        trainer (`Mapping[str, Any]`): the trainer's JSON state.
        copy (`bool`, *optional*, defaults to False): copy every tensor now (for a background
            write while training goes on).

    Raises:
        CheckpointError: when some state is neither tensors nor JSON (named with its path).
    """
    model_tensors, aliases = dedupe_tensors(model_state or {}, copy=copy)
    trees, tensors = _split_parts(parts)
    state_tensors, state_aliases = dedupe_tensors(tensors, copy=copy)
    document = {
        "model_aliases": aliases,
        "state_aliases": state_aliases,
        "parts": trees,
        "trainer": dict(trainer),
    }
    files: dict[str, FileContent] = {
        TENSORS_FILE: lambda path: save_file(state_tensors, str(path)),
        JSON_FILE: json.dumps(document, sort_keys=True).encode(),
    }
    if model_state is not None:
        files[MODEL_FILE] = lambda path: save_file(model_tensors, str(path))
    return files


def rank_file(rank: int, parts: Mapping[str, Any]) -> tuple[str, FileContent]:
    """Return the name and writer of process ``rank``'s file (its RNG states)."""
    trees, tensors = _split_parts(parts)
    stored, aliases = dedupe_tensors(tensors)
    metadata = {"parts": json.dumps(trees, sort_keys=True), "aliases": json.dumps(aliases)}
    return rank_file_name(rank), lambda path: save_file(stored, str(path), metadata=metadata)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # the header is an 8-byte little-endian length, then JSON with an optional "__metadata__"
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def _with_aliases(tensors: dict[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    # tied weights were stored once: every alias becomes the same tensor again
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors


def _is_shard(name: str) -> bool:
    return name.startswith(f"{SHARD_DIR}/")


def saved_ranks(manifest: Mapping[str, Any]) -> int:
    """The number of processes whose files a checkpoint's manifest lists."""
    return sum(1 for name in manifest["files"] if name.startswith(_RANK_PREFIX))


def read_state(path: str | Path, rank: int = 0, *, shards_verified: bool = False) -> SavedState:
    """Read a checkpoint folder for process ``rank``, verifying every file against the manifest.

    A checkpoint written by fewer processes gives a higher rank the file of ``rank % saved``.
    ``shards_verified``: the shard files (read by DCP, not here) were hashed against the manifest
    by another process moments ago; they are not hashed again (their structure is still checked).

    Raises:
        CheckpointError: the manifest is missing or does not match a file (named).
    """
    reader = VerifiedReader(path)
    try:
        try:
            document = json.loads(reader.read(JSON_FILE))
            model = (
                _with_aliases(reader.tensors(MODEL_FILE), document["model_aliases"])
                if MODEL_FILE in reader.manifest["files"]
                else {}
            )
            tensors = _with_aliases(reader.tensors(TENSORS_FILE), document["state_aliases"])
            parts = _join_parts(document["parts"], tensors)
            world_size = saved_ranks(reader.manifest)
            if world_size:
                data = reader.read(rank_file_name(rank % world_size))
                metadata = _safetensors_metadata(data)
                rank_tensors = tensors_from_bytes(data, json.loads(metadata["aliases"]))
                parts.update(_join_parts(json.loads(metadata["parts"]), rank_tensors))
        except Exception as err:
            reader.confirm()  # a damaged file is named by its hash first
            raise CheckpointError(
                f"{path} verifies but cannot be read ({type(err).__name__}: {err})"
            ) from err
        reader.confirm(_is_shard if shards_verified else lambda name: False)  # before anything is used
    finally:
        reader.close()  # also when interrupted (KeyboardInterrupt): no hashing thread left running
    for name in reader.manifest["files"]:
        # DCP's reader opens every shard itself: each must be plain safetensors (no pickled bytes)
        problem = safetensors_problem(Path(path) / name) if name.startswith(f"{SHARD_DIR}/") else None
        if problem:
            raise CheckpointError(f"{problem}; the checkpoint is refused, nothing of it was loaded")
    return SavedState(
        model=model,
        parts=parts,
        trainer=document["trainer"],
        world_size=max(world_size, 1),
        path=Path(path),
    )
