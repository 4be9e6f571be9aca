"""What the trainer does with a skipped step once the host knows of it.

It keeps the recent micro-batches (so that a skipped step's batches can be replayed), turns a
skip into its ``"skip"`` event and findings, and asks the guard's policy whether to escalate.
The trainer dispatches the results; this module neither steps nor logs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from safeloop.diagnostics.localize import Localisation, locate_nonfinite
from safeloop.errors import NonFiniteError
from safeloop.guards.nonfinite import SkipRecord, SkipTracker
from safeloop.metrics import StepValues
from safeloop.results import Event, Finding

if TYPE_CHECKING:
    from safeloop.trainer import SafeTrainer

__all__ = ["handle_skip", "SkipMonitor", "SkipOutcome"]

_MAX_NAMED = 10


@dataclass(frozen=True)
class SkipOutcome:
    """The consequences of one skipped step.

    Attributes:
        event (`Event`): the ``"skip"`` event.
        findings (`tuple[Finding, ...]`): what was measured about it.
        escalate (`bool`): more skips in a row than ``max_consecutive_skips``.
    """

    event: Event
    findings: tuple[Finding, ...]
    escalate: bool


class SkipMonitor:
    """Tracks skips, keeps recent batches and localises non-finite values.

    Args:
        max_consecutive_skips (`int`): more skips in a row escalate.
        param_names (`Sequence[str]`): names of the model's parameters, in ``parameters()`` order.
        history_steps (`int`): how many optimizer steps of micro-batches to keep for a replay.
        accumulation (`int`): micro-batches per optimizer step.
    """

    def __init__(
        self,
        *,
        max_consecutive_skips: int,
        param_names: Sequence[str],
        history_steps: int,
        accumulation: int,
    ) -> None:
        self.tracker = SkipTracker(max_consecutive_skips=max_consecutive_skips)
        self.param_names = tuple(param_names)
        self.overflow_skips = 0
        # references only (no copies): the batches stay alive until they leave the window
        self._batches: deque[tuple[int, int, Any]] = deque(maxlen=history_steps * accumulation)
        self._first_batch: tuple[int, int] | None = None  # (step, batch_idx) of the fit's first batch

    def remember(self, step: int, batch_idx: int, batch: Any) -> None:
        """Keep a micro-batch of optimizer step ``step`` for a possible replay."""
        if self._first_batch is None:
            self._first_batch = (step, batch_idx)
        self._batches.append((step, batch_idx, batch))

    def is_first_batch(self, event: Event) -> bool:
        """Whether a skip's replay found its origin in the fit's first batch (checked before step 1)."""
        origin = event.detail.get("origin")
        return origin is not None and (event.step, origin["batch_idx"]) == self._first_batch

    def forget(self) -> None:
        """Drop the remembered batches (after a rollback they belong to an abandoned branch)."""
        self._batches.clear()

    def names(self, positions: Sequence[int]) -> tuple[str, ...]:
        """Names of the parameters at ``positions``."""
        return tuple(self.param_names[i] for i in positions if i < len(self.param_names))

    def applied(self, step: int) -> None:
        """Record that ``step`` was applied (ends a run of skips)."""
        self.tracker.observe(step, True)

    def record_now(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, nonfinite: torch.Tensor | None
    ) -> SkipRecord:
        """Describe a step known to be skipped from its device values (host reads: skips only)."""
        bad = [] if nonfinite is None else torch.nonzero(nonfinite).flatten().tolist()
        return SkipRecord(step, float(loss), float(grad_norm), self.names(bad))

    def skipped_in_log(self, last_step: int, per_step: Sequence[StepValues]) -> list[SkipRecord]:
        """Go through the steps of a log interval read on the host, oldest first.

        Applied steps end runs of skips; fp16 scaler overflows are counted apart (expected while
        the scale settles, never escalated). Returns the records of the guard's own skips, for
        the trainer to report in order.
        """
        first = last_step - len(per_step) + 1
        records = []
        for offset, values in enumerate(per_step):
            if values.overflow:
                self.overflow_skips += 1
            elif values.finite:
                self.applied(first + offset)
            else:
                records.append(
                    SkipRecord(first + offset, values.loss, values.grad_norm, self.names(values.bad_params))
                )
        return records

    def escalation_error(self, record: SkipRecord, findings: Sequence[Finding]) -> NonFiniteError:
        """The error for a run of skips longer than ``max_consecutive_skips``."""
        return NonFiniteError(
            f"{self.tracker.consecutive} optimizer steps in a row ended with a non-finite loss or "
            f"gradients (the last at step {record.step}, loss {record.loss}, gradient norm "
            f"{record.grad_norm}); `max_consecutive_skips={self.tracker.max_consecutive_skips}`. "
            "See the findings for where the values came from; lower the learning rate, clip "
            "gradients (`clip_grad_norm=1.0`) or clean the data.",
            findings=findings,
        )

    @staticmethod
    def raise_policy_error(record: SkipRecord, outcome: SkipOutcome) -> NonFiniteError:
        """The error of ``nan_guard="raise"`` at the first non-finite step."""
        params = ", ".join(record.params) or "some parameters"
        what = "loss" if record.cause == "loss" else f"gradients of {params}"
        return NonFiniteError(
            f"step {record.step}: the {what} went non-finite (loss {record.loss}, gradient norm "
            f'{record.grad_norm}) and `nan_guard="raise"`; nothing was updated. '
            + " ".join(f.message for f in outcome.findings),
            findings=outcome.findings,
        )

    def skipped(
        self,
        record: SkipRecord,
        model: torch.nn.Module,
        loss_of: Callable[[torch.nn.Module, Any], torch.Tensor],
    ) -> SkipOutcome:
        """Record a skipped step, replay its batches and describe it.

        Args:
            record (`SkipRecord`): what the host read about the step.
            model (`torch.nn.Module`): the unwrapped model, for the replay.
            loss_of (`Callable`): the batch conventions, ``loss_of(model, batch)``.

        Returns:
            `SkipOutcome`: the event, the findings and whether to escalate.
        """
        escalate = self.tracker.observe(record.step, False, record) == "escalate"
        batches = [(idx, batch) for step, idx, batch in self._batches if step == record.step]
        where = locate_nonfinite(model, batches, loss_of) if batches else None
        detail = record.detail()
        detail["consecutive"] = self.tracker.consecutive
        if where is not None:
            detail["origin"] = {"kind": where.kind, "batch_idx": where.batch_idx, "where": where.where}
        event = Event("skip", record.step, detail)
        return SkipOutcome(event, tuple(_findings(record, where)), escalate)


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:_MAX_NAMED])
    more = f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
    return shown + more


def _findings(record: SkipRecord, where: Localisation | None) -> list[Finding]:
    findings = []
    if where is not None and where.kind == "input":
        findings.append(
            Finding(
                code="nonfinite-input",
                severity="error",
                message=(
                    f"step {record.step}: {where.where} of batch {where.batch_idx} holds "
                    f"{where.count} NaN/Inf values, so the loss was {record.loss}."
                ),
                params=(where.where,),
                step=record.step,
                suggestion="Clean the data: drop or impute NaN/Inf in the dataset or its transform.",
            )
        )
    if record.cause == "loss":
        origin = ""
        params: tuple[str, ...] = ()
        if where is not None and where.kind == "module":
            origin = (
                f" Replaying batch {where.batch_idx}, the first module whose output went "
                f"non-finite is `{where.where}` ({where.count} values)."
            )
            params = (where.where,)
        elif where is not None and where.kind == "loss":
            origin = (
                f" Replaying batch {where.batch_idx}, every module output was finite: the loss "
                "computation itself made it."
            )
        if where is None or where.kind != "input":
            findings.append(
                Finding(
                    code="nonfinite-loss",
                    severity="warning",
                    message=f"step {record.step}: the loss was {record.loss}; the step was skipped.{origin}",
                    params=params,
                    step=record.step,
                    suggestion=(
                        "Look for log/sqrt/division of values that can reach 0 or below, overflow in "
                        "exp, or a learning rate high enough to blow the weights up."
                    ),
                )
            )
    else:
        findings.append(
            Finding(
                code="nonfinite-grad",
                severity="warning",
                message=(
                    f"step {record.step}: the loss was finite ({record.loss:.4g}) but the gradient "
                    f"norm was {record.grad_norm}; non-finite gradients in "
                    f"{_listed(record.params) or 'unknown parameters'}. The step was skipped."
                ),
                params=record.params,
                step=record.step,
                suggestion=(
                    "Check operations with unbounded derivatives at some inputs (sqrt at 0, "
                    "norms of zero vectors, custom backward functions), or clip gradients."
                ),
            )
        )
    return findings


def handle_skip(trainer: SafeTrainer, record: SkipRecord, *, raise_policy: bool = False) -> None:
    """Report a skipped step of the trainer; raise, or ask for a rollback, when the policy says.

    Raises:
        NonFiniteError: under ``nan_guard="raise"``, or past ``max_consecutive_skips`` without
            rollback.
        RollbackRequest: past ``max_consecutive_skips`` with rollback on.
    """
    from safeloop.findings import agree_findings
    from safeloop.rollback import RollbackRequest, can_roll_back

    monitor = trainer._skips
    outcome = monitor.skipped(record, trainer.accelerator.unwrap_model(trainer.model), trainer._loss_of)
    findings = list(outcome.findings)
    if monitor.is_first_batch(outcome.event):
        # the first-batch check already reported the same tensor of the same batch: not a repeat
        known = {(f.code, f.params) for f in trainer._findings}
        findings = [f for f in findings if f.code != "nonfinite-input" or (f.code, f.params) not in known]
    # every process learns of the skip at the same point; each replayed its own batch
    for finding in agree_findings(trainer.accelerator, findings):
        trainer._add_finding(finding)
    if raise_policy:
        raise monitor.raise_policy_error(record, outcome)
    trainer._events.append(outcome.event)
    trainer._callbacks.call("on_skip", trainer, outcome.event)
    if not outcome.escalate:
        return
    if can_roll_back(trainer):
        run = monitor.tracker.consecutive
        text = (
            f"{run} non-finite steps in a row (last loss {record.loss:.4g}, grad norm {record.grad_norm:.4g})"
        )
        # a skip decided on the device is learnt at the log step: the data was consumed up to now
        raise RollbackRequest(
            "nonfinite", record.step - run + 1, trainer.global_step, text, {"consecutive": run}
        )
    raise monitor.escalation_error(record, trainer._findings)
