"""The torch losses a first ``training_step`` calls, checked as ``SafeTrainer`` checks its ``loss_fn``.

``SafeTrainer`` knows the loss: it is the ``loss_fn`` it was given, and it wraps it in the target
checks (class targets out of range, every target masked, regression targets far from unit
scale, softmax applied twice, a first loss far above ln(C)). Under Lightning the loss is
computed inside the user's ``training_step``. While the first batch's ``training_step`` runs,
:class:`LossCallWatch` (a ``TorchFunctionMode``) sees each call of a loss the checks recognise
(``F.cross_entropy``, ``F.nll_loss``, the BCE and regression losses, directly or through their
``nn`` modules), and runs it through the same wrapper, with the call's own keyword arguments
(``ignore_index``, ``reduction``, ...). Every other torch call passes through unchanged; after the
first batch the mode is gone and costs nothing.

A loss the checks refuse (class 3 of a 3-class head) returns a zero loss instead of torch's
``IndexError`` (or a device-side assert on CUDA, which kills the process's CUDA context): the
run then reaches ``on_before_backward``, where every process agrees on the findings and raises
the ``ConfigError`` that names the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from safeloop.diagnostics.loss_kinds import recognised_loss

__all__ = ["LossCallWatch"]

LossFn = Callable[[Any, Any], Any]


class LossCallWatch(TorchFunctionMode):
    """Runs each recognised loss call of the first ``training_step`` through the target checks.

    A context manager (a torch function mode): entered when the first batch starts, left when
    its loss reaches backward.

    Args:
        checked (`Callable`): ``checked(loss_fn)`` returns ``loss_fn`` wrapped in the checks
            (``Diagnostics.checked_loss_fn`` with the first batch's findings list).

    Attributes:
        calls (`list[str]`): the names of the losses checked, in call order.
    """

    def __init__(self, checked: Callable[[LossFn], LossFn]) -> None:
        super().__init__()
        self.checked = checked
        self.calls: list[str] = []
        self._known: dict[Any, bool] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        # inside this method the mode is off: the checks' own torch calls are not seen again
        kwargs = kwargs or {}
        if len(args) <= 2 and self._recognised(func):
            # (outputs, targets) given by position or as `input=`/`target=`; the rest stays bound
            rest = dict(kwargs)
            pair = [*args] + [rest.pop(name) for name in ("input", "target")[len(args) :] if name in rest]
            if len(pair) == 2 and all(isinstance(value, torch.Tensor) for value in pair):
                self.calls.append(getattr(func, "__name__", str(func)))
                return self.checked(functools.partial(func, **rest))(pair[0], pair[1])
        return func(*args, **kwargs)

    def _recognised(self, func: Any) -> bool:
        known = self._known.get(func)
        if known is None:  # most torch calls are not losses: decided once per function
            known = self._known[func] = recognised_loss(func)
        return known
