"""What a run reports: events, findings and the result of ``fit``.

All three are frozen dataclasses whose fields are plain Python values, so a run can be written
to JSON as it is; ``FitResult.trace`` aside (the bounded per-layer picture ``FitResult.plot``
draws, compared by nothing and left out of the ``repr``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from safeloop.report.trace import RunTrace

__all__ = ["Event", "Finding", "FitResult", "NoiseScaleEstimate", "report", "severity_counts"]

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
class NoiseScaleEstimate:
    """The measured gradient noise scale of a run (docs/diagnostics.md, ``batch-size``).

    Attributes:
        value (`float`): ``B_simple`` in samples, at the end of the run (the moving averages).
        samples (`int`): samples behind it (the measured steps' batches, all processes).
        steps (`int`): optimizer steps measured.
        batch_size (`int`): the run's batch per optimizer step (all micro-batches and processes).
        first (`float | None`): the first reported value (after 20 measured steps); the noise
            scale grows as the loss falls, so it is usually the smaller one.
        first_step (`int | None`): the step of ``first``.
    """

    value: float
    samples: int
    steps: int
    batch_size: int
    first: float | None = None
    first_step: int | None = None


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
        gradient_noise_scale (`NoiseScaleEstimate | None`): the measured gradient noise scale
            at the end of the run (``.value`` in samples, ``.samples`` and ``.steps`` behind it,
            ``.first`` at its first report), or None where it was not measured.
        trace (`RunTrace | None`): what :meth:`plot` draws beyond the history: the per-layer
            gradient norms and update ratios (downsampled past 1,000 log steps, extremes kept)
            and each evaluation with its step, and the trainer's settings; bounded in size. None
            in a ``FitResult`` built by hand. Not compared, not in the ``repr``.
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
    gradient_noise_scale: NoiseScaleEstimate | None = None
    trace: RunTrace | None = field(default=None, repr=False, compare=False)

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
        """Draw the run from memory: the panels of ``safeloop report``, stacked in one figure.

        The loss raw and smoothed with the baseline loss and the evaluation losses, every skip,
        rollback (its abandoned branch faded), re-initialisation and preemption marked on the
        step axis; the learning rate with the rollbacks' cuts; the global gradient norm against
        the clip threshold; the per-layer gradient norms and update-to-weight ratios as heat maps
        (one row per measured layer, log colour scale; also those of each abandoned branch);
        the range test; the findings, most severe first (docs/report.md). The same reader and
        panels as the command, fed from :attr:`trace` instead of ``metrics.jsonl``: it works
        without a ``checkpoint_dir``. Needs matplotlib: ``pip install "safeloop[report]"``.

        Args:
            path (`str`, *optional*): write the figure there (PNG, SVG, PDF by the suffix).
            clip_grad_norm (`float`, *optional*): the threshold drawn on the gradient norm;
                defaults to the run's own ``clip_grad_norm``.
            lr_finder (`LRFinderResult`, *optional*): a range test to draw below.

        Returns:
            `matplotlib.figure.Figure`: the figure (not registered with pyplot).

        Raises:
            ImportError: matplotlib is not installed (naming the extra that installs it).

        Example:
            >>> result = trainer.fit()  # doctest: +SKIP
            >>> result.plot("run.png")  # doctest: +SKIP
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
            trace=self.trace,
        )
        notes = []
        if self.trace is None:
            notes.append(
                "drawn from a FitResult without its trace (built by hand?): no per-layer values, and "
                "the last evaluation loss only"
            )
        figure = overview(assemble(lines, source="FitResult", notes=notes))
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
