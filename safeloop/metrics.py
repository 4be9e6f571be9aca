"""Training metrics kept on the device and read on the host once per log interval.

A per-step host read (``.item()``) stalls a GPU pipeline, so every step only appends one small
device row (loss, global gradient norm, and with the NaN/Inf guard its flag and which gradients
were non-finite) to a buffer that holds at most ``log_every`` rows; ``collect`` turns them into
host numbers with a single read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["MetricBuffer", "LogRecord", "StepValues"]


@dataclass(frozen=True)
class StepValues:
    """Host values of one step (means over processes).

    Attributes:
        loss (`float`): the step's loss.
        grad_norm (`float`): global gradient norm before clipping.
        finite (`bool | None`): the guard's flag; None with the guard off.
        overflow (`bool`): the fp16 GradScaler found an overflow (its own skip, not the guard's).
        bad_params (`tuple[int, ...]`): indices, in ``model.parameters()`` order, of the
            parameters whose gradient norm was not finite (empty when unknown).
    """

    loss: float
    grad_norm: float
    finite: bool | None = None
    overflow: bool = False
    bad_params: tuple[int, ...] = ()


@dataclass(frozen=True)
class LogRecord:
    """Host-side summary of the steps since the previous log.

    Attributes:
        loss (`float`): mean training loss over the applied steps (NaN when none was).
        grad_norm (`float`): global gradient norm of the last step (pre-clipping).
        steps (`int`): number of steps summarised.
        steps_per_sec (`float`): optimizer steps per second over the interval.
        per_step (`tuple[StepValues, ...]`): the values of each step, oldest first.
    """

    loss: float
    grad_norm: float
    steps: int
    steps_per_sec: float
    per_step: tuple[StepValues, ...]


class MetricBuffer:
    """A bounded buffer of per-step device rows.

    Args:
        capacity (`int`): the number of steps between two reads (``log_every``).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rows: list[torch.Tensor] = []
        self._has_flag = False
        self._zeros: torch.Tensor | None = None
        self._since = time.perf_counter()

    def __len__(self) -> int:
        return len(self._rows)

    def record(
        self,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        flag: torch.Tensor | None = None,
        param_norms: torch.Tensor | None = None,
        overflow: torch.Tensor | None = None,
    ) -> None:
        """Keep the step's values, still on the device.

        Args:
            loss (`torch.Tensor`): detached scalar loss of the step (mean over micro-batches).
            grad_norm (`torch.Tensor`): global gradient norm of the step.
            flag (`torch.Tensor`, *optional*): the guard's finite flag (1 applied, 0 skipped).
            param_norms (`torch.Tensor`, *optional*): the gradient norm of each parameter of the
                model; a non-finite one names a parameter whose gradient was not finite (read on
                the host at the log step, not turned into a mask here every step).
            overflow (`torch.Tensor`, *optional*): the fp16 scaler's found-inf for the step.
        """
        self._has_flag = flag is not None
        if len(self._rows) >= self.capacity:
            self._rows.pop(0)  # collect() was not called in time: never grow without bound
        # one stack of the 0-dim values and one cat: this runs every step, and every Python call
        # into torch costs a few thousand instructions (a step's row took 15 of them before)
        scalars = [loss, grad_norm]
        if flag is not None:
            scalars += [flag, self._zero(flag) if overflow is None else overflow.reshape(())]
        try:
            row = torch.stack(scalars)
            if flag is not None and param_norms is not None:
                row = torch.cat([row, param_norms])
        except RuntimeError:  # on different devices (a model spread over several): moved here
            row = self._row_across_devices(scalars, param_norms if flag is not None else None)
        self._rows.append(row if row.dtype == torch.float32 else row.float())

    @staticmethod
    def _row_across_devices(scalars: list[torch.Tensor], param_norms: torch.Tensor | None) -> torch.Tensor:
        device = scalars[0].device
        parts = [value.reshape(1).float() for value in scalars]
        if param_norms is not None:
            parts.append(param_norms.reshape(-1).float())
        return torch.cat([part.to(device) for part in parts])

    def _zero(self, like: torch.Tensor) -> torch.Tensor:
        """A 0-dim zero with ``like``'s dtype and device, made once (no allocation, no check per step).

        Should the flag later live on another device, the row's ``stack`` refuses the pair and
        :meth:`_row_across_devices` moves them.
        """
        if self._zeros is None:
            self._zeros = torch.zeros((), dtype=like.dtype, device=like.device)
        return self._zeros

    def clear(self) -> None:
        """Drop the buffered rows unread (their steps were undone by a rollback)."""
        self._rows.clear()

    def unread_norms(self, reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
        """The global gradient norms of the buffered steps, oldest first; the rows stay buffered.

        A host read of its own: only for a step the host has waited for anyway (a refused step
        learnt at the step), never per step. Every process must call it together.

        Args:
            reduce_mean (`Callable[[Tensor], Tensor]`): mean over processes.
        """
        if not self._rows:
            return []
        return reduce_mean(torch.stack([row[1] for row in self._rows])).tolist()

    def restart_clock(self) -> None:
        """Start timing the next interval now (at the start of ``fit``)."""
        self._since = time.perf_counter()

    def collect(
        self, reduce_mean: Callable[[torch.Tensor], torch.Tensor], extra: torch.Tensor | None = None
    ) -> tuple[LogRecord | None, list[float]]:
        """Average the buffered rows over processes and read them on the host, then clear.

        Args:
            reduce_mean (`Callable[[Tensor], Tensor]`): mean over processes; every process must
                call ``collect`` together.
            extra (`torch.Tensor`, *optional*): a 1-D device vector to read in the same transfer
                (values equal on every process, e.g. weight-health measurements).

        Returns:
            `tuple[LogRecord | None, list[float]]`: the summary (None when no step was
            recorded) and the host values of ``extra``.
        """
        if not self._rows:
            return None, []
        width = max(row.numel() for row in self._rows)
        # rows without a mask (no gradient measured) are padded so that one stack holds all
        rows = [row if row.numel() == width else F.pad(row, (0, width - row.numel())) for row in self._rows]
        stacked = torch.stack(rows).flatten()
        tail = 0 if extra is None else extra.numel()
        if extra is not None:
            stacked = torch.cat([stacked, extra.float().to(stacked.device)])
        reduced = reduce_mean(stacked)
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        flat = reduced.tolist()  # host sync, once per log_every steps: the one metrics read
        extra_values = flat[len(flat) - tail :]
        values = [flat[i * width : (i + 1) * width] for i in range(len(rows))]
        self._rows.clear()
        self._since = now
        per_step = tuple(self._step_values(row) for row in values)
        applied = [s.loss for s in per_step if s.finite is not False and math.isfinite(s.loss)]
        record = LogRecord(
            loss=sum(applied) / len(applied) if applied else math.nan,
            grad_norm=per_step[-1].grad_norm,
            steps=len(per_step),
            steps_per_sec=len(per_step) / elapsed,
            per_step=per_step,
        )
        return record, extra_values

    def _step_values(self, row: list[float]) -> StepValues:
        if not self._has_flag:
            return StepValues(loss=row[0], grad_norm=row[1])
        bad = tuple(i for i, v in enumerate(row[4:]) if not math.isfinite(v))
        # flags are agreed by all ranks, so their means over processes are exactly 0.0 or 1.0
        return StepValues(
            loss=row[0], grad_norm=row[1], finite=row[2] >= 1.0, overflow=row[3] > 0, bad_params=bad
        )
