"""The baseline loss of one run, wired to the loop: what is sampled when, measured where, judged how.

``baseline.py`` computes the loss of the best constant prediction from a sample of targets; this
module takes that sample (the targets the user's ``loss_fn`` receives on the first micro-batches,
the class targets of the first eval batches), measures it once over every process, and hands it to
the rules that compare with it: ``no-learning`` (``no_learning.py``, judged by the training
monitor at log checks and here at evaluations), ``label-distribution`` and ``train-eval-gap``
(``labels.py``). The measurement is a collective: every process makes it at the same log check,
the first after ``BASELINE_BATCHES`` micro-batches (a count that is the same on every process),
or at the end of ``fit``; a process without a sample (another ``loss_fn``) still joins it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator

from safeloop.diagnostics.baseline import BASELINE_BATCHES, Baseline, TargetSample, count_classes, loss_form
from safeloop.diagnostics.labels import check_label_mix, check_train_eval_gap, eval_targets
from safeloop.diagnostics.no_learning import NoLearning
from safeloop.diagnostics.updates import Cause
from safeloop.distributed import reduce_across_processes
from safeloop.findings import Reporter
from safeloop.results import Finding

__all__ = ["BaselineWatch"]

logger = logging.getLogger("safeloop")

LossFn = Callable[[Any, Any], Any]

_RECOGNISED = (
    "CrossEntropyLoss, NLLLoss, BCELoss, BCEWithLogitsLoss, MSELoss, L1Loss, SmoothL1Loss, HuberLoss "
    "and their F. forms"
)


class BaselineWatch:
    """Samples, measures and judges against the baseline loss of one run.

    Args:
        accelerator (`Accelerator`): the run's processes (the measurement sums over them).
        reporter (`Reporter`): the run's findings (ranked as causes of ``no-learning``).
        no_learning (`NoLearning`): the training monitor's rule, given the baseline once measured.
        loss_fn (`Callable`, *optional*): the user's ``loss_fn``; None when the model or a
            ``training_step`` computes the loss.
        custom_step (`bool`): a ``training_step`` computes the loss.
        has_eval (`bool`): an eval loader is profiled (its class mix is compared).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        reporter: Reporter,
        no_learning: NoLearning,
        loss_fn: LossFn | None,
        *,
        custom_step: bool,
        has_eval: bool,
    ) -> None:
        self.accelerator = accelerator
        self.reporter = reporter
        self.no_learning = no_learning
        self.loss_fn = loss_fn
        self.has_eval = has_eval
        self.baseline: Baseline | None = None
        self.pending = True
        self._sample = self._new_sample(loss_fn, custom_step)
        self._micro_batches = 1  # the first one is the first-batch check's
        self._eval_targets: list[torch.Tensor] = []  # class targets of the first eval batches, host
        self._eval_baseline = 0.0
        self._gap_reported = False

    def _new_sample(self, loss_fn: LossFn | None, custom_step: bool) -> TargetSample | None:
        form = None if loss_fn is None else loss_form(loss_fn)
        why = None
        if custom_step:
            why = "the loss comes from `training_step`, whose targets and loss are not seen"
        elif loss_fn is None:
            why = "the model computes its own loss (no `loss_fn`)"
        elif form is None:
            why = f"`{getattr(loss_fn, '__name__', type(loss_fn).__name__)}` is not a loss recognised here"
        elif form.problem is not None:
            why = f"`{form.name}` uses {form.problem}"
        if why is None and form is not None:
            return TargetSample(form)
        if self.accelerator.is_main_process:
            logger.info(
                "safeloop: no baseline loss (the loss of the best constant prediction) for this run: %s; "
                "the no-learning, label-distribution and train-eval-gap checks are off. Recognised: %s.",
                why,
                _RECOGNISED,
            )
        return None

    # -- sampling (device only) --------------------------------------------------------------

    def see(self, outputs: Any, targets: Any) -> None:
        """The first micro-batch's outputs and targets, as the checked ``loss_fn`` receives them."""
        if self._sample is not None:
            self._sample.see(outputs, targets)

    def loss_fn_now(self) -> LossFn | None:
        """The ``loss_fn`` wrapped to keep its targets while the sample takes them, else None.

        Called once per micro-batch after the first one: it also counts them.
        """
        self._micro_batches += 1
        sample, loss_fn = self._sample, self.loss_fn
        if sample is None or loss_fn is None or not sample.wants:
            return None

        def sampled(outputs: Any, targets: Any) -> Any:
            sample.see(outputs, targets)
            return loss_fn(outputs, targets)

        return sampled

    def see_eval_batch(self, batch: Any) -> None:
        """Keep an eval batch's class targets on the host (before training: no step waits for it)."""
        targets = eval_targets(batch)
        if targets is not None and self._sample is not None:
            self._eval_targets.append(targets.detach().cpu())

    # -- the measurement (a collective) ------------------------------------------------------

    @property
    def due(self) -> bool:
        """Whether this log check measures: the first after ``BASELINE_BATCHES`` micro-batches."""
        return self.pending and self._micro_batches >= BASELINE_BATCHES

    def measure(self, step: int, *, log: bool = False) -> list[Finding]:
        """The baseline from every process's sample, and the label mix (every process calls it).

        Two small all-reduces and two host reads, once per ``fit``.

        Args:
            step (`int`): the step it is measured at.
            log (`bool`, *optional*, defaults to False): log the baseline to the trackers here (at
                the end of ``fit``; at a log step it joins that step's values instead).

        Returns:
            `list[Finding]`: ``label-distribution`` findings (the same on every process).
        """
        sample, self._sample, self.pending = self._sample, None, False
        acc = self.accelerator
        counts = None if sample is None else sample.class_counts()  # before `statistics` lets go
        stats = None if sample is None else sample.statistics()
        length = -1 if stats is None else stats.numel()
        bounds = torch.tensor([length, -length], dtype=torch.float64, device=acc.device)
        high, low = reduce_across_processes(acc, bounds, "max").tolist()  # one read
        if stats is None or sample is None or high != -low:  # a process saw no targets, or another layout
            return []
        classes = sample.layout[0] if counts is not None else 0
        if counts is not None:  # the label mix rides along: train counts, then eval counts
            held = (
                count_classes(
                    torch.cat([t.reshape(-1) for t in self._eval_targets]), classes, sample.form.ignore_index
                )
                if self._eval_targets
                else torch.zeros(classes, dtype=torch.float64)
            )
            stats = torch.cat([stats, counts, held.to(counts.device)])
        self._eval_targets = []
        summed = reduce_across_processes(acc, stats.to(acc.device), "sum").tolist()  # one read
        found: list[Finding] = []
        if counts is not None:
            summed, train, held_counts = (
                summed[: -2 * classes],
                summed[-2 * classes : -classes],
                summed[-classes:],
            )
            evaluation = held_counts if self.has_eval else None
            found = check_label_mix(train, evaluation, sample.batches)
            self._eval_baseline = _entropy(held_counts) if evaluation is not None else 0.0
        baseline = Baseline.of(sample.form, summed, sample.layout)
        if baseline is not None:
            self.baseline = self.no_learning.baseline = baseline
            if acc.is_main_process:
                logger.info(
                    "safeloop: baseline loss %.4g (%s, %d targets)",
                    baseline.value,
                    baseline.how,
                    baseline.samples,
                )
                if log and acc.trackers:
                    acc.log({"baseline_loss": baseline.value}, step=step)
        return found

    # -- evaluations (host only) -------------------------------------------------------------

    def after_evaluation(self, step: int, eval_loss: float, causes: Sequence[Cause]) -> list[Finding]:
        """Judge an evaluation: ``no-learning`` on the eval loss, ``train-eval-gap``.

        Args:
            step (`int`): the step of the evaluation.
            eval_loss (`float`): its loss (the same on every process).
            causes (`Sequence[Cause]`): the training monitor's causes measured at its last check.
        """
        rule, baseline = self.no_learning, self.baseline
        if baseline is None or not math.isfinite(eval_loss):
            return []
        found = []
        if rule.update_eval(step, eval_loss):
            found.append(rule.finding(step, causes, self.reporter.findings))
        if not self._gap_reported and rule.warmed:
            # the eval set's own baseline is the scale when the training labels are degenerate
            # (one class: a baseline of zero)
            gap = check_train_eval_gap(step, rule.recent, eval_loss, max(baseline.value, self._eval_baseline))
            if gap is not None:
                self._gap_reported = True
                found.append(gap)
        return found


def _entropy(counts: Sequence[float]) -> float:
    """The entropy of the frequencies ``counts`` give, in nats (0 for no count)."""
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c > 0) if total > 0 else 0.0
