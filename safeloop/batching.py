"""The batch conventions of ``SafeTrainer``: from a batch to a scalar loss tensor.

First match wins (docs/api.md, "Batches"): a ``training_step``; a mapping batch (Hugging Face style);
an ``(inputs, targets)`` pair. Anything else is a ``ConfigError`` that says which rule failed.

When the model or ``loss_fn`` raises, ``batch_errors.explain_failure`` looks at the batch (error
paths only) and turns what explains the error into a ``ConfigError`` that names the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from safeloop.batch_errors import explain_failure, find_unreadable, unreadable_message
from safeloop.errors import ConfigError
from safeloop.forward_errors import explain_forward_failure
from safeloop.loss_errors import explain_loss_failure
from safeloop.results import Finding

__all__ = ["compute_loss", "batch_size_of", "LossComputer", "LossFn", "TrainingStep"]

LossFn = Callable[[Any, Any], Any]
TrainingStep = Callable[[torch.nn.Module, Any], Any]


_MAX_ITEMS = 4


def _describe(value: object) -> str:
    """Describe ``value`` for an error message without reading any tensor's data."""
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        items = ", ".join(_describe(item) for item in value[:_MAX_ITEMS])
        more = ", ..." if len(value) > _MAX_ITEMS else ""
        return f"{type(value).__name__} of {len(value)} items ({items}{more})"
    if value is None or isinstance(value, (bool, int, float, complex, str)):
        return f"{value!r} ({type(value).__name__})"
    if hasattr(value, "loss"):
        return f"an object of type {type(value).__name__} whose `.loss` is {_describe(value.loss)}"  # type: ignore[attr-defined]
    return f"an object of type {type(value).__name__}"


def _extract_loss(value: object, where: str) -> torch.Tensor:
    """Return the loss held by ``value``: a tensor, a mapping with ``"loss"`` or ``.loss``."""
    if isinstance(value, torch.Tensor):
        loss = value
    elif isinstance(value, Mapping) and "loss" in value:
        loss = value["loss"]
    elif not isinstance(value, Mapping) and getattr(value, "loss", None) is not None:
        loss = value.loss  # type: ignore[attr-defined]
    else:
        hint = ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            hint = " A Python number cannot be backpropagated: return the tensor itself (no `.item()`)."
        elif value is None:
            hint = " Did the function forget its `return`?"
        elif isinstance(value, (tuple, list)):
            scalar = [
                i for i, item in enumerate(value) if isinstance(item, torch.Tensor) and item.numel() == 1
            ]
            if scalar:
                hint = (
                    f" Item {scalar[0]} is a one-element tensor: if it is the loss, return it alone "
                    f'(`return loss`), or a mapping `{{"loss": loss, ...}}` to keep the other items.'
                )
        raise ConfigError(
            f"{where} returned {_describe(value)}, which holds no loss. Return a scalar tensor, "
            f'a mapping with key "loss", or an object with a `.loss` attribute.{hint}'
        )
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(
            f"{where} gave a loss of type {type(loss).__name__} ({loss!r}); it must be a torch.Tensor "
            "so that it can be backpropagated. Compute it with torch operations on the outputs."
        )
    # numel is metadata: this check costs no device sync.
    if loss.numel() != 1:
        message = (
            f"{where} gave a loss of shape {tuple(loss.shape)}; backward needs a single number. "
            'Reduce it, e.g. `loss.mean()`, or build the loss with `reduction="mean"`.'
        )
        finding = Finding(
            "loss-not-scalar", "error", message, step=0,
            suggestion='Return `loss.mean()`, or build the loss with `reduction="mean"`.',
        )  # fmt: skip
        raise ConfigError(message, findings=[finding])
    return loss


def _no_loss(outputs: object) -> bool:
    if isinstance(outputs, Mapping):
        return outputs.get("loss") is None
    return getattr(outputs, "loss", None) is None


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
        `torch.Tensor`: the loss as returned by the user's code, checked to hold one element.

    Raises:
        ConfigError: when no convention can read the batch or the result holds no loss.
    """
    if training_step is not None:
        return _extract_loss(training_step(model, batch), "`training_step(model, batch)`")
    if isinstance(batch, Mapping):
        try:
            outputs = model(**batch)
        except Exception as exc:
            explain_failure(model, batch, batch, "batch", "`model(**batch)`", exc)
            raise
        if loss_fn is not None:
            return _extract_loss(loss_fn(outputs, batch), "`loss_fn(outputs, batch)`")
        where = "`model(**batch)` (no `loss_fn` given, so its `.loss` is used)"
        if isinstance(outputs, torch.Tensor) and outputs.numel() != 1:  # metadata only: no sync
            raise ConfigError(
                f"{where} returned {_describe(outputs)}, not a loss: a mapping batch without "
                '`loss_fn` reads the loss from `outputs.loss` or `outputs["loss"]`. Pass '
                "`loss_fn=fn(outputs, batch) -> loss`, or make the model return its loss "
                "(Hugging Face models do when the batch has `labels`)."
            )
        if not isinstance(outputs, torch.Tensor) and _no_loss(outputs):
            raise ConfigError(
                f"{where} returned {_describe(outputs)}, which holds no loss. Put `labels` in the "
                "batch (Hugging Face models compute `.loss` only then), or pass "
                "`loss_fn=fn(outputs, batch) -> loss`."
            )
        return _extract_loss(outputs, where)
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            unreadable = find_unreadable(batch, "batch")
            if unreadable is not None and unreadable[0] == "batch":  # a batch of strings, not of pairs
                raise ConfigError(unreadable_message(unreadable, "", None, targets=False, key=None))
            raise ConfigError(
                f"the batch is a {_describe(batch)}; the tuple convention "
                "reads exactly `(inputs, targets)`. Return two items from the dataset, or pass "
                "`training_step=fn(model, batch) -> loss` to unpack it yourself."
            )
        if loss_fn is None:
            raise ConfigError(
                f"the batch is an `(inputs, targets)` pair, a {_describe(batch)}, but neither "
                "`loss_fn` nor `training_step` was given, so the loss cannot be computed. Pass e.g. "
                "`loss_fn=torch.nn.CrossEntropyLoss()` or `training_step=fn(model, batch) -> loss`."
            )
        inputs, targets = batch
        try:
            outputs = model(inputs)
        except Exception as exc:
            explain_failure(model, batch, inputs, "batch[0]", "`model(inputs)`", exc)
            explain_forward_failure(model, inputs, exc, "`model(inputs)`")
            raise
        try:
            loss = loss_fn(outputs, targets)
        except Exception as exc:
            call = "`loss_fn(outputs, targets)`"
            explain_failure(model, batch, targets, "batch[1]", call, exc, targets=True)
            explain_loss_failure(loss_fn, outputs, targets, exc, call)
            raise
        return _extract_loss(loss, "`loss_fn(model(inputs), targets)`")
    unreadable = find_unreadable(batch, "batch")
    if unreadable is not None:
        raise ConfigError(unreadable_message(unreadable, "", None, targets=False, key=None))
    raise ConfigError(
        f"the batch is {_describe(batch)}; no convention reads it: rule 1 needs `training_step`, "
        "rule 2 a mapping batch (`model(**batch)`), rule 3 an `(inputs, targets)` tuple or list. "
        "Make the dataset return `(inputs, targets)` or pass `training_step=fn(model, batch) -> loss`."
    )


class LossComputer:
    """The batch conventions of one trainer, as ``loss_of(model, batch)``.

    Args:
        loss_fn (`Callable`, *optional*): ``loss_fn(outputs, targets)``.
        training_step (`Callable`, *optional*): ``training_step(model, batch)``; wins when given.
    """

    def __init__(self, loss_fn: LossFn | None, training_step: TrainingStep | None) -> None:
        self.loss_fn = loss_fn
        self.training_step = training_step

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Run the forward pass on ``batch`` and return the loss (see :func:`compute_loss`)."""
        return compute_loss(model, batch, loss_fn=self.loss_fn, training_step=self.training_step)

    def with_loss_fn(self, model: torch.nn.Module, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
        """The same, with ``loss_fn`` in place of the user's (a checked wrapper of it, or None)."""
        return compute_loss(model, batch, loss_fn=loss_fn, training_step=self.training_step)


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
