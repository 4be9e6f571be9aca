"""safeloop: PyTorch training loops that are safe to run and easy to debug.

``SafeTrainer`` and ``Callback`` are imported when first used (PEP 562): ``import safeloop`` and the
``safeloop report`` command do not pay for torch and Accelerate until a trainer is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from safeloop.errors import CheckpointError, ConfigError, DivergenceError, NonFiniteError, SafeLoopError
from safeloop.lr_finder.result import LRFinderResult
from safeloop.results import Event, Finding, FitResult, NoiseScaleEstimate

if TYPE_CHECKING:
    from safeloop.callbacks import Callback
    from safeloop.trainer import SafeTrainer

__all__ = [
    "SafeTrainer",
    "Callback",
    "FitResult",
    "LRFinderResult",
    "NoiseScaleEstimate",
    "Event",
    "Finding",
    "SafeLoopError",
    "ConfigError",
    "NonFiniteError",
    "DivergenceError",
    "CheckpointError",
]

__version__ = "0.1.0.dev0"

_LAZY = {"SafeTrainer": "safeloop.trainer", "Callback": "safeloop.callbacks"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safeloop' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
