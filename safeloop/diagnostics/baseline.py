"""The baseline loss: what the best constant prediction scores on the run's own targets.

A model that learns nothing from its inputs can still reach the loss of the best constant
prediction: the class frequencies for a classifier, the target mean for a regression. A loss that
never leaves that level has learned nothing (``no_learning.py``). Closed forms, in nats as torch's
losses compute them, for ``reduction="mean"``:

- cross-entropy and NLL on class indices: the entropy of the class frequencies, ignored targets
  left out; with class ``weight``, of the frequencies times the weights (the weighted mean is then
  minimised by predicting them); with ``label_smoothing`` e over C classes, the entropy of
  ``(1 - e) p + e / C``. On class probabilities (soft targets): the entropy of their mean.
- binary cross-entropy (with or without logits): the mean over outputs of the binary entropy of
  each output's mean target.
- MSE: the mean over outputs of each output's variance (the population variance: the mean is the
  best constant). L1: the mean absolute deviation from each output's median. Smooth L1 and Huber:
  each output's best constant by golden-section search (the loss is convex in it).

A :class:`TargetSample` keeps the first batches' targets on the device, where the loss sees them;
``statistics()`` turns them into a fixed-size vector that sums over processes, and ``Baseline.of``
reads the closed form from it. The L1-type losses have no summable statistics: each process's value
enters weighted by its sample count. Nothing here makes a collective call or a host read before
``statistics()``.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from safeloop.diagnostics.loss_kinds import recognise_loss

__all__ = [
    "Baseline",
    "LossForm",
    "TargetSample",
    "loss_form",
    "BASELINE_BATCHES",
    "BASELINE_SAMPLES",
    "BASELINE_ELEMENTS",
    "count_classes",
]

# The first batches measure the class frequencies or target moments; 8 batches (at most 4096
# samples) is what the data profile takes too.
BASELINE_BATCHES = 8
BASELINE_SAMPLES = 4096
# ... and at most 4M target elements (16 MB as float32) kept on the device: dense targets (images
# for an autoencoder, per-pixel masks) stop the sample early instead of filling the memory.
BASELINE_ELEMENTS = 1 << 22
_GOLDEN_STEPS = 80  # golden-section steps: the bracket shrinks by 0.618 per step, to ~1e-17 of it


@dataclass(frozen=True)
class LossForm:
    """What a recognised loss computes, as far as its baseline needs.

    Attributes:
        kind (`str`): ``"ce"``, ``"nll"``, ``"bce"``, ``"bce_logits"``, ``"mse"``, ``"l1"``,
            ``"smooth_l1"`` or ``"huber"``.
        name (`str`): how messages name it (``CrossEntropyLoss``, ``F.mse_loss``).
        ignore_index (`int | None`): class targets left out of the mean.
        smoothing (`float`): cross-entropy's ``label_smoothing``.
        weight (`torch.Tensor | None`): the per-class weights of cross-entropy or NLL.
        beta (`float`): Smooth L1's ``beta`` or Huber's ``delta``.
        problem (`str | None`): why no closed form applies (``reduction="sum"``, ``pos_weight``).
    """

    kind: str
    name: str
    ignore_index: int | None = None
    smoothing: float = 0.0
    weight: torch.Tensor | None = None
    beta: float = 1.0
    problem: str | None = None


def loss_form(loss_fn: Any) -> LossForm | None:
    """Return what ``loss_fn`` computes, or None when it is not a loss recognised here."""
    recognised = recognise_loss(loss_fn)
    if recognised is None:
        return None
    if isinstance(loss_fn, functools.partial):
        func, options = loss_fn.func, dict(loss_fn.keywords)
        name = getattr(func, "__name__", "")
    else:
        options = {key: getattr(loss_fn, key) for key in vars(loss_fn) if not key.startswith("_")}
        options.update({key: getattr(loss_fn, key, None) for key in ("weight", "pos_weight")})
        name = type(loss_fn).__name__
    kind = recognised.kind
    if kind == "regression":
        kind = {"MSELoss": "mse", "mse_loss": "mse", "L1Loss": "l1", "l1_loss": "l1"}.get(name)
        kind = kind or ("huber" if "huber" in name.lower() else "smooth_l1")
    reduction = options.get("reduction", "mean")
    problem = None
    if reduction != "mean":
        problem = f"`reduction={reduction!r}` makes the loss's scale depend on the batch size"
    elif options.get("pos_weight") is not None or (
        kind.startswith("bce") and options.get("weight") is not None
    ):
        problem = "per-element weights of binary cross-entropy"
    weight = options.get("weight") if kind in ("ce", "nll") else None
    smoothing = float(options.get("label_smoothing", 0.0) or 0.0) if kind == "ce" else 0.0
    if weight is not None and smoothing > 0:
        problem = "class weights together with label smoothing"
    beta = float(options.get("delta" if kind == "huber" else "beta", 1.0) or 1.0)
    return LossForm(kind, recognised.name, recognised.ignore_index, smoothing, weight, beta, problem)


@dataclass(frozen=True)
class Baseline:
    """The loss of the best constant prediction, and how it was computed.

    Attributes:
        value (`float`): the loss, in the loss's own units.
        how (`str`): one sentence for messages ("the entropy of the 5 class frequencies ...").
        samples (`int`): the targets it was measured on.
    """

    value: float
    how: str
    samples: int

    @staticmethod
    def of(form: LossForm, stats: Sequence[float], layout: tuple[int, ...]) -> Baseline | None:
        """Read the baseline from the summed ``TargetSample.statistics()``, as host floats.

        Args:
            form (`LossForm`): the loss.
            stats (`Sequence[float]`): the statistics, summed over processes (``.tolist()``).
            layout (`tuple[int, ...]`): ``TargetSample.layout``, the same on every process.

        Returns:
            `Baseline | None`: None when no target was seen.
        """
        count, samples, body = stats[0], int(stats[1]), list(stats[2:])
        if count <= 0:
            return None
        if form.kind in ("ce", "nll"):
            classes = layout[0]
            mass = body[:classes]
            total = sum(mass)
            p = [m / total for m in mass]
            if form.smoothing > 0:
                p = [(1 - form.smoothing) * v + form.smoothing / classes for v in p]
            seen = sum(1 for m in mass if m > 0)
            extra = f", label smoothing {form.smoothing:g}" if form.smoothing else ""
            extra += ", weighted by the class weights" if form.weight is not None else ""
            how = f"the entropy of the class frequencies ({seen} of {classes} classes seen{extra})"
            return Baseline(_entropy(p), how, samples)
        if form.kind in ("bce", "bce_logits"):
            value = statistics.fmean(_entropy([v / count, 1 - v / count]) for v in body)
            how = f"the binary entropy of each output's mean target ({len(body)} outputs)"
            return Baseline(value, how, samples)
        if form.kind == "mse":
            outputs = len(body) // 2
            variances = [
                max(0.0, sq / count - (s / count) ** 2)
                for s, sq in zip(body[:outputs], body[outputs:], strict=True)
            ]
            how = f"the variance of the targets around their mean ({outputs} outputs)"
            return Baseline(statistics.fmean(variances), how, samples)
        # L1-type: each process's value weighted by its count
        what = "median" if form.kind == "l1" else "best constant"
        return Baseline(body[0] / count, f"the mean {form.name} of each output's {what}", samples)


class TargetSample:
    """The targets of the first micro-batches, kept on the device until a log step reads them.

    Args:
        form (`LossForm`): the loss whose baseline is measured.
        max_batches (`int`, *optional*): micro-batches to take.
        max_samples (`int`, *optional*): samples to take at most.
    """

    def __init__(
        self, form: LossForm, max_batches: int = BASELINE_BATCHES, max_samples: int = BASELINE_SAMPLES
    ):
        self.form = form
        self.max_batches = max_batches
        self.max_samples = max_samples
        self._targets: list[torch.Tensor] = []
        self._classes: int | None = None
        self._samples = 0
        self._elements = 0
        self._batches = 0
        self._shape: tuple[int, ...] = ()
        self.closed = False

    @property
    def wants(self) -> bool:
        """Whether the next micro-batch's targets are still wanted."""
        return (
            not self.closed
            and len(self._targets) < self.max_batches
            and self._samples < self.max_samples
            and self._elements < BASELINE_ELEMENTS
        )

    def see(self, outputs: Any, targets: Any) -> None:
        """Keep a detached copy of ``targets`` (device only), and the class count of ``outputs``."""
        if not self.wants or not isinstance(targets, torch.Tensor) or not isinstance(outputs, torch.Tensor):
            return
        if targets.dim() == 0 or targets.numel() == 0 or outputs.dim() == 0:
            return
        if self.form.kind in ("ce", "nll"):
            classes = int(outputs.shape[1]) if outputs.dim() >= 2 else int(outputs.shape[0])
            if self._classes not in (None, classes):
                return
            self._classes = classes
        if self._targets and self._targets[0].shape[1:] != targets.shape[1:]:
            return  # another layout (dynamic padding): per-output statistics need one
        self._targets.append(targets.detach().clone())
        self._shape = tuple(targets.shape[1:])
        self._samples += int(targets.shape[0])
        self._elements += targets.numel()
        self._batches += 1

    @property
    def layout(self) -> tuple[int, ...]:
        """The size of ``statistics()``'s body: classes, or the outputs per sample."""
        if self.form.kind in ("ce", "nll"):
            return () if self._classes is None else (self._classes,)
        return self._shape

    def statistics(self) -> torch.Tensor | None:
        """The summable statistics: weight of the mean, samples, then the body (float64).

        Returns:
            `torch.Tensor | None`: on the targets' device; None when nothing was kept.
        """
        self.closed = True
        if not self._targets:
            return None
        targets = torch.cat(self._targets)
        self._targets = []
        form = self.form
        header: list[torch.Tensor | float] = [float(targets.shape[0])]
        with torch.no_grad():
            if form.kind in ("ce", "nll"):
                body, weight = self._class_mass(targets)
                header = [weight, float(targets.shape[0])]
            elif form.kind in ("bce", "bce_logits"):
                flat = targets.reshape(targets.shape[0], -1).double()
                body, header = flat.sum(0), [float(flat.shape[0]), float(flat.shape[0])]
            elif form.kind == "mse":
                flat = targets.reshape(targets.shape[0], -1).double()
                body = torch.cat([flat.sum(0), (flat * flat).sum(0)])
                header = [float(flat.shape[0]), float(flat.shape[0])]
            else:
                flat = targets.reshape(targets.shape[0], -1).double()
                value = _l1_type(form, flat) * flat.shape[0]
                body, header = value.reshape(1), [float(flat.shape[0]), float(flat.shape[0])]
        head = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(body.device) for v in header])
        return torch.cat([head, body.double()])

    def class_counts(self) -> torch.Tensor | None:
        """The unweighted count of each class among the kept class-index targets (before ``statistics``)."""
        if self.form.kind not in ("ce", "nll") or self._classes is None or not self._targets:
            return None
        if self._targets[0].is_floating_point():
            return None
        return count_classes(
            torch.cat([t.reshape(-1) for t in self._targets]), self._classes, self.form.ignore_index
        )

    @property
    def batches(self) -> int:
        """The micro-batches whose targets were kept."""
        return self._batches

    def _class_mass(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The (weighted) count of each class, and the total weight of the mean."""
        classes = self._classes or 0
        form = self.form
        if targets.is_floating_point():  # class probabilities, classes along dim 1
            probabilities = targets.double().movedim(1, -1).reshape(-1, classes)
            return probabilities.sum(0), float(probabilities.shape[0])
        counts = count_classes(targets.reshape(-1), classes, form.ignore_index)
        total = counts.sum()
        if form.weight is not None:
            counts = counts * form.weight.detach().double().to(counts.device)
        return counts, total


def count_classes(targets: torch.Tensor, classes: int, ignore_index: int | None) -> torch.Tensor:
    """The count of each class among class-index ``targets`` (float64, on their device).

    Ignored and out-of-range targets go to an extra bin that is dropped: boolean indexing and
    ``bincount`` would each wait for the device.
    """
    index = targets.reshape(-1).long()
    valid = (index >= 0) & (index < classes)
    if ignore_index is not None:
        valid &= index != ignore_index
    index = torch.where(valid, index, classes)
    counts = torch.zeros(classes + 1, dtype=torch.float64, device=targets.device)
    counts.scatter_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    return counts[:classes]


def _entropy(p: Sequence[float]) -> float:
    """In nats; a probability of 0 adds nothing (the limit of p log p)."""
    return -sum(v * math.log(v) for v in p if v > 0)


def _l1_type(form: LossForm, values: torch.Tensor) -> torch.Tensor:
    """The mean loss of each output's best constant, averaged over outputs (L1, Smooth L1, Huber)."""
    if form.kind == "l1":
        median = values.median(0).values  # a median minimises the mean absolute deviation
        return (values - median).abs().mean()

    def loss_at(constant: torch.Tensor) -> torch.Tensor:
        prediction = constant.expand_as(values)
        if form.kind == "huber":
            return F.huber_loss(prediction, values, reduction="none", delta=form.beta).mean(0)
        return F.smooth_l1_loss(prediction, values, reduction="none", beta=form.beta).mean(0)

    low, high = values.min(0).values, values.max(0).values
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(_GOLDEN_STEPS):  # convex in the constant: shrink the bracket toward the minimum
        left, right = high - ratio * (high - low), low + ratio * (high - low)
        lower = loss_at(left) <= loss_at(right)
        high = torch.where(lower, right, high)
        low = torch.where(lower, low, left)
    return loss_at((low + high) / 2).mean()
