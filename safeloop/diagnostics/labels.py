"""The labels of a classifier: one class only, a train/eval mix far apart, and the train/eval gap.

``label-distribution`` is judged once, at the first log check, from the class counts of the first
training batches (the baseline's sample, ``baseline.py``) and of the first eval batches (taken by
the batch conventions: ``batch[1]`` of an ``(inputs, targets)`` pair, a ``labels``-like key of a
mapping). ``train-eval-gap`` is judged at each evaluation: a train loss far below the eval loss,
measured against the baseline loss. Host side; the counts are summed over processes by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from safeloop.diagnostics.data import LABEL_KEYS
from safeloop.results import Finding

__all__ = [
    "eval_targets",
    "check_label_mix",
    "check_train_eval_gap",
    "LABEL_MIN_SAMPLES",
    "LABEL_MIX_DISTANCE",
    "LABEL_MIX_NOISE",
    "ONE_CLASS_SAMPLES",
    "GAP_SHARE",
    "GAP_RATIO",
]

# Class frequencies mean something from this many labelled targets on a side.
LABEL_MIN_SAMPLES = 32
# Total variation distance between the train and eval class frequencies: half the sum of the
# absolute differences, the share of samples that would have to change class. Two random splits of
# one set differ by the sampling noise, about sqrt(C / n) / 2: 0.14 for 10 classes on 128 samples
# a side; 0.4 is a different set.
LABEL_MIX_DISTANCE = 0.4
# ... and at least 2.5 times the distance sampling noise alone gives (see check_label_mix).
LABEL_MIX_NOISE = 2.5
# One class in this many training targets and no eval set: a missing class is then below 0.3%.
ONE_CLASS_SAMPLES = 1024
# The eval loss above the train loss by more than half the baseline loss, and more than twice it:
# the model fits the training set far better than data it has not seen.
GAP_SHARE = 0.5
GAP_RATIO = 2.0


def eval_targets(batch: Any) -> torch.Tensor | None:
    """The class targets of an eval batch by the batch conventions, or None."""
    targets = None
    if isinstance(batch, Mapping):
        targets = next((batch[key] for key in LABEL_KEYS if key in batch), None)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        targets = batch[1]
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dim() == 0:
        return None
    return targets


def _mix(counts: Sequence[float], limit: int = 4) -> str:
    """The most frequent classes with their shares, for messages."""
    total = sum(counts)
    order = sorted((c for c in range(len(counts)) if counts[c] > 0), key=lambda c: -counts[c])
    shown = ", ".join(f"class {c} {counts[c] / total:.0%}" for c in order[:limit])
    return shown + (f" and {len(order) - limit} more" if len(order) > limit else "")


def check_label_mix(
    train: Sequence[float], evaluation: Sequence[float] | None, batches: int
) -> list[Finding]:
    """``label-distribution`` findings from the class counts of the first train and eval batches.

    Args:
        train (`Sequence[float]`): the count of each class in the first training batches.
        evaluation (`Sequence[float]`, *optional*): the same for the first eval batches.
        batches (`int`): how many training batches the counts come from (quoted).

    Returns:
        `list[Finding]`: a warning when every training target is one class, or when the train and
        eval class frequencies are ``LABEL_MIX_DISTANCE`` or more apart.
    """
    found: list[Finding] = []
    total = sum(train)
    if total < LABEL_MIN_SAMPLES:
        return found
    classes = len(train)
    held = 0.0 if evaluation is None else sum(evaluation)
    if evaluation is not None and held < LABEL_MIN_SAMPLES:
        evaluation = None
    present = [c for c in range(classes) if train[c] > 0]
    if len(present) == 1 and classes >= 2:
        found.append(_one_class(present[0], classes, int(total), batches, evaluation))
    if evaluation is None:
        return found
    distance = 0.5 * sum(abs(a / total - b / held) for a, b in zip(train, evaluation, strict=True))
    # two samples of one distribution differ by about sqrt(C (1/n1 + 1/n2)) / 2: a few classes on
    # a few hundred samples a side can be told apart, a hundred classes on 64 samples cannot
    seen = sum(1 for a, b in zip(train, evaluation, strict=True) if a > 0 or b > 0)
    noise = 0.5 * math.sqrt(seen * (1 / total + 1 / held))
    if distance >= max(LABEL_MIX_DISTANCE, LABEL_MIX_NOISE * noise):
        found.append(
            Finding(
                "label-distribution",
                "warning",
                f"The class frequencies of the first training and eval batches are {distance:.0%} apart "
                f"(total variation distance, threshold {LABEL_MIX_DISTANCE:.0%}): train {_mix(train)} "
                f"({int(total)} targets), eval {_mix(evaluation)} ({int(held)} targets). A model fit to "
                "the training mix is scored on another one, so the eval loss says little. Likely "
                "cause: the split was made on sorted data, or train and eval come from different "
                "sources or label mappings.",
                ("train labels", "eval labels"),
                0,
                "Split the data at random (stratified by class), after shuffling, and map labels to "
                "ids the same way for both sets.",
            )
        )
    return found


def _one_class(
    only: int, classes: int, total: int, batches: int, evaluation: Sequence[float] | None
) -> Finding:
    """Every training target in the first batches is class ``only``.

    A warning when that cannot be a rare class missing from a small sample (the eval batches hold
    the others, or the sample is large); info otherwise.
    """
    bound = 3 / total  # the other classes' share is below 3/n with 95% confidence ("rule of three")
    others = 0.0 if evaluation is None else 1 - evaluation[only] / sum(evaluation)
    certain = others > max(3 * bound, 0.05) or (evaluation is None and total >= ONE_CLASS_SAMPLES)
    where = f" while {others:.0%} of the first eval targets are other classes" if others > 0 else ""
    message = (
        f"All {total} training targets in the first {batches} batches are class {only} (of {classes} "
        f"classes the model outputs){where}: a model that always predicts class {only} reaches a loss "
        "near zero without looking at its inputs, and learns nothing else. Likely cause: the labels "
        "were overwritten or filtered to one class, or the training data is sorted by class and not "
        "shuffled."
    )
    if not certain:
        message += (
            f" (Or the other classes are rare: below {bound:.1%} of the samples, with 95% confidence, "
            "which this sample cannot rule out.)"
        )
    return Finding(
        "label-distribution",
        "warning" if certain else "info",
        message,
        ("train labels",),
        0,
        "Check the label column and any filtering of the training set, and shuffle it "
        "(`DataLoader(..., shuffle=True)`); count the labels with `torch.bincount(labels)`.",
    )


def check_train_eval_gap(step: int, train_loss: float, eval_loss: float, baseline: float) -> Finding | None:
    """``train-eval-gap``: a train loss far below the eval loss, against the baseline loss.

    Args:
        step (`int`): the step of the evaluation.
        train_loss (`float`): the recent mean train loss.
        eval_loss (`float`): the evaluation loss.
        baseline (`float`): the loss of the best constant prediction (a reference scale).
    """
    if not (math.isfinite(train_loss) and math.isfinite(eval_loss) and baseline > 0):
        return None
    gap = eval_loss - train_loss
    if gap <= GAP_SHARE * baseline or eval_loss <= GAP_RATIO * train_loss:
        return None
    nothing = eval_loss >= 0.95 * baseline
    verdict = (
        "the eval loss is at or above the baseline: nothing the model learned carries over to data "
        "it has not seen. Likely causes: the training labels do not depend on the inputs and the "
        "model memorises them, or train and eval differ (another label mix, preprocessing or source)"
        if nothing
        else "the model fits its training samples far better than unseen ones. Likely causes: "
        "overfitting (a model too large for the data, too many epochs), or train and eval data "
        "that differ"
    )
    return Finding(
        "train-eval-gap",
        "warning",
        f"At step {step}, the train loss is {train_loss:.4g} and the eval loss {eval_loss:.4g}, "
        f"{gap:.4g} apart ({eval_loss / max(train_loss, 1e-12):.3g}x), against a baseline loss of "
        f"{baseline:.4g} for a constant prediction: {verdict}.",
        (),
        step,
        "Compare the label mix and preprocessing of the two sets; for overfitting, add data or "
        "augmentation, weight decay or dropout, or stop early on the eval loss.",
    )
