"""Preemption: SIGTERM or SIGUSR1 make the trainer checkpoint at the next step boundary and return.

Cluster schedulers send SIGTERM (SLURM can be asked for SIGUSR1) some time before they kill a job.
The handler only records the signal; the trainer acts at a step boundary, never mid-step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from accelerate import Accelerator

from safeloop.distributed import agree_any

__all__ = ["PreemptionWatch", "PREEMPTION_SIGNALS"]

PREEMPTION_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s
)


class PreemptionWatch:
    """Installs handlers for the run's duration and remembers the first signal received."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionWatch:
        # signal handlers can only be set from the main thread; elsewhere the run is not watched
        if threading.current_thread() is threading.main_thread():
            for signum in PREEMPTION_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    @property
    def name(self) -> str:
        """The received signal's name, e.g. ``"SIGTERM"``."""
        return signal.Signals(self.received).name if self.received is not None else ""

    def agreed(self, accelerator: Accelerator, step: int, log_every: int) -> bool:
        """Whether the run stops for a signal after ``step``; all ranks decide together.

        One process stops at the next step boundary. Several processes may get the signal at
        different steps, so they agree at log steps, which all ranks share (a tiny collective,
        once per ``log_every`` steps).
        """
        if accelerator.num_processes == 1:
            return self.received is not None
        if step % log_every != 0:
            return False
        return agree_any(accelerator, self.received is not None)
