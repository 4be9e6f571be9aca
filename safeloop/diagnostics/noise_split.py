"""``gradient_noise_scale="split"``: a batch cut into two halves along its first dimension.

One process without gradient accumulation has one batch size; the split runs the first half and
the second half as two backwards, each loss weighted by its share, so the first half's gradient
is a small batch and the sum the whole one (``noise_scale.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["split_halves"]


def split_halves(batch: Any) -> tuple[Any, Any] | None:
    """``batch`` cut along its first dimension into two halves, or None when it cannot be.

    Tensors, and tuples, lists and dicts of them (nested), with one shared first dimension of at
    least 2; anything else (a string, a tensor of another length) refuses the split.
    """
    sizes: set[int] = set()
    _first_dims(batch, sizes)
    if len(sizes) != 1 or (size := sizes.pop()) < 2:
        return None
    half = size // 2
    return _cut(batch, 0, half), _cut(batch, half, size)


def _first_dims(value: Any, sizes: set[int]) -> None:
    if isinstance(value, torch.Tensor):
        sizes.add(int(value.shape[0]) if value.dim() > 0 else -1)
    elif isinstance(value, Mapping):
        for item in value.values():
            _first_dims(item, sizes)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _first_dims(item, sizes)
    else:
        sizes.add(-1)


def _cut(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    if isinstance(value, Mapping):
        cut = {key: _cut(item, start, stop) for key, item in value.items()}
        try:
            return type(value)(cut)  # a dict subclass, Hugging Face's BatchEncoding
        except TypeError:
            return cut
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_cut(item, start, stop) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(item, start, stop) for item in value)
    return value
