"""Training state <-> safetensors bytes and JSON values. Nothing is pickled, ever.

Tensors go to safetensors (tied tensors stored once, with aliases); everything else must be
JSON: numbers, strings, booleans, None, lists and dicts of them. State that cannot be expressed
so (a lambda in a scheduler, an object in a param group) is reported with its path, never dropped
in silence.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from safeloop.errors import CheckpointError

__all__ = [
    "tensors_to_bytes",
    "dedupe_tensors",
    "tensors_from_bytes",
    "split_state",
    "join_state",
    "capture_rng",
    "restore_rng",
]

_TENSOR_REF = "__tensor__"
_FLOAT = "__float__"


def tensors_to_bytes(named: Mapping[str, torch.Tensor]) -> tuple[bytes, dict[str, str]]:
    """Serialise tensors with safetensors; tensors sharing storage are stored once.

    Returns:
        `tuple[bytes, dict[str, str]]`: the safetensors bytes and ``alias -> stored name`` for
        tensors that are the same view of the same storage as a stored one (tied weights).
    """
    stored, aliases = dedupe_tensors(named)
    return save_tensors(stored), aliases


def dedupe_tensors(
    named: Mapping[str, torch.Tensor], *, copy: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return the tensors to store (contiguous, on the CPU) and the aliases of tied ones.

    Args:
        named (`Mapping[str, Tensor]`): the tensors by name.
        copy (`bool`, *optional*, defaults to False): always copy (a snapshot that training
            may go on changing while a background thread writes it).
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for name, tensor in named.items():
        tensor = tensor.detach()
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
            str(tensor.device),
        )
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        ptr = tensor.untyped_storage().data_ptr()
        # another view of an already stored storage: safetensors refuses overlap, so copy it
        shared = tensor.numel() > 0 and ptr in storages
        storages.add(ptr)
        seen[key] = name
        if shared or copy:
            stored[name] = tensor.to("cpu", copy=True, memory_format=torch.contiguous_format)
        else:
            stored[name] = tensor.contiguous().cpu()
    return stored, aliases


def tensors_from_bytes(data: bytes, aliases: Mapping[str, str] = ()) -> dict[str, torch.Tensor]:
    """Load tensors written by :func:`tensors_to_bytes`, re-creating aliases as shared tensors."""
    tensors = load_tensors(data)
    for alias, name in dict(aliases).items():
        tensors[alias] = tensors[name]
    return tensors


def _to_json(value: Any, path: str, tensors: dict[str, torch.Tensor], problems: list[str]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"{len(tensors)}:{path}"
        tensors[key] = value
        return {_TENSOR_REF: key}
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        # JSON has no NaN/Inf: keep them exact as strings
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return _to_json(value.item(), path, tensors, problems)
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{path}[{i}]", tensors, problems) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                problems.append(f"{path}: key {key!r} of type {type(key).__name__}")
                continue
            # JSON keys are strings; int keys (optimizer state indices) are tagged to come back as ints
            out[f"#int:{key}" if isinstance(key, int) else key] = _to_json(
                item, f"{path}.{key}", tensors, problems
            )
        return out
    problems.append(f"{path}: {type(value).__name__} {value!r:.60}")
    return None


def _from_json(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TENSOR_REF}:
            return tensors[value[_TENSOR_REF]]
        if set(value) == {_FLOAT}:
            return float(value[_FLOAT])
        return {
            (int(k[5:]) if k.startswith("#int:") else k): _from_json(v, tensors) for k, v in value.items()
        }
    return value


def split_state(state: Mapping[str, Any], what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split a state dict into a JSON tree and the tensors it references.

    Args:
        state (`Mapping[str, Any]`): e.g. ``optimizer.state_dict()`` or a scheduler's.
        what (`str`): its name in error messages (``"optimizer"``).

    Returns:
        `tuple[dict, dict[str, Tensor]]`: the JSON-able tree and the tensors by key.

    Raises:
        CheckpointError: listing every value that is neither a tensor nor JSON-able.
    """
    tensors: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    tree = _to_json(dict(state), what, tensors, problems)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"the {what} state holds {len(problems)} values that are neither tensors nor JSON "
            f"(numbers, strings, lists, dicts), so they cannot be saved without pickle:\n{listed}{more}\n"
            "Keep such objects out of the state (e.g. use a scheduler without lambdas, or one whose "
            "lambda is recreated by your script)."
        )
    return tree, tensors


def join_state(tree: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`split_state`."""
    return _from_json(dict(tree), tensors)


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return this process's RNG states (Python, NumPy, torch CPU and CUDA) as JSON and tensors."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    tree = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": np_kind,
            "keys": np.asarray(np_keys).tolist(),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    for i in range(tree["cuda_devices"]):
        tensors[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    return tree, tensors


def restore_rng(tree: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore RNG states saved by :func:`capture_rng`."""
    py = tree["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = tree["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            np.asarray(npy["keys"], dtype=np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(tensors["torch_cpu"])
    for i in range(int(tree.get("cuda_devices", 0))):
        if torch.cuda.is_available() and i < torch.cuda.device_count():
            torch.cuda.set_rng_state(tensors[f"torch_cuda_{i}"], i)
