"""Fault injectors for tests of training code: NaN/Inf in the loss or a gradient, poison batches.

They are small and deterministic, so a test can say exactly which step goes wrong:

>>> loss_fn = nonfinite_loss(torch.nn.CrossEntropyLoss(), at_calls={5})  # 5th call returns NaN
>>> loss_fn = spiking_loss(torch.nn.MSELoss(), at_calls=range(40, 46), factor=1e4)  # a finite spike
>>> hook = NonFiniteGradient("head.weight", step=3)   # Inf in one gradient at step 3
>>> data = PoisonedDataset(dataset, indices={17}, value=float("nan"))  # sample 17 holds NaN
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.data import Dataset

from safeloop.callbacks import Callback

__all__ = ["nonfinite_loss", "spiking_loss", "NonFiniteGradient", "PoisonedDataset"]


def nonfinite_loss(
    loss_fn: Callable[..., torch.Tensor], *, at_calls: Iterable[int], value: float = float("nan")
) -> Callable[..., torch.Tensor]:
    """Wrap ``loss_fn`` so that the given calls return a non-finite loss.

    The loss is multiplied by ``value``, so the graph stays connected and the gradients of that
    micro-batch are non-finite too, as with a real overflow. Only calls with gradients enabled
    count (evaluation and replays run under ``torch.no_grad``), so with
    ``gradient_accumulation_steps=1`` call ``k`` is the loss of global step ``k``.

    Args:
        loss_fn (`Callable`): the loss to wrap, ``loss_fn(outputs, targets)``.
        at_calls (`Iterable[int]`): 1-based call numbers that go non-finite.
        value (`float`, *optional*, defaults to NaN): ``nan``, ``inf`` or ``-inf``.

    Returns:
        `Callable`: the wrapped loss; its ``calls`` attribute counts calls so far.
    """
    targets = frozenset(at_calls)

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = loss_fn(*args, **kwargs)
        if not torch.is_grad_enabled():
            return loss  # evaluation or safeloop's replay of a skipped batch: not a training call
        wrapped.calls += 1  # type: ignore[attr-defined]
        if wrapped.calls in targets:  # type: ignore[attr-defined]
            loss = loss * value
        return loss

    wrapped.calls = 0  # type: ignore[attr-defined]
    return wrapped


def spiking_loss(
    loss_fn: Callable[..., torch.Tensor], *, at_calls: Iterable[int], factor: float = 1e3
) -> Callable[..., torch.Tensor]:
    """Wrap ``loss_fn`` so that the given training calls return the loss times ``factor``.

    A finite loss spike, with gradients scaled alike (as a bad batch or an LR excursion gives);
    calls are counted as in :func:`nonfinite_loss`.

    Example:
        >>> loss_fn = spiking_loss(torch.nn.MSELoss(), at_calls=range(40, 46), factor=1e4)
    """
    return nonfinite_loss(loss_fn, at_calls=at_calls, value=factor)


class NonFiniteGradient(Callback):
    """Writes a non-finite value into one gradient element just before a given step.

    Args:
        param_name (`str`): the parameter's name in the (unwrapped) model, e.g. ``"2.weight"``.
        step (`int`): the global step (1-based) whose gradient to corrupt.
        value (`float`, *optional*, defaults to Inf): the value written.
    """

    def __init__(self, param_name: str, step: int, value: float = float("inf")) -> None:
        self.param_name = param_name
        self.step = step
        self.value = value

    def on_after_backward(self, trainer: Any) -> None:
        """Corrupt the gradient on the last micro-batch of the target step."""
        if trainer.global_step + 1 != self.step or not trainer.accelerator.sync_gradients:
            return
        param = trainer.accelerator.unwrap_model(trainer.model).get_parameter(self.param_name)
        if param.grad is None:
            raise ValueError(
                f"`{self.param_name}` has no gradient at step {self.step}; pick a trained parameter"
            )
        param.grad.view(-1)[0] = self.value


class PoisonedDataset(Dataset):
    """A dataset whose chosen samples have every input element replaced by ``value``.

    Args:
        dataset (`Dataset`): yields ``(inputs, targets)`` pairs.
        indices (`Iterable[int]`): samples to poison.
        value (`float`, *optional*, defaults to 1e38): e.g. a huge value (overflow) or NaN.
    """

    def __init__(self, dataset: Dataset, indices: Iterable[int], value: float = 1e38) -> None:
        self.dataset = dataset
        self.indices = frozenset(indices)
        self.value = value

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        inputs, targets = self.dataset[index]
        if index in self.indices:
            inputs = torch.full_like(inputs, self.value)
        return inputs, targets
