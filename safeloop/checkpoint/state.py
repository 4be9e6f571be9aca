"""The training state of a run, as the files of one checkpoint and back.

Files: ``model.safetensors`` (the unwrapped model, tied weights stored once),
``state.safetensors`` (every other tensor: optimizer moments, RNG states...) and ``state.json``
(everything else: param groups, scheduler, scaler, counters, data position, guard state).
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
from safeloop.checkpoint.store import FileContent

__all__ = ["SavedState", "state_files", "read_state"]

MODEL_FILE = "model.safetensors"
TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"


@dataclass(frozen=True)
class SavedState:
    """Everything a checkpoint holds, in memory.

    Attributes:
        model (`dict[str, Tensor]`): the unwrapped model's state dict.
        parts (`dict[str, Any]`): ``optimizer``, ``lr_scheduler``, ``scaler``, ``rng``,
            ``rng_epoch_start`` state dicts (absent ones are None).
        trainer (`dict[str, Any]`): counters, data position and guard state (JSON values).
    """

    model: dict[str, torch.Tensor]
    parts: dict[str, Any]
    trainer: dict[str, Any]


def state_files(
    model_state: Mapping[str, torch.Tensor], parts: Mapping[str, Any], trainer: Mapping[str, Any]
) -> dict[str, FileContent]:
    """Return the checkpoint's files: JSON as bytes, tensors as writers straight to disk.

    Raises:
        CheckpointError: when some state is neither tensors nor JSON (named with its path).
    """
    model_tensors, aliases = dedupe_tensors(model_state)
    trees: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, part in parts.items():
        if part is None:
            trees[name] = None
            continue
        tree, part_tensors = split_state(part, name)
        trees[name] = tree
        tensors.update({f"{name}/{key}": value for key, value in part_tensors.items()})
    # keys inside each tree point at "<part>/<key>"; record the prefix so joining finds them
    state_tensors, state_aliases = dedupe_tensors(tensors)
    document = {
        "model_aliases": aliases,
        "state_aliases": state_aliases,
        "parts": trees,
        "trainer": dict(trainer),
    }
    return {
        MODEL_FILE: lambda path: save_file(model_tensors, str(path)),
        TENSORS_FILE: lambda path: save_file(state_tensors, str(path)),
        JSON_FILE: json.dumps(document, sort_keys=True).encode(),
    }


def read_state(path: str | Path) -> SavedState:
    """Read the files of a verified checkpoint folder."""
    path = Path(path)
    document = json.loads((path / JSON_FILE).read_bytes())
    model = tensors_from_bytes((path / MODEL_FILE).read_bytes(), document["model_aliases"])
    tensors = tensors_from_bytes((path / TENSORS_FILE).read_bytes(), document["state_aliases"])
    parts: dict[str, Any] = {}
    for name, tree in document["parts"].items():
        if tree is None:
            parts[name] = None
            continue
        prefix = f"{name}/"
        own = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        parts[name] = join_state(tree, own)
    return SavedState(model=model, parts=parts, trainer=document["trainer"])
