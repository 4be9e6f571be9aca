"""Why ``loss_fn(outputs, targets)`` failed: outputs and targets in a form the loss cannot take.

torch's own messages name the kernel, not the mistake ("0D or 1D target tensor expected,
multi-target not supported", "expected target dtype to be Long or Byte, but got Float"). When
the loss raises, :func:`explain_loss_failure` compares the outputs and targets with what the loss
takes and, where their form explains the error, raises a ``ConfigError`` that names the shapes
and dtypes seen, the likely cause and the fix, with torch's error as its ``__cause__``. Only the
losses of ``diagnostics/loss_kinds.py`` are known; for any other ``loss_fn`` only outputs that are
not a tensor at all (a tuple, a dict, a model output object) are explained. Healthy steps never
run this: only an exception does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from safeloop.diagnostics.loss_kinds import RecognisedLoss, class_count, recognise_loss
from safeloop.errors import ConfigError

__all__ = ["explain_loss_failure"]


def explain_loss_failure(loss_fn: Any, outputs: Any, targets: Any, exc: Exception, call: str) -> None:
    """Raise a ``ConfigError`` from ``exc`` when the form of ``outputs`` or ``targets`` explains it.

    Args:
        loss_fn (`Any`): the loss that raised (a wrapper of it is looked through).
        outputs (`Any`): what the model returned.
        targets (`Any`): the batch's targets.
        exc (`Exception`): what the loss raised.
        call (`str`): the call that raised, as the user reads it (``"`loss_fn(outputs, targets)`"``).
    """
    loss = recognise_loss(getattr(loss_fn, "__wrapped__", loss_fn))
    if not isinstance(outputs, torch.Tensor):
        message = _not_a_tensor(loss, outputs, exc, call)
    elif not isinstance(targets, torch.Tensor) or loss is None:
        message = None
    elif loss.kind in ("ce", "nll"):
        message = _class_targets(loss, outputs, targets, call)
    elif loss.kind in ("bce", "bce_logits"):
        message = _binary_targets(loss, outputs, targets, call)
    else:
        message = _regression_targets(loss, outputs, targets, call)
    if message is not None:
        raise ConfigError(f"{message}\n(torch's error: {type(exc).__name__}: {_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _form(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, {value.dtype}"
    return type(value).__name__


def _item(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _not_a_tensor(loss: RecognisedLoss | None, outputs: Any, exc: Exception, call: str) -> str | None:
    kind = type(outputs).__name__
    # a loss not known here may take a tuple itself: its error must be about the container
    if loss is None and not (isinstance(exc, (TypeError, AttributeError)) and kind in str(exc)):
        return None
    if isinstance(outputs, Mapping):
        keys = [str(k) for k in outputs]
        pick = "logits" if "logits" in keys else (keys[0] if keys else "logits")
        what, fix = f"a {kind} with keys {keys}", f'outputs["{pick}"]'
    elif isinstance(outputs, (tuple, list)):
        items = ", ".join(_item(item) for item in outputs[:3]) + (", ..." if len(outputs) > 3 else "")
        what, fix = f"a {kind} of {len(outputs)} items ({items})", "outputs[0]"
    elif isinstance(getattr(outputs, "logits", None), torch.Tensor):
        what, fix = f"a {kind} object with `.logits` ({_form(outputs.logits)})", "outputs.logits"
    else:
        return None
    name = loss.name if loss is not None else "the loss"
    return (
        f"{call} failed: the model returned {what}, and {name} takes one tensor of predictions. "
        f"Likely cause: the model's `forward` returns more than its predictions. Fix: pass the "
        f"predictions only, e.g. `loss_fn=lambda outputs, targets: {_call_of(loss)}({fix}, targets)`, "
        "or return only the predictions from `forward`, or pass `training_step=fn(model, batch) -> loss`."
    )


def _call_of(loss: RecognisedLoss | None) -> str:
    if loss is None:
        return "my_loss"
    return loss.name if loss.name.startswith("F.") else f"{loss.name}()"


def _class_targets(
    loss: RecognisedLoss, outputs: torch.Tensor, targets: torch.Tensor, call: str
) -> str | None:
    if outputs.dim() == 0:
        return None
    seen = f"{call} failed: outputs have {_form(outputs)}, targets {_form(targets)}."
    index_shape = (outputs.shape[:1] + outputs.shape[2:]) if outputs.dim() >= 2 else torch.Size([])
    if outputs.dim() >= 1 and targets.dim() >= 1 and targets.shape[0] != outputs.shape[0]:
        return (
            f"{seen} The outputs hold {outputs.shape[0]} samples and the targets {targets.shape[0]}. "
            "Likely cause: a reshape in `forward` that merged the batch with other dimensions "
            "(`x.view(-1, n)` with the wrong n), or outputs and targets of different batches. Fix: "
            "flatten per sample with `x.flatten(1)` or `x.view(x.size(0), -1)`, so that the outputs "
            f"are (batch, {class_count(outputs)} classes)."
        )
    extra_dim = targets.dim() == outputs.dim() and targets.dim() >= 2 and targets.shape[1] == 1
    if extra_dim and targets.squeeze(1).shape == index_shape:
        cast = ".long()" if targets.is_floating_point() else ""
        return (
            f"{seen} `{loss.name}` takes class indices of shape {tuple(index_shape)} (one per sample); "
            f"these have an extra dimension of size 1. Likely cause: labels stored as a column "
            f"(`y.unsqueeze(1)`, `y.reshape(-1, 1)`, a DataFrame's `df[['label']]`). Fix: "
            f"`targets.squeeze(1){cast}` in the dataset or a collate function."
        )
    if targets.is_floating_point() and targets.shape == index_shape:
        return (
            f"{seen} `{loss.name}` takes class indices as integers (torch.int64) of shape "
            f"{tuple(index_shape)}; float targets are read as class probabilities and must have the "
            f"outputs' shape {tuple(outputs.shape)}. Likely cause: labels built as floats (a NumPy "
            "float array, `torch.tensor(labels, dtype=torch.float32)`). Fix: `targets.long()` in the "
            "dataset, e.g. `TensorDataset(x, y.long())`."
        )
    if not outputs.is_floating_point():
        return (
            f"{seen} `{loss.name}` takes float scores (logits) from the model, not {outputs.dtype}. "
            "Likely cause: the model returns predicted classes (`argmax`), or casts to int. Fix: "
            "return the logits from `forward`; take `argmax` only for predictions."
        )
    return None


def _binary_targets(
    loss: RecognisedLoss, outputs: torch.Tensor, targets: torch.Tensor, call: str
) -> str | None:
    seen = f"{call} failed: outputs have {_form(outputs)}, targets {_form(targets)}."
    if targets.shape != outputs.shape and targets.numel() == outputs.numel():
        fix = "outputs.squeeze(-1)" if outputs.dim() > targets.dim() else "outputs.view_as(targets)"
        cast = "" if targets.is_floating_point() else " and `targets.float()`"
        return (
            f"{seen} `{loss.name}` compares them element by element and needs the same shape. "
            "Likely cause: a final `Linear(..., 1)` gives (batch, 1) while the labels are (batch,). "
            f"Fix: compare `{fix}`{cast} with the targets (or `targets.view_as(outputs)`)."
        )
    if not targets.is_floating_point():
        return (
            f"{seen} `{loss.name}` takes targets as floats in [0, 1] of the outputs' shape, not "
            f"{targets.dtype}. Likely cause: 0/1 labels kept as integers. Fix: `targets.float()` in "
            "the dataset, e.g. `TensorDataset(x, y.float())`."
        )
    if targets.shape != outputs.shape:
        return (
            f"{seen} `{loss.name}` needs targets of the outputs' shape, one probability per output. "
            "Likely cause: class indices given to a binary loss with several outputs. Fix: for "
            "several classes use `CrossEntropyLoss` with integer class indices; for several labels "
            "per sample give targets of shape (batch, labels)."
        )
    return None


def _regression_targets(
    loss: RecognisedLoss, outputs: torch.Tensor, targets: torch.Tensor, call: str
) -> str | None:
    try:
        torch.broadcast_shapes(outputs.shape, targets.shape)
        return None  # they broadcast: not a shape error (a silent broadcast is `loss-broadcast`'s)
    except RuntimeError:
        pass
    seen = f"{call} failed: outputs have {_form(outputs)}, targets {_form(targets)}."
    classes = outputs.dim() == 2 and outputs.shape[1] > 1 and targets.dim() == 1
    likely = (
        f"the model has {outputs.shape[1]} outputs per sample and the targets one value each: "
        "class labels given to a regression loss, or a last layer with too many outputs"
        if classes
        else "the model's output and the targets differ in shape"
    )
    return (
        f"{seen} `{loss.name}` compares predictions and targets element by element, so their "
        f"shapes must match. Likely cause: {likely}. Fix: for class labels use "
        "`torch.nn.CrossEntropyLoss()` (integer targets); to predict one value per sample, end "
        "the model with `Linear(..., 1)` and compare `outputs.squeeze(-1)` with the targets."
    )
