"""Which layers' gradient norms rose most between two log checks (for ``exploding-grad``).

The training monitor keeps each log check's per-parameter mean gradient norms; comparing them
with the previous check's names the layers where an explosion grows. Host side only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from safeloop.diagnostics.updates import listing

__all__ = ["LayerRise", "RISE_LAYERS"]

# Parameters named as those whose gradient norm rose most.
RISE_LAYERS = 3


class LayerRise:
    """The parameters whose interval mean gradient norm rose most since the previous log check.

    Args:
        names (`Sequence[str]`): the parameter names, in the order of the norms given.

    Attributes:
        last (`tuple[str, tuple[str, ...]]`): the text for a message and the names, of the last
            check; ``("", ())`` when nothing was measured.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.last: tuple[str, tuple[str, ...]] = ("", ())
        self._previous: tuple[int, list[float]] | None = None  # the last check's step and norms

    def restart(self) -> None:
        """Forget the previous check (after a rollback: it belongs to the abandoned branch)."""
        self._previous = None
        self.last = ("", ())

    def update(self, step: int, grads: Sequence[float] | None, trainable: Sequence[int]) -> None:
        """Compare this check's mean gradient norms with the previous check's.

        At the first check, with nothing to compare with, the largest norms are named instead.

        Args:
            step (`int`): the step of the check.
            grads (`Sequence[float]`, *optional*): mean gradient norm per parameter; None when
                per-parameter norms are not measured.
            trainable (`Sequence[int]`): the indices of the trainable parameters.
        """
        if grads is None:
            self.last = ("", ())
            return
        previous, self._previous = self._previous, (step, list(grads))
        live = [i for i in trainable if 0 < grads[i] < math.inf]
        if previous is None:
            top = sorted(((self.names[i], grads[i]) for i in live), key=lambda t: -t[1])[:RISE_LAYERS]
            text = f"largest mean gradient norms of the log interval ending at step {step}: {listing(top)}"
        else:
            at, before = previous
            rises = ((self.names[i], grads[i] / before[i]) for i in live if grads[i] > before[i] > 0)
            top = sorted(rises, key=lambda t: -t[1])[:RISE_LAYERS]
            shown = ", ".join(f"`{name}` {ratio:.3g}x" for name, ratio in top)
            text = (
                f"mean gradient norms that rose most from the log check of step {at} to step {step}: {shown}"
            )
        self.last = (text, tuple(name for name, _ in top)) if top else ("", ())
