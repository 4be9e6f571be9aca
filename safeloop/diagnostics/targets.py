"""Checks on the first batch: non-finite inputs, and targets the loss cannot take.

They run once per ``fit``, on the first batch, and read tensors on the host. The order in the
trainer is: ``check_inputs(batch)``; ``outputs = model(inputs)``; ``check_targets`` (before
``loss_fn``: a class index out of range raises ``IndexError`` on CPU and a device-side assert on
CUDA, which kills the CUDA context, so it must be caught before the loss runs); the loss;
``initial_loss.check_initial_loss``. Only the losses of ``loss_kinds.py`` are checked; any other
``loss_fn`` (a lambda, a custom module) gets no finding rather than a guess.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from safeloop.diagnostics.first_batch import RAISED_CODES
from safeloop.diagnostics.localize import named_tensors
from safeloop.diagnostics.loss_kinds import RecognisedLoss, class_count, recognise_loss
from safeloop.results import Finding

__all__ = [
    "check_inputs",
    "check_targets",
    "class_range_findings",
    "no_targets_finding",
    "RAISED_CODES",
    "NO_TARGET_TOKENS",
    "TARGET_STD_MAX",
    "TARGET_MEAN_TO_STD_MAX",
]

# ``target-out-of-range`` is among the raised codes: the loss would crash (a device-side assert
# on CUDA) or be meaningless on every step, so training must not start.


# Every target of the first batch is the ignore index: nothing to learn from, a NaN mean loss.
NO_TARGET_TOKENS = "no-target-tokens"

# Regression targets far from unit scale: std above 100, or a mean above 100 stds.
TARGET_STD_MAX = 100.0
TARGET_MEAN_TO_STD_MAX = 100.0


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
    loss = recognise_loss(loss_fn)
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


def _class_range(loss: RecognisedLoss, outputs: torch.Tensor, targets: torch.Tensor) -> list[Finding]:
    classes = class_count(outputs)
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


def _unit_range(loss: RecognisedLoss, targets: torch.Tensor, what: str) -> list[Finding]:
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


def _target_scale(loss: RecognisedLoss, targets: torch.Tensor) -> list[Finding]:
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
