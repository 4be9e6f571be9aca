"""Checks on the first batch: non-finite inputs, targets the loss cannot take, a wrong start.

They run once per ``fit``, on the first batch, and read tensors on the host. The order in the
trainer is: ``check_inputs(batch)``; ``outputs = model(inputs)``; ``check_targets`` (before
``loss_fn``: a class index out of range raises ``IndexError`` on CPU and a device-side assert on
CUDA, which kills the CUDA context, so it must be caught before the loss runs); the loss;
``check_initial_loss``. Only the losses recognised below are checked; any other ``loss_fn``
(a lambda, a custom module) gets no finding rather than a guess.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from safeloop.diagnostics.first_batch import RAISED_CODES
from safeloop.diagnostics.localize import named_tensors
from safeloop.results import Finding

__all__ = [
    "check_inputs",
    "check_targets",
    "check_initial_loss",
    "recognised_loss",
    "class_range_findings",
    "no_targets_finding",
    "RAISED_CODES",
    "NO_TARGET_TOKENS",
    "ACTIVATION_LOSS_MISMATCH",
    "INITIAL_LOSS_FACTOR",
    "TARGET_STD_MAX",
    "TARGET_MEAN_TO_STD_MAX",
]

# ``target-out-of-range`` is among the raised codes: the loss would crash (a device-side assert
# on CUDA) or be meaningless on every step, so training must not start.

# The outputs are not in the form the loss expects (softmax before CrossEntropyLoss, sigmoid before
# BCEWithLogitsLoss, NLLLoss without log_softmax). Not ``initial-loss-high``: the loss is not high,
# it is squeezed near ln(C) (or unbounded below for NLLLoss), so a separate code says what it is.
ACTIVATION_LOSS_MISMATCH = "activation-loss-mismatch"

# Every target of the first batch is the ignore index: nothing to learn from, a NaN mean loss.
NO_TARGET_TOKENS = "no-target-tokens"

# A fresh classifier starts near ln(C); 3x that means logits of several units.
INITIAL_LOSS_FACTOR = 3.0
# Regression targets far from unit scale: std above 100, or a mean above 100 stds.
TARGET_STD_MAX = 100.0
TARGET_MEAN_TO_STD_MAX = 100.0
# A sigmoid applied twice is only called when this many outputs all lie in (0, 1): raw logits of a
# fresh model spread over both signs, but a handful may all be positive by chance.
_MIN_SIGMOID_ELEMENTS = 16

# kind: (``nn`` loss modules, ``torch.nn.functional`` functions) recognised; subclasses included.
_KINDS = {
    "ce": ("CrossEntropyLoss", "cross_entropy"),
    "nll": ("NLLLoss", "nll_loss"),
    "bce_logits": ("BCEWithLogitsLoss", "binary_cross_entropy_with_logits"),
    "bce": ("BCELoss", "binary_cross_entropy"),
    "regression": ("MSELoss L1Loss SmoothL1Loss HuberLoss", "mse_loss l1_loss smooth_l1_loss huber_loss"),
}


@dataclass(frozen=True)
class _Loss:
    kind: str  # a key of _KINDS
    name: str
    ignore_index: int | None = None


def _recognise(loss_fn: Any) -> _Loss | None:
    """Return what ``loss_fn`` computes, or None when it is not a loss known here."""
    func, keywords = loss_fn, {}
    if isinstance(loss_fn, functools.partial):  # e.g. partial(F.cross_entropy, ignore_index=0)
        func, keywords = loss_fn.func, loss_fn.keywords
    for kind, (modules, functions) in _KINDS.items():
        classes = kind in ("ce", "nll")
        if any(isinstance(loss_fn, getattr(nn, m)) for m in modules.split()):
            return _Loss(kind, type(loss_fn).__name__, loss_fn.ignore_index if classes else None)
        if any(func is getattr(F, f) for f in functions.split()):
            return _Loss(
                kind, f"F.{func.__name__}", int(keywords.get("ignore_index", -100)) if classes else None
            )
    return None


def recognised_loss(loss_fn: Any) -> bool:
    """Whether the checks here know ``loss_fn`` (a loss module, an ``F.`` function or a partial of one).

    Example:
        >>> recognised_loss(F.cross_entropy), recognised_loss(lambda o, t: (o - t).abs().mean())
        (True, False)
    """
    return _recognise(loss_fn) is not None


def _walk(value: Any, path: str) -> Iterable[tuple[str, torch.Tensor]]:
    # the replay of a skipped batch names inputs the same way, so both findings agree
    return named_tensors(value, path)


def check_inputs(batch: Any) -> list[Finding]:
    """Report every floating tensor of the first batch that holds NaN or Inf.

    Args:
        batch (`Any`): the batch, a tensor or nested tuples/lists/mappings of tensors.

    Returns:
        `list[Finding]`: one ``nonfinite-input`` error per tensor holding NaN/Inf, naming its
        position (``batch[0]``, ``batch['pixel_values']``) and the count. Not meant to be raised:
        the NaN guard skips such steps, and the finding says where they come from.
    """
    findings = []
    for path, tensor in _walk(batch, "batch"):
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
            continue
        nan = int(torch.isnan(tensor).sum())
        bad = int((~torch.isfinite(tensor)).sum())
        if not bad:
            continue
        rows = int((~torch.isfinite(tensor)).reshape(tensor.shape[0], -1).any(1).sum()) if tensor.dim() else 1
        samples = f" in {rows} of {tensor.shape[0]} samples" if tensor.dim() else ""
        message = (
            f"`{path}` {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} holds {bad} "
            f"non-finite values of {tensor.numel()} ({nan} NaN, {bad - nan} Inf){samples} in the first "
            "batch: every step on such a batch gives a NaN loss. Usual causes: missing values in the "
            "source data, a division by a zero std when standardising, a log of zero in preprocessing."
        )
        suggestion = (
            "Clean the data before training: impute or drop rows with missing values, guard "
            "standardisation with `std.clamp_min(1e-8)`, or as a last resort `torch.nan_to_num`."
        )
        findings.append(Finding("nonfinite-input", "error", message, (path,), 0, suggestion))
    return findings


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _classes(outputs: torch.Tensor) -> int:
    return int(outputs.shape[1]) if outputs.dim() >= 2 else int(outputs.shape[0])


def _index_targets_fit(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether ``targets`` has the shape of class indices for ``outputs`` (N, C, d1, ...)."""
    expected = (outputs.shape[:1] + outputs.shape[2:]) if outputs.dim() >= 2 else torch.Size([])
    return targets.shape == expected


def check_targets(loss_fn: Any, outputs: Any, targets: Any) -> list[Finding]:
    """Check the first batch's targets against what ``loss_fn`` accepts, before it runs.

    Args:
        loss_fn (`Any`): the user's loss; ``nn.CrossEntropyLoss``, ``nn.NLLLoss``, ``nn.BCELoss``,
            ``nn.BCEWithLogitsLoss``, ``nn.MSELoss``, ``nn.L1Loss``, ``nn.SmoothL1Loss``,
            ``nn.HuberLoss``, their ``torch.nn.functional`` counterparts and ``functools.partial``
            of those are recognised; anything else gives ``[]``.
        outputs (`Any`): ``model(inputs)``; checks need a tensor.
        targets (`Any`): the targets of the batch; checks need a tensor.

    Returns:
        `list[Finding]`: ``target-out-of-range`` (error, in ``RAISED_CODES``) or ``target-scale``
        (warning).
    """
    loss = _recognise(loss_fn)
    if loss is None or not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        return []
    if targets.numel() == 0 or outputs.dim() == 0:
        return []
    with torch.no_grad():
        if loss.kind in ("ce", "nll"):
            if not targets.is_floating_point():
                if not _index_targets_fit(outputs, targets):
                    return []  # a shape error: torch's own message says it
                return _class_range(loss, outputs, targets)
            if loss.kind == "ce" and targets.shape == outputs.shape:
                return _unit_range(loss, targets, "class probabilities (float targets)")
            return []
        if loss.kind in ("bce", "bce_logits"):
            return _unit_range(loss, targets, "binary targets")
        return _target_scale(loss, targets)


def _class_range(loss: _Loss, outputs: torch.Tensor, targets: torch.Tensor) -> list[Finding]:
    classes = _classes(outputs)
    if loss.ignore_index is not None and bool((targets == loss.ignore_index).all()):
        return [no_targets_finding(f"the targets given to `{loss.name}`", targets, loss.ignore_index)]
    dim = "outputs.shape[1]" if outputs.dim() >= 2 else "outputs.shape[0]"
    ignored = f" (or `ignore_index={loss.ignore_index}`)" if loss.ignore_index is not None else ""
    return class_range_findings(
        f"`{loss.name}` got class targets",
        targets,
        classes,
        f"the outputs have {classes} classes (`{dim}`)",
        ignore_index=loss.ignore_index,
        ignored=ignored,
    )


def class_range_findings(
    head: str,
    targets: torch.Tensor,
    classes: int,
    where: str,
    *,
    ignore_index: int | None,
    ignored: str = "",
    shift: str = "`targets - 1`",
    resize: str = "set the output size to the number of classes (>= {n}), or remap the labels",
    negative: str = "pass `ignore_index={low}` if {low} marks samples to skip, or map them to -100",
) -> list[Finding]:
    """A ``target-out-of-range`` error when integer class targets fall outside ``[0, classes)``.

    Shared by the checks of a ``loss_fn`` and of a model that computes its own loss, which word the
    head of the message and the fixes their own way.

    Args:
        head (`str`): the start of the message, e.g. ``"`CrossEntropyLoss` got class targets"``.
        targets (`torch.Tensor`): the integer targets.
        classes (`int`): the number of classes the outputs have.
        where (`str`): where that number comes from, e.g. ``"the outputs have 3 classes (...)"``.
        ignore_index (`int`, *optional*): the target value the loss skips.
        ignored (`str`, *optional*): how to name the ignore index after the valid range.
        shift (`str`, *optional*): the expression that renumbers labels 1..C.
        resize (`str`, *optional*): the fix for too few outputs (``{n}``: classes needed).
        negative (`str`, *optional*): the fix for negative labels (``{low}``: the lowest).

    Returns:
        `list[Finding]`: one ``target-out-of-range`` error, or nothing when every target fits.
    """
    kept = targets if ignore_index is None else targets[targets != ignore_index]
    if kept.numel() == 0:
        return []
    low, high = int(kept.min()), int(kept.max())
    if low >= 0 and high < classes:
        return []
    bad = int(((kept < 0) | (kept >= classes)).sum())
    causes, fixes = [], []
    if low == 1 and high == classes:
        causes.append(f"the labels look numbered 1..{classes} instead of 0..{classes - 1}")
        fixes.append(f"shift them with {shift} (or in the dataset)")
    elif high >= classes and classes == 1:
        causes.append("the model has a single output unit, which cross-entropy reads as one class")
        fixes.append("give the last layer 2 outputs, or use `BCEWithLogitsLoss` with float 0/1 targets")
    elif high >= classes:
        causes.append(
            f"the last layer has {classes} outputs but the labels reach {high}, so there are at least "
            f"{high + 1} classes"
        )
        fixes.append(resize.format(n=high + 1))
    if low < 0:
        causes.append(f"negative labels ({low}) that are not the ignore index")
        fixes.append(negative.format(low=low))
    message = (
        f"{head} from {low} to {high}, but {where}, so valid targets are 0..{classes - 1}{ignored}: "
        f"{bad} of {kept.numel()} targets in the first batch are out of range. The loss would fail "
        f"(IndexError on CPU, a device-side assert on CUDA). Likely cause: {'; '.join(causes)}."
    )
    return [
        Finding(
            "target-out-of-range", "error", message, step=0, suggestion=_sentence("; or ".join(fixes)) + "."
        )
    ]


def no_targets_finding(what: str, targets: torch.Tensor, ignore_index: int, note: str = "") -> Finding:
    """A ``no-target-tokens`` error: every target of the first batch is the ignore index.

    Args:
        what (`str`): the targets, e.g. ``"`batch['labels']`"``.
        targets (`torch.Tensor`): those targets (all equal to ``ignore_index``, or ``note`` says why).
        ignore_index (`int`): the value the loss skips.
        note (`str`, *optional*): a sentence on how the loss reads them (a causal LM's shift).

    Returns:
        `Finding`: the error, naming the share masked (not raised: one batch may be all padding,
        and the NaN guard skips its step; a run of them ends in ``DivergenceError`` naming it).
    """
    total = targets.numel()
    masked = int((targets == ignore_index).sum())
    message = (
        f"{_sentence(what)}, first batch: {masked} of {total} targets ({masked / max(total, 1):.0%}) "
        f"are the ignore index {ignore_index}{note}. No target is left to learn from, so a mean-reduced "
        "cross-entropy divides 0 by 0 and the loss is NaN (a sum gives 0): the step teaches nothing. "
        "Likely cause: the collator or preprocessing masks every label (prompt masking that also covers "
        "the answer, truncation that cuts the answer off, labels padded with -100 past their length, "
        f"or `labels` built from a mask instead of the token ids)."
    )
    suggestion = (
        "Look at one collated batch: `(batch['labels'] != -100).sum(-1)` must be positive for every "
        "sample; mask only the prompt and the padding, and truncate the prompt rather than the answer."
    )
    return Finding(NO_TARGET_TOKENS, "error", message, step=0, suggestion=suggestion)


def _unit_range(loss: _Loss, targets: torch.Tensor, what: str) -> list[Finding]:
    values = targets.detach().double()
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return []
    bad = int(((values < 0) | (values > 1)).sum())
    integral = bool((values == values.round()).all())
    if low >= 0 and high == 255:
        cause, fix = "8-bit values (0..255), e.g. masks read from image files", "divide them by 255"
    elif low == -1 and high <= 1:
        cause, fix = "labels in {-1, 1}", "map them to {0, 1} with `(targets + 1) / 2`"
    elif integral and low >= 0 and loss.kind in ("bce", "bce_logits"):
        cause = "class indices, but binary cross-entropy takes one 0/1 value per output"
        fix = "use `CrossEntropyLoss` for several classes, or one-hot encode the targets"
    else:
        cause, fix = "targets on another scale", "rescale them into [0, 1]"
    message = (
        f"`{loss.name}` takes {what} in [0, 1], but the first batch's targets range from {low:.4g} to "
        f"{high:.4g} ({bad} of {values.numel()} outside): the loss is not a cross-entropy there and can "
        f"go negative without bound. Likely cause: {cause}."
    )
    return [Finding("target-out-of-range", "error", message, step=0, suggestion=_sentence(fix) + ".")]


def _target_scale(loss: _Loss, targets: torch.Tensor) -> list[Finding]:
    values = targets.detach().double()
    values = values[torch.isfinite(values)]  # NaN targets are check_inputs' business
    if values.numel() < 2:
        return []
    mean, std = float(values.mean()), float(values.std(correction=0))
    if std > TARGET_STD_MAX:
        why = f"a std of {std:.3g} (above {TARGET_STD_MAX:g})"
    elif std > 0 and abs(mean) > TARGET_MEAN_TO_STD_MAX * std:
        why = f"a mean {abs(mean) / std:.3g} times their std (above {TARGET_MEAN_TO_STD_MAX:g})"
    else:
        return []  # std == 0: one value repeated in the first batch says nothing about the scale
    effect = (
        f"a fresh model outputs values near 0, so the first loss is about {mean**2 + std**2:.3g} and the "
        "gradients are that many times larger than for unit-scale targets: a learning rate that does "
        "not diverge barely moves the hidden layers"
        if loss.name in ("MSELoss", "F.mse_loss")
        else "a fresh model outputs values near 0 and the gradient of an L1-type loss is bounded, so "
        "the outputs move about one learning rate per step and take very long to reach the targets"
    )
    message = (
        f"`{loss.name}` targets in the first batch have mean {mean:.4g} and std {std:.4g} (min "
        f"{float(values.min()):.4g}, max {float(values.max()):.4g}), {why}: {effect}."
    )
    suggestion = (
        f"Standardise the targets with the training set's statistics, `y = (y - mean) / std` (this "
        f"batch gives mean {mean:.4g}, std {std:.4g}), and invert at prediction time: `pred * std + "
        "mean`. For positive, skewed targets such as prices, take `torch.log1p` first."
    )
    return [Finding("target-scale", "warning", message, step=0, suggestion=suggestion)]


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
        loss_fn (`Any`): the user's loss (see ``check_targets`` for the ones recognised).
        outputs (`Any`): ``model(inputs)`` of the first batch.
        targets (`Any`): the targets of the first batch (unused so far; kept for symmetry).
        loss_value (`float`): the loss of the first batch, read on the host.

    Returns:
        `list[Finding]`: ``initial-loss-high`` (cross-entropy above ``INITIAL_LOSS_FACTOR * ln(C)``)
        or ``ACTIVATION_LOSS_MISMATCH`` (softmax before ``CrossEntropyLoss``, probabilities or raw
        scores given to ``NLLLoss``, sigmoid before ``BCEWithLogitsLoss``), both warnings.
    """
    loss = _recognise(loss_fn)
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
        if loss.kind in ("ce", "nll") and _classes(outputs) >= 2:
            return _high_loss(loss, outputs.detach().double(), _classes(outputs), loss_value)
    return []


def _mismatch(loss: _Loss, outputs: torch.Tensor, loss_value: float) -> tuple[str, str] | None:
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
    if loss.kind not in ("ce", "nll") or _classes(outputs) < 2:
        return None
    dim, classes = (1 if outputs.dim() >= 2 else 0), _classes(outputs)
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


def _high_loss(loss: _Loss, logits: torch.Tensor, classes: int, loss_value: float) -> list[Finding]:
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
