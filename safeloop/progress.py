"""The tqdm progress bar, shown on the main process only."""

from __future__ import annotations

import math

from tqdm.auto import tqdm

from safeloop.metrics import LogRecord

__all__ = ["ProgressBar", "planned_steps"]


def planned_steps(
    *, max_steps: int | None, max_epochs: int, batches_per_epoch: int | None, accumulation: int
) -> int | None:
    """Return the optimizer steps a run will take, or None when the length is unknown.

    Args:
        max_steps (`int`, *optional*): the step budget; wins when set.
        max_epochs (`int`): epochs to run otherwise.
        batches_per_epoch (`int`, *optional*): micro-batches per epoch on this process.
        accumulation (`int`): micro-batches per optimizer step; a partial last window counts.

    Example:
        >>> planned_steps(max_steps=None, max_epochs=2, batches_per_epoch=10, accumulation=4)
        6
    """
    if max_steps is not None:
        return max_steps
    if batches_per_epoch is None:
        return None
    return max_epochs * math.ceil(batches_per_epoch / accumulation)


class ProgressBar:
    """A step counter with loss, lr and gradient norm, updated at log steps.

    Args:
        total (`int`, *optional*): planned optimizer steps.
        enabled (`bool`): False on non-main processes or when the user turned it off.
        initial (`int`): steps already done (a resumed run).
    """

    def __init__(self, total: int | None, *, enabled: bool, initial: int = 0) -> None:
        self._bar = tqdm(
            total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True
        )

    def advance(self) -> None:
        """Count one optimizer step (host-only, no device read)."""
        self._bar.update(1)

    def show(self, record: LogRecord, lr: float) -> None:
        """Show the metrics of the last log interval."""
        self._bar.set_postfix(
            loss=f"{record.loss:.4g}", lr=f"{lr:.3g}", grad_norm=f"{record.grad_norm:.3g}", refresh=False
        )

    def close(self) -> None:
        """Close the bar (idempotent)."""
        self._bar.close()
