"""What a run reports: events, findings and the result of ``fit``.

All three are frozen dataclasses whose fields are plain Python values, so a run can be written
to JSON as it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Event", "Finding", "FitResult", "report", "severity_counts"]

Severity = Literal["info", "warning", "error"]
Status = Literal["completed", "preempted", "interrupted", "diverged"]
_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Event:
    """Something the trainer did to the run (skip, rollback, reinit, checkpoint, resume, ...).

    Attributes:
        kind (`str`): one of ``"skip"``, ``"rollback"``, ``"reinit"``, ``"checkpoint"``,
            ``"resume"``, ``"lr_scale"``; more may be added.
        step (`int`): the global step the event concerns.
        detail (`dict`): JSON-able details (``"path"`` for checkpoint, resume and rollback).
    """

    kind: str
    step: int
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a JSON-able dict."""
        return asdict(self)


@dataclass(frozen=True)
class Finding:
    """A measured, located cause of a loss that does not go down.

    Attributes:
        code (`str`): stable code listed in ``docs/diagnostics.md``.
        severity (`str`): ``"info"``, ``"warning"`` or ``"error"``.
        message (`str`): what was measured, where, and the number seen.
        params (`tuple[str, ...]`): names of the parameters or modules involved.
        step (`int | None`): the global step where it was first seen, if any.
        suggestion (`str`): what to change in the user's code.
        count (`int`): how many times it was seen (repeats are counted, not listed).
    """

    code: str
    severity: Severity
    message: str
    params: tuple[str, ...] = ()
    step: int | None = None
    suggestion: str = ""
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Return the finding as a JSON-able dict."""
        data = asdict(self)
        data["params"] = list(self.params)
        return data


@dataclass(frozen=True)
class FitResult:
    """What ``SafeTrainer.fit`` returns.

    Attributes:
        global_step (`int`): optimizer steps taken, skipped ones included.
        skipped_steps (`int`): steps skipped by the NaN/Inf guard.
        rollbacks (`int`): rollbacks performed.
        history (`list[dict]`): one entry every ``log_every`` steps with at least ``step``,
            ``loss``, ``lr`` and ``grad_norm``.
        events (`list[Event]`): what the trainer did, in order.
        findings (`list[Finding]`): diagnoses, deduplicated.
        eval_loss (`float | None`): the last evaluation loss, or None without evaluation.
        baseline_loss (`float | None`): the loss of the best constant prediction on the first
            batches' targets (the class frequencies, the target mean), or None where it cannot be
            computed (a ``training_step``, a loss not recognised, diagnostics off).
        status (`str`): how the run ended: ``"completed"`` (``max_steps`` or ``max_epochs``
            reached, or the data ran out), ``"preempted"`` (SIGTERM or SIGUSR1: stopped after a
            step, with a checkpoint), ``"interrupted"`` (SIGINT, Ctrl-C: the same, then ``fit``
            raises ``KeyboardInterrupt``; callbacks' ``on_fit_end`` still gets the result), or
            ``"diverged"`` (reserved: a divergence past the rollbacks raises ``DivergenceError``).
    """

    global_step: int
    skipped_steps: int = 0
    rollbacks: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    eval_loss: float | None = None
    baseline_loss: float | None = None
    status: Status = "completed"

    def report(self) -> str:
        """A short readable summary: steps, skips, rollbacks, then each finding with its fix."""
        return report(
            self.findings,
            steps=self.global_step,
            skipped=self.skipped_steps,
            rollbacks=self.rollbacks,
            baseline=self.baseline_loss,
            status=self.status,
        )

    def plot(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        clip_grad_norm: float | None = None,
        lr_finder: Any = None,
    ) -> Any:
        """Draw the run from memory: loss, learning rate, gradient norm, what the run did, findings.

        The panels of ``safeloop report`` stacked in one figure (docs/report.md): the loss raw
        and smoothed with the baseline loss, every skip, rollback (its abandoned branch faded),
        re-initialisation and preemption marked on the step axis; the learning rate with the
        rollbacks' cuts; the global gradient norm; the findings, most severe first. A
        ``FitResult`` keeps no per-layer values and only the last evaluation loss: the heat maps
        and the evaluation curve come from the run's record, ``safeloop report CHECKPOINT_DIR``.
        Needs matplotlib: ``pip install "safeloop[report]"``.

        Args:
            path (`str`, *optional*): write the figure there (PNG, SVG, PDF by the suffix).
            clip_grad_norm (`float`, *optional*): the run's threshold, drawn on the gradient norm.
            lr_finder (`LRFinderResult`, *optional*): a range test to draw below.

        Returns:
            `matplotlib.figure.Figure`: the figure (not registered with pyplot).

        Raises:
            ImportError: matplotlib is not installed (naming the extra that installs it).
        """
        from safeloop.report.optional import require_matplotlib

        require_matplotlib("FitResult.plot")
        from safeloop.report.data import assemble, records_from_memory
        from safeloop.report.panels import overview

        lines = records_from_memory(
            history=self.history,
            events=[event.to_dict() for event in self.events],
            findings=[finding.to_dict() for finding in self.findings],
            global_step=self.global_step,
            status=self.status,
            eval_loss=self.eval_loss,
            baseline_loss=self.baseline_loss,
            settings={"clip_grad_norm": clip_grad_norm},
            lr_find=None if lr_finder is None else asdict(lr_finder),
        )
        note = (
            "drawn from a FitResult, which keeps no per-layer values and only the last evaluation "
            "loss: `safeloop report CHECKPOINT_DIR` draws those from the run's record"
        )
        figure = overview(assemble(lines, source="FitResult", notes=[note]))
        if path is not None:
            figure.savefig(os.fspath(path), dpi=100)
        return figure


def severity_counts(findings: Sequence[Finding]) -> str:
    """``"1 error, 2 warnings"``: the findings by severity, or ``"no findings"``."""
    counts = {s: sum(1 for f in findings if f.severity == s) for s in ("error", "warning", "info")}
    return ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n) or "no findings"


def report(
    findings: Sequence[Finding],
    *,
    steps: int,
    skipped: int,
    rollbacks: int,
    baseline: float | None = None,
    status: str | None = None,
) -> str:
    """A short readable summary of a run: how it ended, counts, then one line per finding, errors first.

    ``baseline``, when given, is quoted as the loss a constant prediction reaches; ``status``,
    when given, opens the summary (``completed``, ``preempted``, ``interrupted``).

    Example:
        >>> print(report([], steps=100, skipped=0, rollbacks=0))
        safeloop: 100 steps, 0 skipped, 0 rollbacks; no findings.
    """
    head = (
        f"safeloop: {status + ', ' if status else ''}{steps} steps, {skipped} skipped, {rollbacks} rollbacks"
    )
    if baseline is not None:
        head += f", baseline loss {baseline:.4g} (a constant prediction)"
    if not findings:
        return head + "; no findings."
    lines = [f"{head}; {severity_counts(findings)}:"]
    for finding in sorted(findings, key=lambda f: _ORDER[f.severity]):
        seen = f" x{finding.count}" if finding.count > 1 else ""
        first_line = finding.message.splitlines()[0] if finding.message else ""
        lines.append(f"  [{finding.severity}] {finding.code}{seen}: {first_line}")
        if finding.suggestion and finding.severity != "info":
            lines.append(f"      fix: {finding.suggestion}")
    return "\n".join(lines)
