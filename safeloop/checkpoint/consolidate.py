"""Whole model weights from a checkpoint, as ``model.safetensors`` (``safeloop consolidate``).

A sharded checkpoint holds, per process, one safetensors file whose header names each tensor's
offsets in the whole tensor (``DCP_SHARDING_INFO``). Consolidating reads those headers, sizes each
whole tensor from the pieces, places every piece, and checks that the pieces tile the tensor
exactly (no gap, no overlap) before anything is written. Nothing but safetensors and JSON is
read: no process group, no model, no DCP call.

The output is what ``from_pretrained``-style loaders read: one ``model.safetensors``, or, above
``max_shard_bytes``, ``model-0000K-of-0000N.safetensors`` files with a
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {...}}``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safeloop.checkpoint.manifest import check_manifest, verify_checkpoint
from safeloop.checkpoint.sharded import MODEL_PREFIX, SHARD_DIR, SHARD_INFO_PART, safetensors_problem
from safeloop.checkpoint.state import JSON_FILE, MODEL_FILE
from safeloop.checkpoint.store import latest_valid
from safeloop.errors import CheckpointError

__all__ = ["consolidate", "parse_size", "INDEX_FILE"]

INDEX_FILE = "model.safetensors.index.json"
_SHARDING_INFO = "DCP_SHARDING_INFO"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


@dataclass
class _Pieces:
    """The pieces of one whole tensor, gathered from the shard files' headers."""

    dtype: str
    ndim: int
    pieces: list[tuple[Path, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    whole_shape: tuple[int, ...] | None = None  # as saved in state.json

    def shape(self) -> tuple[int, ...]:
        """The whole tensor's shape: as saved, else the far corner of its farthest pieces."""
        if self.whole_shape is not None:
            return self.whole_shape
        return tuple(max(o[d] + s[d] for _, _, o, s in self.pieces) for d in range(self.ndim))


def parse_size(text: str) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"64KB"`` or a plain integer (1 KB = 1000 bytes, as the Hub)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?B)?\s*", text.upper())
    if match is None:
        raise ValueError(f"not a size: {text!r} (write e.g. 5GB, 500MB or a number of bytes)")
    value = float(match.group(1)) * _UNITS[match.group(2) or "B"]
    if value < 1:
        raise ValueError(f"a shard size must be at least 1 byte, got {text!r}")
    return int(value)


def _checkpoint_folder(path: Path) -> Path:
    """``path`` itself when it is a checkpoint, else the newest valid checkpoint inside it."""
    if check_manifest(path).complete:  # hashed once, by the caller
        return path
    found, _ = latest_valid(path)  # raises CheckpointError when every checkpoint is damaged
    if found is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint folder (no manifest.json) nor a folder of checkpoints "
            "(step-NNNNNNNN): name a checkpoint, e.g. CHECKPOINT_DIR/step-00001000"
        )
    return found


def _gather_pieces(folder: Path, shard_files: list[str]) -> dict[str, _Pieces]:
    tensors: dict[str, _Pieces] = {}
    for name in shard_files:
        path = folder / name
        problem = safetensors_problem(path)
        if problem:
            raise CheckpointError(f"shard refused, not read: {problem}")
        with safe_open(str(path), framework="pt") as shard:
            info = json.loads((shard.metadata() or {}).get(_SHARDING_INFO, "{}"))
            for key in shard.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                if not key.startswith(MODEL_PREFIX):
                    continue  # optimizer state: not part of the weights
                piece = shard.get_slice(key)
                shape = tuple(piece.get_shape())
                offsets = tuple(info.get(key, {}).get("saved_offsets", [0] * len(shape)))
                if len(offsets) != len(shape):
                    raise CheckpointError(
                        f"{path}: {key} has offsets {list(offsets)} for shape {list(shape)}"
                    )
                entry = tensors.setdefault(key[len(MODEL_PREFIX) :], _Pieces(piece.get_dtype(), len(shape)))
                if (entry.dtype, entry.ndim) != (piece.get_dtype(), len(shape)):
                    raise CheckpointError(
                        f"{path}: the pieces of {key} disagree in dtype or number of dimensions"
                    )
                entry.pieces.append((path, key, offsets, shape))
    return tensors


def _assemble(name: str, entry: _Pieces) -> torch.Tensor:
    """The whole tensor, every element placed exactly once (a replicated duplicate must match)."""
    shape = entry.shape()
    whole: torch.Tensor | None = None
    placed = torch.zeros(shape, dtype=torch.bool)
    for path, key, offsets, piece_shape in entry.pieces:
        if len(shape) != len(offsets) or any(
            o + n > d for o, n, d in zip(offsets, piece_shape, shape, strict=True)
        ):
            raise CheckpointError(
                f"a piece of `{name}` at offsets {list(offsets)} (shape {list(piece_shape)}, "
                f"{path.name}) lies outside its whole shape {list(shape)}"
            )
        with safe_open(str(path), framework="pt") as shard:
            piece = shard.get_tensor(key)
        if whole is None:
            whole = torch.empty(shape, dtype=piece.dtype)
        region = tuple(slice(o, o + s) for o, s in zip(offsets, piece_shape, strict=True))
        if placed[region].any():
            if placed[region].all() and torch.equal(whole[region], piece):
                continue  # the same replicated values, written twice
            raise CheckpointError(f"the pieces of `{name}` overlap at offsets {list(offsets)} ({path.name})")
        whole[region] = piece
        placed[region] = True
    if not bool(placed.all()):
        missing = int(placed.numel() - placed.sum())
        raise CheckpointError(
            f"the pieces of `{name}` leave {missing} of {placed.numel()} elements unwritten: a shard file "
            "is missing from the checkpoint"
        )
    assert whole is not None  # at least one piece per entry
    return whole


def _whole_weights(folder: Path, files: list[str]) -> dict[str, torch.Tensor]:
    if MODEL_FILE in files:  # an unsharded checkpoint: the weights are whole already
        with safe_open(str(folder / MODEL_FILE), framework="pt") as model:
            return {key: model.get_tensor(key) for key in model.keys()}  # noqa: SIM118
    shard_files = sorted(name for name in files if name.startswith(SHARD_DIR + "/"))
    if not shard_files:
        raise CheckpointError(f"{folder} holds no model weights ({MODEL_FILE} or {SHARD_DIR}/)")
    pieces = _gather_pieces(folder, shard_files)
    document = json.loads((folder / JSON_FILE).read_bytes())
    shapes = ((document.get("parts") or {}).get(SHARD_INFO_PART) or {}).get("shapes")
    if shapes is not None:  # checkpoints written before the shapes were saved infer them
        for key, shape in shapes.items():
            if not key.startswith(MODEL_PREFIX):
                continue
            name = key[len(MODEL_PREFIX) :]
            if name not in pieces:
                raise CheckpointError(f"no shard of {folder} holds any of `{name}`: a shard file is missing")
            pieces[name].whole_shape = tuple(shape)
    return {name: _assemble(name, entry) for name, entry in sorted(pieces.items())}


def _split(weights: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors into files of at most ``max_shard_bytes`` each (a larger tensor gets a file of its own)."""
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append({})
            size = 0
        files[-1][name] = tensor
        size += nbytes
    return files


def consolidate(
    checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], max_shard_bytes: int = 5 * 10**9
) -> list[Path]:
    """Write a checkpoint's whole model weights as safetensors for ``from_pretrained``-style loaders.

    Args:
        checkpoint (`str` or `os.PathLike`): a checkpoint folder, or a checkpoint directory (its
            newest valid checkpoint is used). Sharded and unsharded checkpoints both work.
        out_dir (`str` or `os.PathLike`): where to write; created if missing. Files already there
            with the output's names are not overwritten.
        max_shard_bytes (`int`, *optional*, defaults to 5 GB): above this total, the weights are
            split into ``model-0000K-of-0000N.safetensors`` with a ``model.safetensors.index.json``.

    Returns:
        `list[Path]`: the files written.

    Raises:
        CheckpointError: the checkpoint does not verify against its manifest, a shard is not
            plain safetensors, or the shards do not tile the whole tensors.
        FileExistsError: an output file exists already.
    """
    folder = _checkpoint_folder(Path(checkpoint))
    check = verify_checkpoint(folder)
    if not check.ok:
        raise CheckpointError(f"{folder} does not verify, nothing consolidated: {check.problem}")
    weights = _whole_weights(folder, list((check.manifest or {})["files"]))
    groups = _split(weights, max_shard_bytes)
    if len(groups) == 1:
        names = [MODEL_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    out = Path(out_dir)
    targets = [out / name for name in names] + ([out / INDEX_FILE] if len(groups) > 1 else [])
    existing = [str(path) for path in targets if path.exists()]
    if existing:
        raise FileExistsError(f"not overwritten: {', '.join(existing)}; name an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for name, group in zip(names, groups, strict=True):
        save_file(group, str(out / name), metadata={"format": "pt"})
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in weights.values())
        weight_map = {key: name for name, group in zip(names, groups, strict=True) for key in group}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return targets
