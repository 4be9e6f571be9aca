"""safeloop: PyTorch training loops that are safe to run and easy to debug."""

from safeloop.callbacks import Callback
from safeloop.errors import CheckpointError, ConfigError, DivergenceError, NonFiniteError, SafeLoopError
from safeloop.lr_finder.result import LRFinderResult
from safeloop.results import Event, Finding, FitResult
from safeloop.trainer import SafeTrainer

__all__ = [
    "SafeTrainer",
    "Callback",
    "FitResult",
    "LRFinderResult",
    "Event",
    "Finding",
    "SafeLoopError",
    "ConfigError",
    "NonFiniteError",
    "DivergenceError",
    "CheckpointError",
]

__version__ = "0.1.0.dev0"
