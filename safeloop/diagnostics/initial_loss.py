"""The first batch's loss against the value a healthy start gives.

A fresh classifier over C classes starts near ln(C); far above it the logits are too large. Some
forms of the outputs fit the loss badly and show in the first loss as well: probabilities given to
``CrossEntropyLoss`` (a softmax applied twice), probabilities or raw scores given to ``NLLLoss``, a
sigmoid before ``BCEWithLogitsLoss``. Runs once per ``fit``, after the first loss, on the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from safeloop.diagnostics.loss_kinds import RecognisedLoss, class_count, recognise_loss
from safeloop.results import Finding

__all__ = ["ACTIVATION_LOSS_MISMATCH", "INITIAL_LOSS_FACTOR", "check_initial_loss"]

# The outputs are not in the form the loss expects (softmax before CrossEntropyLoss, sigmoid before
# BCEWithLogitsLoss, NLLLoss without log_softmax). Not ``initial-loss-high``: the loss is not high,
# it is squeezed near ln(C) (or unbounded below for NLLLoss), so a separate code says what it is.
ACTIVATION_LOSS_MISMATCH = "activation-loss-mismatch"

# A fresh classifier starts near ln(C); 3x that means logits of several units.
INITIAL_LOSS_FACTOR = 3.0
# A sigmoid applied twice is only called when this many outputs all lie in (0, 1): raw logits of a
# fresh model spread over both signs, but a handful may all be positive by chance.
_MIN_SIGMOID_ELEMENTS = 16


def _tolerance(dtype: torch.dtype) -> float:
    # Probabilities rounded to bf16/fp16 sum to 1 only within a few ulps.
    return max(1e-3, 2 * torch.finfo(dtype).eps)


def _are_probabilities(outputs: torch.Tensor, dim: int) -> bool:
    tol = _tolerance(outputs.dtype)
    values = outputs.detach().double()
    if float(values.min()) < -tol or float(values.max()) > 1 + tol:
        return False
    return bool(((values.sum(dim) - 1).abs() <= tol).all())


def check_initial_loss(loss_fn: Any, outputs: Any, targets: Any, loss_value: float) -> list[Finding]:
    """Check the loss of the first batch against the value a healthy start gives.

    Args:
        loss_fn (`Any`): the user's loss (``loss_kinds.py`` lists the ones recognised).
        outputs (`Any`): ``model(inputs)`` of the first batch.
        targets (`Any`): the targets of the first batch (unused so far; kept for symmetry).
        loss_value (`float`): the loss of the first batch, read on the host.

    Returns:
        `list[Finding]`: ``initial-loss-high`` (cross-entropy above ``INITIAL_LOSS_FACTOR * ln(C)``)
        or ``ACTIVATION_LOSS_MISMATCH`` (softmax before ``CrossEntropyLoss``, probabilities or raw
        scores given to ``NLLLoss``, sigmoid before ``BCEWithLogitsLoss``), both warnings.
    """
    loss = recognise_loss(loss_fn)
    if loss is None or not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
        return []
    if outputs.numel() == 0 or outputs.dim() == 0 or not math.isfinite(loss_value):
        return []
    with torch.no_grad():
        mismatch = _mismatch(loss, outputs.detach(), loss_value)
        if mismatch is not None:
            what, fix = mismatch
            message = f"The outputs given to `{loss.name}` on the first batch {what}."
            return [Finding(ACTIVATION_LOSS_MISMATCH, "warning", message, step=0, suggestion=fix)]
        if loss.kind in ("ce", "nll") and class_count(outputs) >= 2:
            return _high_loss(loss, outputs.detach().double(), class_count(outputs), loss_value)
    return []


def _mismatch(loss: RecognisedLoss, outputs: torch.Tensor, loss_value: float) -> tuple[str, str] | None:
    """What is wrong with the form of ``outputs`` for ``loss``, and the fix; None when it fits."""
    if loss.kind == "bce_logits":
        low, high = float(outputs.min()), float(outputs.max())
        if outputs.numel() < _MIN_SIGMOID_ELEMENTS or not (low > 0.0 and high < 1.0):
            return None
        return (
            f"all lie in ({low:.3g}, {high:.3g}), inside (0, 1) as after a sigmoid ({outputs.numel()} "
            "values); the loss applies a sigmoid itself, so it is applied twice: predictions stay "
            "within (0.5, 0.73) and the gradient is shrunk, so training stalls",
            "Remove the final sigmoid and return the logits (apply sigmoid only at prediction time), "
            "or keep it and use `BCELoss`.",
        )
    if loss.kind not in ("ce", "nll") or class_count(outputs) < 2:
        return None
    dim, classes = (1 if outputs.dim() >= 2 else 0), class_count(outputs)
    probabilities = "are probabilities (all in [0, 1], summing to 1 over the classes)"
    is_probabilities = _are_probabilities(outputs, dim)
    if is_probabilities and loss.kind == "ce":
        return (
            f"{probabilities}: the model already applies softmax and the loss applies log_softmax "
            f"again. The loss is squeezed near ln({classes}) = {math.log(classes):.3g} (seen "
            f"{loss_value:.4g}) and the gradient reaching the model is shrunk by the second softmax, "
            "so training stalls",
            "Remove the final softmax and return the logits; apply softmax only at prediction time. "
            "If the model must output probabilities, use `NLLLoss` on `torch.log(probs)`.",
        )
    fix = "End the model with `log_softmax(dim=1)` instead, or use `CrossEntropyLoss` on the raw logits."
    if is_probabilities:
        return (
            f"{probabilities}, but NLLLoss expects log-probabilities: it returns -p of the target "
            f"class (seen {loss_value:.4g}, in [-1, 0]), which maximises the probability itself, with "
            "gradients that vanish on hard examples",
            fix,
        )
    spread = torch.logsumexp(outputs.double(), dim)
    if loss.kind == "ce" or float(spread.abs().max()) <= _tolerance(outputs.dtype):
        return None
    return (
        f"are not log-probabilities: their logsumexp over the classes ranges from {float(spread.min()):.3g} "
        f"to {float(spread.max()):.3g} instead of 0 (max output {float(outputs.max()):.3g}). NLLLoss only "
        "returns -output of the target class, so the model can lower the loss without bound by "
        "growing that output: the loss goes down (below zero) while nothing is learned. The "
        "log_softmax is missing",
        fix,
    )


def _high_loss(loss: RecognisedLoss, logits: torch.Tensor, classes: int, loss_value: float) -> list[Finding]:
    expected = math.log(classes)
    if loss_value <= INITIAL_LOSS_FACTOR * expected:
        return []
    message = (
        f"`{loss.name}` on the first batch is {loss_value:.4g}, {loss_value / expected:.1f}x the "
        f"ln({classes}) = {expected:.3g} a fresh classifier over {classes} classes starts at: the "
        f"logits are large (std {float(logits.std()):.3g}, max |logit| {float(logits.abs().max()):.3g}), "
        "so the model starts confidently wrong and the softmax saturates, which slows the first "
        "steps or makes them diverge."
    )
    suggestion = (
        "Initialise the last layer smaller (e.g. `nn.init.normal_(head.weight, std=0.01)`, zero "
        "bias), check that the inputs are normalised, and remove any scale or temperature "
        "multiplying the logits. From a pretrained head, check that the label ids match its own."
    )
    return [Finding("initial-loss-high", "warning", message, step=0, suggestion=suggestion)]
