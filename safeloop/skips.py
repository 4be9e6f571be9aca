"""The skip handler: what follows a step the NaN/Inf guard refused, once the host knows of it.

One entry point, :meth:`SkipHandler.learn`, for both ways the host learns of a step's outcome:
at the step itself (optimizers whose flag is read on the host), or at the next log step (flags
kept on the device: fused optimizers, the fp16 scaler). It keeps the recent micro-batches (so
that a skipped step's batches can be replayed), turns a skip into its ``"skip"`` event and
findings, counts skips in the run's record, and asks the rollback policy what a run of skips
past ``max_consecutive_skips`` leads to. It neither steps nor logs.

When the global gradient norms rose more than 10x in the steps before a skip (the policy's
``NormTrail``), the skip's findings start with ``exploding-grad`` and the ``nonfinite-*`` advice
points to clipping rather than to the operations that make NaN/Inf on their own.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from safeloop.diagnostics.localize import Localisation, locate_nonfinite
from safeloop.errors import NonFiniteError
from safeloop.findings import Reporter, agree_findings
from safeloop.guards.divergence import EXPLAINED_BY_EXPLOSION, Divergence, Explosion
from safeloop.guards.nonfinite import SkipRecord, SkipTracker
from safeloop.metrics import StepValues
from safeloop.results import Event, Finding
from safeloop.rollback import DivergencePolicy
from safeloop.run_state import RunRecord
from safeloop.sample_indices import SampleIndices

__all__ = ["SkipHandler", "SkipOutcome"]

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


class SkipHandler:
    """Learns of skipped steps, replays their batches, reports them and escalates runs of them.

    Args:
        policy (`str`): the ``nan_guard`` setting (``"raise"`` raises at the first skip).
        max_consecutive_skips (`int`): more skips in a row escalate.
        param_names (`Sequence[str]`): names of the model's parameters, in ``parameters()`` order.
        history_steps (`int`): how many optimizer steps of micro-batches to keep for a replay.
        accumulation (`int`): micro-batches per optimizer step.
        model (`torch.nn.Module`): the unwrapped model, for the replay.
        loss_of (`Callable`): the batch conventions, ``loss_of(model, batch)``.
        record (`RunRecord`): where skips are counted.
        reporter (`Reporter`): findings and events.
        divergences (`DivergencePolicy`): decides what a run of skips leads to.
        sample_indices (`SampleIndices`, *optional*): the dataset indices of the micro-batches,
            so that a bad input names its samples' dataset indices.

    Attributes:
        tracker (`SkipTracker`): the run of skips under way (guard state, checkpointed).
    """

    def __init__(
        self,
        *,
        policy: str,
        max_consecutive_skips: int,
        param_names: Sequence[str],
        history_steps: int,
        accumulation: int,
        model: torch.nn.Module,
        loss_of: Callable[[torch.nn.Module, Any], torch.Tensor],
        record: RunRecord,
        reporter: Reporter,
        divergences: DivergencePolicy,
        sample_indices: SampleIndices | None = None,
    ) -> None:
        self.policy = policy
        self.tracker = SkipTracker(max_consecutive_skips=max_consecutive_skips)
        self.param_names = tuple(param_names)
        self.model = model
        self.loss_of = loss_of
        self.record = record
        self.reporter = reporter
        self.divergences = divergences
        self.sample_indices = sample_indices
        # references only (no copies): the batches stay alive until they leave the window; with
        # each, the dataset indices it was drawn from (a tuple of ints), or None when not known
        self._batches: deque[tuple[int, int, Any, tuple[Any, ...] | None]] = deque(
            maxlen=history_steps * accumulation
        )
        self._first_batch: tuple[int, int] | None = None  # (step, batch_idx) of the fit's first batch

    @property
    def healthy(self) -> bool:
        """No run of skips is under way."""
        return self.tracker.consecutive == 0

    def remember(self, step: int, batch_idx: int, batch: Any) -> None:
        """Keep a micro-batch of optimizer step ``step`` for a possible replay."""
        if self._first_batch is None:
            self._first_batch = (step, batch_idx)
        indices = None if self.sample_indices is None else self.sample_indices.take(batch_idx)
        self._batches.append((step, batch_idx, batch, indices))

    def after_rollback(self) -> None:
        """Drop the remembered batches (an abandoned branch's) and end the run of skips."""
        self._batches.clear()
        self.tracker.consecutive = 0

    def names(self, positions: Sequence[int]) -> tuple[str, ...]:
        """Names of the parameters at ``positions``."""
        return tuple(self.param_names[i] for i in positions if i < len(self.param_names))

    def host_values(
        self, loss: torch.Tensor, grad_norm: torch.Tensor, param_norms: torch.Tensor | None
    ) -> StepValues:
        """A refused step's values read on the host (host reads: refused steps only).

        ``param_norms`` are the gradient norms per parameter: a non-finite one names a parameter
        whose gradient was not finite.
        """
        bad = (
            ()
            if param_norms is None
            else tuple(i for i, v in enumerate(param_norms.tolist()) if not math.isfinite(v))
        )
        return StepValues(loss=float(loss), grad_norm=float(grad_norm), finite=False, bad_params=bad)

    def learn(self, last_step: int, per_step: Sequence[StepValues]) -> Divergence | None:
        """Take the outcome of steps ending at ``last_step``, oldest first (every process together).

        Applied steps end runs of skips; fp16 scaler overflows are counted apart (expected while
        the scale settles, never escalated); each of the guard's own skips is replayed, reported
        and counted.

        Returns:
            `Divergence | None`: a run of skips past ``max_consecutive_skips`` with rollback on
            (the steps after it in ``per_step`` are not looked at).

        Raises:
            NonFiniteError: under ``nan_guard="raise"``, or past ``max_consecutive_skips`` without
                rollback.
        """
        first = last_step - len(per_step) + 1
        for offset, values in enumerate(per_step):
            if values.overflow:
                self.record.overflow_skips += 1
            elif values.finite is not False:
                self.record.applied_steps += 1
                self.tracker.observe(True)
            else:
                record = SkipRecord(
                    first + offset, values.loss, values.grad_norm, self.names(values.bad_params)
                )
                divergence = self._skipped(record)
                if divergence is not None:
                    return divergence
        return None

    def _skipped(self, record: SkipRecord) -> Divergence | None:
        if self.policy == "raise":
            outcome = self._describe(record, escalate=False)
            self._report(outcome)
            raise _raise_policy_error(record, outcome)
        escalate = self.tracker.observe(False) == "escalate"
        self.record.skipped_steps += 1
        outcome = self._describe(record, escalate=escalate)
        self._report(outcome)
        self.reporter.event(outcome.event, "on_skip")
        if not outcome.escalate:
            return None
        return self.divergences.on_skip_run(record, self.tracker.consecutive)

    def _describe(self, record: SkipRecord, *, escalate: bool) -> SkipOutcome:
        kept = [(idx, batch, indices) for step, idx, batch, indices in self._batches if step == record.step]
        batches = [(idx, batch) for idx, batch, _ in kept]
        where = locate_nonfinite(self.model, batches, self.loss_of) if batches else None
        detail = record.detail()
        detail["consecutive"] = self.tracker.consecutive
        samples = None
        if where is not None:
            detail["origin"] = {"kind": where.kind, "batch_idx": where.batch_idx, "where": where.where}
            if where.kind == "input":
                drawn = next((indices for idx, _, indices in kept if idx == where.batch_idx), None)
                samples = _samples(where, drawn, self.sample_indices)
                detail["origin"].update(samples.detail())
        norms = self.divergences.norms
        explosion = norms.explosion(record.step)
        findings = _findings(record, where, explosion, samples)
        if explosion is not None:
            detail["exploding"] = explosion.detail()
            what = "loss" if record.cause == "loss" else "gradients"
            found = norms.report(explosion, f"the non-finite {what} of step {record.step}")
            findings = ([] if found is None else [found]) + findings
        return SkipOutcome(Event("skip", record.step, detail), tuple(findings), escalate)

    def _report(self, outcome: SkipOutcome) -> None:
        # every process learns of the skip at the same point; each replayed its own batch, so the
        # findings are agreed first and everything after is decided on the agreed ones alone
        findings = agree_findings(self.reporter.accelerator, list(outcome.findings))
        if self._first_batch is not None and outcome.event.step == self._first_batch[0]:
            # the first-batch check already reported the same tensor of the same batch: not a
            # repeat, but the replay knows the samples' dataset indices, which that finding lacks
            first_batch = f" of batch {self._first_batch[1]} "
            known = {(f.code, f.params): f for f in self.reporter.findings if f.code == "nonfinite-input"}
            kept = []
            for finding in findings:
                first = known.get((finding.code, finding.params))
                if first is None or first_batch not in finding.message:
                    kept.append(finding)
                elif "(dataset ind" in finding.message:
                    completed = f"{first.message} Skipped {finding.message}"
                    self.reporter.replace(first, dataclasses.replace(first, message=completed))
            findings = kept
        self.reporter.add_all(findings, first={"exploding-grad": EXPLAINED_BY_EXPLOSION})


def _raise_policy_error(record: SkipRecord, outcome: SkipOutcome) -> NonFiniteError:
    """The error of ``nan_guard="raise"`` at the first non-finite step."""
    params = ", ".join(record.params) or "some parameters"
    what = "loss" if record.cause == "loss" else f"gradients of {params}"
    return NonFiniteError(
        f"step {record.step}: the {what} went non-finite (loss {record.loss}, gradient norm "
        f'{record.grad_norm}) and `nan_guard="raise"`; nothing was updated. '
        + " ".join(f.message for f in outcome.findings),
        findings=outcome.findings,
    )


@dataclass(frozen=True)
class _Samples:
    """The samples of a batch that held a non-finite input, and their dataset indices.

    Attributes:
        rows (`tuple[int, ...]`): their positions in the batch (empty: a 0-d tensor).
        indices (`tuple | None`): the dataset index of each row, when rows and indices match.
        drawn (`tuple | None`): every index the batch was drawn from, when they do not.
        note (`str`): why the indices are not known, or a caveat on them; empty otherwise.
    """

    rows: tuple[int, ...]
    indices: tuple[Any, ...] | None = None
    drawn: tuple[Any, ...] | None = None
    note: str = ""

    def detail(self) -> dict[str, Any]:
        """For the skip event's ``origin``."""
        return {
            "rows": list(self.rows),
            "dataset_indices": None if self.indices is None else list(self.indices),
        }

    def describe(self, where: Localisation) -> str:
        """``sample 3 of batch 29 (dataset index 1234) holds 1 NaN/Inf values in batch[0]``."""
        if not self.rows:
            text = f"{where.where} of batch {where.batch_idx} holds {where.count} NaN/Inf values"
        else:
            one = len(self.rows) == 1
            text = f"{'sample' if one else 'samples'} {_numbers(self.rows)} of batch {where.batch_idx}"
            if self.indices is not None:
                text += f" ({'dataset index' if one else 'dataset indices'} {_numbers(self.indices)}"
                text += f", {self.note})" if self.note else ")"
            text += f" {'holds' if one else 'hold'} {where.count} NaN/Inf values in {where.where}"
        if self.indices is None and self.drawn is not None:
            text += (
                f" (the batch was drawn from dataset indices {_numbers(self.drawn)}, not one per "
                f"row of {where.where}: a `collate_fn` that packs or drops samples)"
            )
        elif self.indices is None and self.note:
            text += f" (no dataset index: {self.note})"
        return text


def _samples(where: Localisation, drawn: tuple[Any, ...] | None, known: SampleIndices | None) -> _Samples:
    """Match the bad rows of ``where`` with the indices the batch was drawn from."""
    if known is None:
        return _Samples(where.rows)
    if known.unknown is not None:
        return _Samples(where.rows, note=known.unknown)
    if drawn is None:
        return _Samples(where.rows, note="they were not kept for this batch")
    if not where.rows or where.samples != len(drawn):
        return _Samples(where.rows, drawn=drawn)
    note = "" if known.ordered else "if the `collate_fn` keeps the samples' order"
    return _Samples(where.rows, tuple(drawn[r] for r in where.rows), note=note)


def _numbers(values: Sequence[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:_MAX_NAMED])
    return shown + (f" and {len(values) - _MAX_NAMED} more" if len(values) > _MAX_NAMED else "")


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:_MAX_NAMED])
    more = f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
    return shown + more


def _findings(
    record: SkipRecord,
    where: Localisation | None,
    explosion: Explosion | None,
    samples: _Samples | None = None,
) -> list[Finding]:
    findings = []
    exploded = clip = ""
    if explosion is not None:
        exploded = (
            f" It follows exploding gradients: the global gradient norm rose {explosion.ratio:.3g}x in "
            f"the steps before (to {explosion.peak:.3g} at step {explosion.peak_step})."
        )
        clip = (
            "The non-finite values follow exploding gradients (see `exploding-grad`): clip gradients "
            "(`clip_grad_norm=1.0`), then lower the learning rate."
        )
    if where is not None and where.kind == "input":
        samples = samples or _Samples(where.rows)
        look = ""
        if samples.indices:
            look = f" Look at `dataset[{samples.indices[0]!r}]` first."
        findings.append(
            Finding(
                code="nonfinite-input",
                severity="error",
                message=f"step {record.step}: {samples.describe(where)}, so the loss was {record.loss}.",
                params=(where.where,),
                step=record.step,
                suggestion=f"Clean the data: drop or impute NaN/Inf in the dataset or its transform.{look}",
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
                    message=(
                        f"step {record.step}: the loss was {record.loss}; the step was skipped.{origin}"
                        f"{exploded}"
                    ),
                    params=params,
                    step=record.step,
                    suggestion=clip
                    or (
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
                    f"{_listed(record.params) or 'unknown parameters'}. The step was skipped.{exploded}"
                ),
                params=record.params,
                step=record.step,
                suggestion=clip
                or (
                    "Check operations with unbounded derivatives at some inputs (sqrt at 0, "
                    "norms of zero vectors, custom backward functions), or clip gradients."
                ),
            )
        )
    return findings
