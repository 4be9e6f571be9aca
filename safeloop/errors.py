"""Exception hierarchy of safeloop.

Every error raised on purpose by safeloop derives from :class:`SafeLoopError`, so a caller can
catch them all at once. An error raised because of a diagnosis carries the findings behind it.
"""

from __future__ import annotations

from collections.abc import Sequence

from safeloop.results import Finding

__all__ = [
    "SafeLoopError",
    "ConfigError",
    "NonFiniteError",
    "DivergenceError",
    "CheckpointError",
]


class SafeLoopError(Exception):
    """Base class of every error safeloop raises on purpose.

    Args:
        message (`str`): what happened, where, the value seen, the likely cause and the fix.
        findings (`Sequence[Finding]`, *optional*): the findings that led to the error.
    """

    def __init__(self, message: str, *, findings: Sequence[Finding] = ()) -> None:
        super().__init__(message)
        self.findings: tuple[Finding, ...] = tuple(findings)


class ConfigError(SafeLoopError, ValueError):
    """A bad argument, or a batch the trainer cannot read. Raised before any update."""


class NonFiniteError(SafeLoopError):
    """The loss or the gradients were NaN/Inf and the policy said to stop."""


class DivergenceError(SafeLoopError):
    """Training diverged more often than the rollback budget allows."""


class CheckpointError(SafeLoopError):
    """No valid checkpoint could be written or read where one was required."""
