"""The first-batch checks of ``diagnostics.first_batch``, spread over a Lightning fit's hooks.

``SafeTrainer`` runs the first forward itself inside a ``ForwardWatch``. Under Lightning the
forward happens in the user's ``training_step``, between two hooks the callback gets:

- ``on_train_batch_start`` (first batch): the inputs, the trainable parameters and the
  optimizer are checked; the watch starts (forward hooks on every module, torch's warnings
  recorded so that a broadcasting loss becomes a ``loss-broadcast`` finding, and the torch
  losses ``training_step`` calls run through the target checks: ``loss_watch.py``);
- ``on_before_zero_grad`` (automatic optimization; Lightning calls it after ``training_step``
  and before its own backward): gradients already there mean ``training_step`` called
  ``backward()`` itself (``double-backward``);
- ``on_before_backward`` (the loss, before backward: in ``manual_backward`` too): the watch stops,
  the loss is checked (scalar, differentiable, and why not), the findings are agreed over the
  processes, and those that make training meaningless raise a ``ConfigError`` before torch's own,
  less telling error;
- ``on_after_backward`` (first time): trainable parameters that got no gradient, by whether their
  module ran (``unused-params``, ``detached-params``); not under FSDP1, whose empty slices hold
  no gradient (``SafeTrainer`` skips it there too).

The checks are the functions ``SafeTrainer`` uses; only the moments differ.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch.nn.parallel import DistributedDataParallel

from safeloop.diagnostics.broadcast import from_warnings
from safeloop.diagnostics.first_batch import (
    check_double_backward,
    check_gradient_reach,
    check_loss,
    check_optimizer,
    check_trainable,
    check_zero_gradients,
    raise_if_fatal,
)
from safeloop.diagnostics.targets import check_inputs
from safeloop.diagnostics.watch import ForwardWatch, GradientReach
from safeloop.errors import ConfigError
from safeloop.findings import Reporter, agree_findings
from safeloop.lightning.loss_watch import LossCallWatch, LossFn
from safeloop.lightning.processes import LightningProcesses
from safeloop.results import Finding

__all__ = ["FirstBatchChecks"]

logger = logging.getLogger("safeloop")


class FirstBatchChecks:
    """Runs the first-batch checks once per fit, from the first batch's hooks.

    Args:
        model (`LightningModule`): the module being fitted (unwrapped).
        prepared (`torch.nn.Module`): the strategy's model (DDP's wrapper, or the module itself).
        optimizer (`torch.optim.Optimizer`): the optimizer of ``configure_optimizers``.
        processes (`LightningProcesses`): the findings are agreed over them.
        reporter (`Reporter`): where the findings go.
        checked_loss_fn (`Callable`, *optional*): ``checked_loss_fn(loss_fn, found, batch)``
            wraps a loss in the target checks (``Diagnostics.checked_loss_fn``); the losses the
            first ``training_step`` calls go through it (:class:`LossCallWatch`).
        zero_gradients_found (`Callable`, *optional*): called when every first gradient is
            exactly zero (``detached-params``), so that weight health does not also report the
            rows without gradient as dead units (``Diagnostics.zero_gradients_found``).
        gradient_reach (`bool`, *optional*, defaults to True): ``.grad is None`` means "no
            gradient" on every process alike: not under FSDP1, where a process whose slice of a
            parameter is empty holds no gradient for it, nor under DeepSpeed ZeRO.
        reach_hooks (`bool`, *optional*, defaults to False): ``.grad`` is never set, but gradient
            accumulation hooks fire for the parameters the backward reaches (DeepSpeed ZeRO,
            ``ShardLayout.reach_hooks``): the check reads them instead.

    Attributes:
        reached (`set[str] | None`): with ``reach_hooks``, the parameters the first backward
            reached (for the all-zero weight check); None otherwise.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prepared: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        processes: LightningProcesses,
        reporter: Reporter,
        checked_loss_fn: Callable[[LossFn, list[Finding], Any], LossFn] | None = None,
        zero_gradients_found: Callable[[], None] | None = None,
        gradient_reach: bool = True,
        reach_hooks: bool = False,
    ) -> None:
        self.model = model
        self.prepared = prepared
        self.optimizer = optimizer
        self.processes = processes
        self.reporter = reporter
        self.checked_loss_fn = checked_loss_fn
        self.zero_gradients_found = zero_gradients_found
        self.gradient_reach = gradient_reach
        self.reach_hooks = reach_hooks
        self.reached: set[str] | None = None
        self._hooks: GradientReach | None = None
        self.done = False
        self._findings: list[Finding] = []
        self._loss_findings: list[Finding] = []  # the checks of the losses training_step called
        self._losses: LossCallWatch | None = None
        self._had_grads = False
        self._watch: ForwardWatch | None = None
        self._warnings: warnings.catch_warnings[list[warnings.WarningMessage]] | None = None
        self._caught: list[warnings.WarningMessage] = []
        self._reach: ForwardWatch | None = None  # the finished watch, until the first backward

    @property
    def watching(self) -> bool:
        """The first batch's forward is being watched (its loss has not reached backward yet)."""
        return self._watch is not None

    def start(self, batch: Any) -> None:
        """``on_train_batch_start`` of the first batch: the checks before the forward, then the watch."""
        if self.done or self.watching:
            return
        self._findings = check_inputs(batch) + check_trainable(self.model)
        if self.processes.distributed_type != DistributedType.DEEPSPEED:
            # DeepSpeed's optimizer holds flat partitions in place of the module's parameters
            # (its `initialize` fails on a tensor that is not the module's before this runs)
            self._findings += check_optimizer(self.model, self.optimizer)
        self._had_grads = any(p.grad is not None for p in self.model.parameters())
        watch = ForwardWatch(self.model)
        watch.__enter__()
        recorder = warnings.catch_warnings(record=True)
        try:
            self._caught = recorder.__enter__()
        except BaseException:
            watch.__exit__(None, None, None)
            raise
        # "always": torch's broadcasting warning must be seen even if shown before (a notebook's
        # second fit); the others are re-emitted as they came when the watch stops
        warnings.simplefilter("always")
        self._watch, self._warnings = watch, recorder
        checked = self.checked_loss_fn
        if checked is not None:
            found = self._loss_findings = []
            losses = LossCallWatch(lambda loss_fn: checked(loss_fn, found, batch))
            losses.__enter__()  # last in, first out: left before the recorder and the watch
            self._losses = losses

    def before_zero_grad(self) -> None:
        """``on_before_zero_grad`` (automatic optimization): did ``training_step`` call backward itself?"""
        if self.watching and not self._had_grads:
            self._findings += check_double_backward(self.model)

    def at_loss(self, loss: torch.Tensor) -> None:
        """``on_before_backward`` of the first batch: check the loss, agree, raise or report.

        Raises:
            ConfigError: on every process, when any process found a problem that makes
                training meaningless (the raised codes of docs/diagnostics.md).
        """
        if not self.watching:
            return
        watch, caught = self._stop()
        loss_findings = self._loss_findings
        loss_findings += from_warnings(caught, loss_findings)
        findings = self._findings + loss_findings + check_loss(loss, watch)
        self._findings, self._loss_findings = [], []
        self.done = True
        findings = agree_findings(self.processes, findings)  # type: ignore[arg-type]
        raise_if_fatal(findings)
        self.reporter.add_all(findings)
        self._reach = watch
        if self.reach_hooks:  # ZeRO: which parameters the coming backward reaches
            self._hooks = GradientReach(self.model)

    def after_backward(self) -> None:
        """``on_after_backward``, once after :meth:`at_loss`: parameters the backward did not reach.

        Raises:
            ConfigError: under DDP without ``find_unused_parameters``, which would stop at the
                next step with a reduction error, when some parameters got no gradient.
        """
        watch, self._reach = self._reach, None
        if watch is None:
            return
        if self._hooks is not None:
            self.reached, self._hooks = self._hooks.close(), None
        if self.reached is not None:
            found = check_gradient_reach(self.model, watch, self.reached)
        else:
            found = check_gradient_reach(self.model, watch) if self.gradient_reach else []
        if not found and self.processes.distributed_type not in (
            DistributedType.FSDP,
            DistributedType.DEEPSPEED,
        ):
            # every gradient exactly zero: a loss through round/sign/a comparison (not under
            # FSDP: a process's shard of a gradient can be zero while the whole is not; nor
            # under DeepSpeed, which keeps its gradients away from `.grad`)
            found = check_zero_gradients(self.model)
        findings = agree_findings(self.processes, found)  # type: ignore[arg-type]
        if any(f.code == "detached-params" for f in findings) and self.zero_gradients_found is not None:
            self.zero_gradients_found()
        self.reporter.add_all(findings)
        ddp = self.prepared
        if findings and isinstance(ddp, DistributedDataParallel) and not ddp.find_unused_parameters:
            raise ConfigError(
                "Under DDP every trainable parameter must receive a gradient at every step, and these got "
                "none on the first batch:\n"
                + "\n".join(f"  - [{f.code}] {f.message}" for f in findings)
                + "\nRemove or freeze them (`requires_grad_(False)`), use them in `forward`, or let DDP "
                'skip them: `Trainer(strategy="ddp_find_unused_parameters_true")`.',
                findings=findings,
            )

    def close(self, reason: str | None = None) -> None:
        """Stop watching without checking the loss (the first batch ended without one, or an error).

        Args:
            reason (`str`, *optional*): logged at INFO when given (the checks did not run).
        """
        if self.watching:
            _, caught = self._stop()
            from_warnings(caught, [])  # the user's warnings come out as they came; no finding now
            self.done = True
            if reason is not None and self.processes.is_main_process:
                logger.info("safeloop: the first-batch checks of the loss did not run: %s", reason)
        self._findings, self._loss_findings, self._reach = [], [], None
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None

    def _stop(self) -> tuple[ForwardWatch, list[warnings.WarningMessage]]:
        watch, recorder, losses = self._watch, self._warnings, self._losses
        assert watch is not None and recorder is not None  # invariant: only while watching
        self._watch = self._warnings = self._losses = None
        caught, self._caught = self._caught, []
        try:
            if losses is not None:
                losses.__exit__(None, None, None)
        finally:
            try:
                recorder.__exit__(None, None, None)
            finally:
                watch.__exit__(None, None, None)
        return watch, caught
