"""The tqdm progress bar, shown on the main process only."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from safeloop.config import TrainerConfig
from safeloop.metrics import LogRecord

__all__ = ["ProgressBar", "bar_safe_logging", "planned_steps", "steps_per_epoch"]


def planned_steps(config: TrainerConfig, dataloader: Any) -> int | None:
    """Return the optimizer steps a run will take, or None when the length is unknown.

    Args:
        config (`TrainerConfig`): ``max_steps`` wins when set, else ``max_epochs`` epochs of
            ``gradient_accumulation_steps`` micro-batches (a partial last window counts).
        dataloader (`DataLoader`): the prepared training dataloader (this process's share).
    """
    if config.max_steps is not None:
        return config.max_steps
    try:
        batches = len(dataloader)
    except TypeError:
        return None
    return config.max_epochs * math.ceil(batches / config.gradient_accumulation_steps)


def steps_per_epoch(config: TrainerConfig, dataloader: Any) -> int | None:
    """Optimizer steps in one epoch of ``dataloader`` (this process's share), or None when unknown."""
    try:
        batches = len(dataloader)
    except TypeError:
        return None
    return math.ceil(batches / config.gradient_accumulation_steps)


class ProgressBar:
    """A step counter with loss, lr and gradient norm, updated at log steps.

    Args:
        total (`int`, *optional*): planned optimizer steps.
        enabled (`bool`): False on non-main processes or when the user turned it off.
        initial (`int`): steps already done (a resumed run).
        desc (`str`, *optional*, defaults to ``"train"``): the bar's label.
    """

    def __init__(self, total: int | None, *, enabled: bool, initial: int = 0, desc: str = "train") -> None:
        self._bar = tqdm(
            total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True
        )

    def advance(self) -> None:
        """Count one optimizer step (host-only, no device read)."""
        self._bar.update(1)

    def show(self, record: LogRecord, lr: float) -> None:
        """Show the metrics of the last log interval."""
        self._bar.set_postfix(
            loss=f"{record.loss:.4g}", lr=f"{lr:.3g}", grad_norm=f"{record.grad_norm:.3g}", refresh=False
        )

    def write(self, text: str) -> None:
        """Print ``text`` to stdout above the bar (the bar, when shown, is drawn again below it)."""
        tqdm.write(text, file=sys.stdout)

    def close(self) -> None:
        """Close the bar (idempotent)."""
        self._bar.close()


def _console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
        sys.stdout,
        sys.stderr,
    )


@contextlib.contextmanager
def bar_safe_logging(enabled: bool) -> Iterator[None]:
    """While the bar is shown, send console log records through ``tqdm.write`` so none is glued to it.

    The console handlers of the ``safeloop`` logger and of the root logger are swapped for tqdm's
    for the duration; with no handler configured anywhere (Python's last-resort handler prints
    warnings to stderr), one is added to ``safeloop`` that prints what that handler would. The
    levels, and handlers that write to files, are left as they are.
    """
    if not enabled:
        yield
        return
    package, root = logging.getLogger("safeloop"), logging.getLogger()
    loggers = [log for log in (package, root) if any(_console(h) for h in log.handlers)]
    if not loggers and not package.hasHandlers():
        loggers = [package]
    if not loggers:
        yield
        return
    with logging_redirect_tqdm(loggers=loggers):
        yield
