"""The batch conventions of ``SafeTrainer``: from a batch to a scalar loss tensor.

First match wins (API.md, Batches): a ``training_step``; a mapping batch (Hugging Face style);
an ``(inputs, targets)`` pair. Anything else is a ``ConfigError`` that says which rule failed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from safeloop.errors import ConfigError

__all__ = ["compute_loss", "batch_size_of"]

LossFn = Callable[[Any, Any], Any]
TrainingStep = Callable[[torch.nn.Module, Any], Any]


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)} items"
    return type(value).__name__


def _extract_loss(value: object, where: str) -> torch.Tensor:
    """Return the loss held by ``value``: a tensor, a mapping with ``"loss"`` or ``.loss``."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping) and "loss" in value:
        loss = value["loss"]
    elif not isinstance(value, Mapping) and getattr(value, "loss", None) is not None:
        loss = value.loss  # type: ignore[attr-defined]
    else:
        raise ConfigError(
            f"{where} returned {_describe(value)}, which holds no loss. Return a scalar tensor, "
            'a mapping with key "loss", or an object with a `.loss` attribute.'
        )
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(
            f"{where} gave a loss of type {type(loss).__name__} ({loss!r}); it must be a torch.Tensor "
            "so that it can be backpropagated. Compute it with torch operations on the outputs."
        )
    # numel is metadata: this check costs no device sync.
    if loss.numel() != 1:
        raise ConfigError(
            f"{where} gave a loss of shape {tuple(loss.shape)}; backward needs a single number. "
            'Reduce it, e.g. `loss.mean()`, or build the loss with `reduction="mean"`.'
        )
    return loss


def compute_loss(
    model: torch.nn.Module,
    batch: Any,
    *,
    loss_fn: LossFn | None,
    training_step: TrainingStep | None,
) -> torch.Tensor:
    """Run the forward pass on ``batch`` and return the loss tensor.

    Args:
        model (`torch.nn.Module`): the prepared model.
        batch (`Any`): one batch from the (prepared) dataloader.
        loss_fn (`Callable`, *optional*): ``loss_fn(outputs, targets)``.
        training_step (`Callable`, *optional*): ``training_step(model, batch)``; wins when given.

    Returns:
        `torch.Tensor`: the loss as returned by the user's code (not yet checked for shape).

    Raises:
        ConfigError: when no convention can read the batch or the result holds no loss.
    """
    if training_step is not None:
        return _extract_loss(training_step(model, batch), "`training_step(model, batch)`")
    if isinstance(batch, Mapping):
        outputs = model(**batch)
        if loss_fn is not None:
            return _extract_loss(loss_fn(outputs, batch), "`loss_fn(outputs, batch)`")
        return _extract_loss(outputs, "`model(**batch)` (no `loss_fn` given, so its `.loss` is used)")
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ConfigError(
                f"the batch is a {type(batch).__name__} of {len(batch)} items; the tuple convention "
                "reads exactly `(inputs, targets)`. Return two items from the dataset, or pass "
                "`training_step=fn(model, batch) -> loss` to unpack it yourself."
            )
        if loss_fn is None:
            raise ConfigError(
                "the batch is an `(inputs, targets)` pair but neither `loss_fn` nor `training_step` "
                "was given, so the loss cannot be computed. Pass e.g. "
                "`loss_fn=torch.nn.CrossEntropyLoss()` or `training_step=fn(model, batch) -> loss`."
            )
        inputs, targets = batch
        return _extract_loss(loss_fn(model(inputs), targets), "`loss_fn(model(inputs), targets)`")
    raise ConfigError(
        f"the batch is {_describe(batch)}; no convention reads it: rule 1 needs `training_step`, "
        "rule 2 a mapping batch (`model(**batch)`), rule 3 an `(inputs, targets)` tuple or list. "
        "Make the dataset return `(inputs, targets)` or pass `training_step=fn(model, batch) -> loss`."
    )


def batch_size_of(batch: Any) -> int:
    """Return the number of samples in ``batch`` (first dimension of its first tensor), or 1."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        items = list(batch)
    else:
        return 1
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() > 0:
            return int(item.shape[0])
    return 1
