"""Training metrics kept on the device and read on the host once per log interval.

A per-step host read (``.item()``) stalls a GPU pipeline, so every step only appends two
device scalars (loss and global gradient norm) to a buffer that holds at most ``log_every``
entries; ``collect`` turns them into host numbers with a single read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["MetricBuffer", "LogRecord"]


@dataclass(frozen=True)
class LogRecord:
    """Host-side summary of the steps since the previous log.

    Attributes:
        loss (`float`): mean training loss over those steps and over all processes.
        last_loss (`float`): mean loss over processes of the last step alone.
        grad_norm (`float`): global gradient norm of the last step (pre-clipping).
        steps (`int`): number of steps summarised.
        steps_per_sec (`float`): optimizer steps per second over the interval.
    """

    loss: float
    last_loss: float
    grad_norm: float
    steps: int
    steps_per_sec: float


class MetricBuffer:
    """A bounded buffer of per-step device scalars.

    Args:
        capacity (`int`): the number of steps between two reads (``log_every``).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._losses: list[torch.Tensor] = []
        self._norms: list[torch.Tensor] = []
        self._since = time.perf_counter()

    def __len__(self) -> int:
        return len(self._losses)

    def record(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Keep the step's loss and gradient norm, still on the device.

        Args:
            loss (`torch.Tensor`): detached scalar loss of the step (mean over micro-batches).
            grad_norm (`torch.Tensor`): global gradient norm of the step.
        """
        if len(self._losses) >= self.capacity:
            # collect() was not called in time; drop the oldest rather than grow without bound.
            self._losses.pop(0)
            self._norms.pop(0)
        self._losses.append(loss)
        self._norms.append(grad_norm)

    def restart_clock(self) -> None:
        """Start timing the next interval now (at the start of ``fit``)."""
        self._since = time.perf_counter()

    def collect(self, reduce_mean: callable) -> LogRecord | None:  # type: ignore[valid-type]
        """Average the buffered values over processes and read them on the host, then clear.

        Args:
            reduce_mean (`Callable[[Tensor], Tensor]`): mean over processes (e.g.
                ``accelerator.reduce(t, "mean")``); every process must call ``collect`` together.

        Returns:
            `LogRecord | None`: the summary, or None when no step was recorded.
        """
        if not self._losses:
            return None
        losses = torch.stack([t.float().reshape(()) for t in self._losses])
        norms = torch.stack([t.float().reshape(()) for t in self._norms])
        stacked = reduce_mean(torch.stack([losses, norms]))
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        steps = len(self._losses)
        # host sync, once per log_every steps: the only read of training metrics.
        loss_values, norm_values = stacked.tolist()
        self._losses.clear()
        self._norms.clear()
        self._since = now
        return LogRecord(
            loss=sum(loss_values) / steps,
            last_loss=loss_values[-1],
            grad_norm=norm_values[-1],
            steps=steps,
            steps_per_sec=steps / elapsed,
        )
