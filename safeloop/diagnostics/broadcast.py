"""The first-batch check for a loss that broadcasts outputs against targets (``loss-broadcast``).

``nn.MSELoss()(outputs, targets)`` with outputs of shape (B, 1) and targets of shape (B,)
broadcasts both to (B, B) and averages every prediction against every target: the best the model
can do is predict the mean of the targets, and torch only emits a ``UserWarning``. A custom loss
such as ``lambda o, y: ((o - y) ** 2).mean()`` does the same without any warning. Two ways in:
``check_broadcast`` looks at the tensors given to the user's ``loss_fn``; ``from_warnings`` reads
torch's own warning, which also covers a ``training_step`` that calls ``F.mse_loss`` itself.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import warnings
from typing import Any

import torch

from safeloop.diagnostics.loss_kinds import recognise_loss
from safeloop.results import Finding

__all__ = ["LOSS_BROADCAST", "RELATIVE_TOLERANCE", "check_broadcast", "from_warnings"]

LOSS_BROADCAST = "loss-broadcast"
# An unrecognised loss is only called broadcasting when aligning the shapes changes its value:
# float32 rounding of a mean over a few thousand elements stays well below this.
RELATIVE_TOLERANCE = 1e-4

# torch.nn.functional's mse_loss, l1_loss, smooth_l1_loss and huber_loss all warn with this text.
_WARNING = re.compile(
    r"target size \(torch\.Size\(\[([\d, ]*)\]\)\) that is different to the input size "
    r"\(torch\.Size\(\[([\d, ]*)\]\)\).*broadcasting",
    re.DOTALL,
)


def _name(loss_fn: Any) -> str:
    """A name the user recognises: the class, the function, or a lambda with its location."""
    recognised = recognise_loss(loss_fn)
    if recognised is not None:
        return recognised.name
    if isinstance(loss_fn, functools.partial):
        return f"partial({_name(loss_fn.func)})"
    if isinstance(loss_fn, torch.nn.Module):
        return type(loss_fn).__name__
    code = getattr(loss_fn, "__code__", None)
    if getattr(loss_fn, "__name__", None) == "<lambda>" and code is not None:
        return f"<lambda> at {os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    name = getattr(loss_fn, "__qualname__", None) or getattr(loss_fn, "__name__", None)
    return name if isinstance(name, str) else repr(loss_fn)[:60]


def _broadcast(outputs: torch.Size, targets: torch.Size) -> torch.Size | None:
    """The broadcast shape when it holds more elements than BOTH inputs, else None.

    (B, 3) against (B, 1) broadcasts to (B, 3), the outputs' own shape: one target per row spread
    over 3 outputs, which a multi-output regression may do on purpose, so it is not reported
    (torch still warns for it, and that warning stays visible).
    """
    try:
        shape = torch.broadcast_shapes(outputs, targets)
    except RuntimeError:
        return None  # not broadcastable: the loss raises (or reshapes itself); nothing to say
    if shape.numel() > outputs.numel() and shape.numel() > targets.numel():
        return shape
    return None


def _shape(shape: torch.Size | tuple[int, ...]) -> str:
    return str(tuple(shape))


def _cause_and_fix(outputs: torch.Size, targets: torch.Size, call: str) -> tuple[str, str]:
    """The likely cause and a fix written for these shapes; ``call`` formats the aligned call."""
    if len(outputs) == len(targets) + 1 and outputs[-1] == 1 and outputs[:-1] == targets:
        return (
            f"the model ends in a layer with one output unit, giving {_shape(outputs)}, while the "
            f"targets are {_shape(targets)}",
            f"Use `{call.format(o='outputs.squeeze(-1)', t='targets')}` (or return "
            "`self.head(x).squeeze(-1)` from the model), or give the targets the outputs' shape: "
            f"`{call.format(o='outputs', t='targets.unsqueeze(-1)')}`.",
        )
    if len(targets) == len(outputs) + 1 and targets[-1] == 1 and targets[:-1] == outputs:
        return (
            f"the targets are stored as a column {_shape(targets)} while the model returns "
            f"{_shape(outputs)} (e.g. after a `.squeeze()` in the model)",
            f"Use `{call.format(o='outputs', t='targets.squeeze(-1)')}`, or "
            f"`{call.format(o='outputs.unsqueeze(-1)', t='targets')}`.",
        )
    if outputs.numel() == targets.numel():
        view = ", ".join(str(n) for n in outputs)
        return (
            f"outputs and targets hold the same {outputs.numel()} values laid out differently",
            f"Use `{call.format(o='outputs', t=f'targets.view({view})')}` "
            "(`targets.view_as(outputs)`), or build the targets in the outputs' shape in the dataset.",
        )
    return (
        f"the outputs hold {outputs.numel()} values and the targets {targets.numel()}: the model's "
        "output size does not match the targets per sample",
        "Make the last layer output one value per target and give both the same shape "
        "(`outputs.shape == targets.shape`).",
    )


def _finding(
    name: str, outputs: torch.Size, targets: torch.Size, shape: torch.Size, numbers: str, call: str
) -> Finding:
    cause, fix = _cause_and_fix(outputs, targets, call)
    pairs = max(outputs.numel(), targets.numel())
    message = (
        f"{name} got outputs of shape {_shape(outputs)} and targets of shape {_shape(targets)}, which "
        f"broadcast to {_shape(shape)}: the loss compares every prediction with every target "
        f"({shape.numel()} pairs instead of {pairs}), so every prediction is pulled to the same constant "
        f"(the targets' mean under a squared error) and the model cannot learn anything per sample."
        f"{numbers} Likely cause: {cause}."
    )
    return Finding(LOSS_BROADCAST, "warning", message, step=0, suggestion=fix)


def _aligned_loss(loss_fn: Any, outputs: torch.Tensor, targets: torch.Tensor) -> float | None:
    """The loss with the outputs reshaped to the targets' shape, or None when it cannot be had."""
    device = outputs.device
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if outputs.is_cuda else []
    )
    try:
        # no graph; the RNG as it was (a loss that draws random numbers must not shift the run);
        # no warning shown twice (the user's call already emitted the loss's own warnings)
        with torch.no_grad(), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = loss_fn(outputs.detach().reshape(targets.shape), targets.detach())
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            return None
        value = float(value)
    except Exception:  # a custom loss may assume its own shapes: then there is nothing to compare
        return None
    return value if math.isfinite(value) else None


def check_broadcast(loss_fn: Any, outputs: Any, targets: Any, loss_value: float | None) -> list[Finding]:
    """Check whether ``loss_fn`` broadcast the first batch's outputs against its targets.

    Args:
        loss_fn (`Any`): the user's loss. ``MSELoss``, ``L1Loss``, ``SmoothL1Loss``, ``HuberLoss``
            (and functional forms, and ``functools.partial`` of them) are judged by the shapes
            alone. Any other loss (a lambda, a custom module) is judged by its value: it is
            called once more, under ``torch.no_grad()``, with the outputs reshaped to the targets'
            shape. Other recognised losses (cross-entropy, BCE) take other shapes by design: [].
        outputs (`Any`): ``model(inputs)`` of the first batch; checks need a tensor.
        targets (`Any`): the first batch's targets; checks need a tensor.
        loss_value (`float`, *optional*): the loss ``loss_fn(outputs, targets)`` gave, read on the
            host; None when it is not a single number.

    Returns:
        `list[Finding]`: one ``loss-broadcast`` warning, or [].
    """
    if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        return []
    if outputs.shape == targets.shape:
        return []
    shape = _broadcast(outputs.shape, targets.shape)
    if shape is None:
        return []
    recognised = recognise_loss(loss_fn)
    if recognised is not None and recognised.kind != "regression":
        return []
    same_count = outputs.numel() == targets.numel()
    if recognised is None and not (same_count and outputs.numel() >= 2 and loss_value is not None):
        return []  # only a value that changes once aligned shows that an unknown loss broadcasts
    aligned = _aligned_loss(loss_fn, outputs, targets) if same_count else None
    if recognised is None:
        if aligned is None or loss_value is None or not math.isfinite(loss_value):
            return []
        if abs(loss_value - aligned) <= RELATIVE_TOLERANCE * max(abs(loss_value), abs(aligned)):
            return []  # the loss aligns the shapes itself (a squeeze inside): no broadcast
    numbers = ""
    if loss_value is not None and aligned is not None:
        numbers = (
            f" On the first batch the loss is {loss_value:.4g}, and {aligned:.4g} with the shapes "
            f"aligned (outputs reshaped to {_shape(targets.shape)})."
        )
    elif loss_value is not None:
        numbers = f" On the first batch the loss is {loss_value:.4g}."
    name = f"`{_name(loss_fn)}`"
    return [_finding(name, outputs.shape, targets.shape, shape, numbers, "loss_fn({o}, {t})")]


def _registry(filename: str) -> dict[Any, Any] | None:
    """The ``__warningregistry__`` of the module at ``filename``, which ``warnings.warn`` would use.

    With it a re-emitted warning counts as shown at its place, so the "default" filter does not
    show it again on the next batch.
    """
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) == filename:
            return module.__dict__.setdefault("__warningregistry__", {})
    return None


def _where(filename: str, lineno: int) -> str:
    # a path inside an installed package reads best from the package on
    parts = filename.replace(os.sep, "/").split("site-packages/")
    return f"{parts[-1] if len(parts) > 1 else os.path.basename(filename)}:{lineno}"


def from_warnings(caught: list[warnings.WarningMessage], found: list[Finding]) -> list[Finding]:
    """Turn torch's broadcasting warning into a finding; re-emit every other warning as it came.

    Call it outside the ``catch_warnings`` that recorded ``caught``, so the user's filters decide
    again what is shown.

    Args:
        caught (`list[warnings.WarningMessage]`): the warnings recorded during the first forward.
        found (`list[Finding]`): the findings of the first batch so far; when one already says
            ``loss-broadcast`` (``check_broadcast`` on the ``loss_fn``), the warning says it again
            and gives none.

    Returns:
        `list[Finding]`: at most one ``loss-broadcast`` warning (one per run is reported anyway).
    """
    reported = any(f.code == LOSS_BROADCAST for f in found)
    findings: list[Finding] = []
    for record in caught:
        match = _WARNING.search(str(record.message))
        if match is not None:
            targets, outputs = (torch.Size(int(n) for n in g.split(",") if n.strip()) for g in match.groups())
            shape = _broadcast(outputs, targets)
            if shape is not None:  # otherwise a deliberate broadcast, e.g. (B, 3) against (B, 1)
                if not reported:
                    where = f"The torch loss called at `{_where(record.filename, record.lineno)}`"
                    findings.append(_finding(where, outputs, targets, shape, "", "loss({o}, {t})"))
                    reported = True
                continue
        warnings.warn_explicit(
            record.message,
            record.category,
            record.filename,
            record.lineno,
            registry=_registry(record.filename),
            source=record.source,
        )
    return findings
