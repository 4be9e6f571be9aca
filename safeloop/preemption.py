"""Preemption and Ctrl-C: the trainer checkpoints at the next step boundary and stops.

Cluster schedulers send SIGTERM (SLURM can be asked for SIGUSR1) some time before they kill a job:
``fit`` then returns (``FitResult.status == "preempted"``). Ctrl-C (SIGINT) is handled the same
way, except that ``fit`` then raises ``KeyboardInterrupt`` again, so that a script stops where a
user expects; a second Ctrl-C stops at once. The handlers only record the signal; the trainer
acts at a step boundary, never mid-step.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

from accelerate import Accelerator

from safeloop.distributed import agree_any

__all__ = ["PreemptionWatch", "PREEMPTION_SIGNALS", "INTERRUPT_SIGNAL"]

PREEMPTION_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s
)


INTERRUPT_SIGNAL = signal.SIGINT


class PreemptionWatch:
    """Installs handlers for the run's duration and remembers the first signal received.

    Args:
        interrupts (`bool`, *optional*, defaults to True): handle SIGINT too (Ctrl-C).
    """

    def __init__(self, interrupts: bool = True) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._signals = PREEMPTION_SIGNALS + ((INTERRUPT_SIGNAL,) if interrupts else ())

    def __enter__(self) -> PreemptionWatch:
        # signal handlers can only be set from the main thread; elsewhere the run is not watched
        if threading.current_thread() is threading.main_thread():
            for signum in self._signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == INTERRUPT_SIGNAL and self.received == INTERRUPT_SIGNAL:
            # the second Ctrl-C: the user will not wait for the step to end
            signal.signal(signum, self._previous.get(signum, signal.default_int_handler))
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            if signum == INTERRUPT_SIGNAL:
                sys.stderr.write(
                    "\nsafeloop: Ctrl-C: finishing this step and saving a checkpoint (with checkpoint_dir), "
                    "then stopping; press Ctrl-C again to stop at once.\n"
                )
                sys.stderr.flush()

    @property
    def interrupted(self) -> bool:
        """Whether the signal received is SIGINT (Ctrl-C)."""
        return self.received == INTERRUPT_SIGNAL

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
