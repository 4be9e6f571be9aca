"""The end-of-fit summary: what a user reads when ``fit`` returns, without configuring logging.

``FitResult.report()`` lists the findings; the summary puts around them how the run ended, how
long it took, where the loss went (and the eval and baseline losses), and where the checkpoints
and ``findings.json`` are. The trainer prints it on the main process (``summary=True``, the
default), through tqdm so that a bar still on the terminal is not broken.
"""

from __future__ import annotations

import math
from pathlib import Path

from safeloop.results import FitResult, report, severity_counts

__all__ = ["fit_summary"]

_ENDED = {
    "completed": "finished",
    "preempted": "stopped by a preemption signal",
    "interrupted": "interrupted (Ctrl-C)",
    "diverged": "diverged",
}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fit_summary(
    result: FitResult, *, seconds: float, steps_run: int, checkpoint_dir: str | None, latest: str | None
) -> str:
    """The summary of one ``fit``.

    Args:
        result (`FitResult`): what ``fit`` returns.
        seconds (`float`): the wall time of this ``fit``.
        steps_run (`int`): optimizer steps this ``fit`` took (a resumed run started later).
        checkpoint_dir (`str`, *optional*): where the run's checkpoints and ``findings.json`` are.
        latest (`str`, *optional*): the newest checkpoint written, if any.

    Returns:
        `str`: a few lines, the first saying how the run ended.
    """
    rate = f", {steps_run / seconds:.3g} steps/s" if seconds > 0 and steps_run else ""
    head = (
        f"safeloop: {_ENDED.get(result.status, result.status)} at step {result.global_step} "
        f"({steps_run} steps in {_duration(seconds)}{rate})"
    )
    losses = [
        h["loss"] for h in result.history if isinstance(h.get("loss"), float) and math.isfinite(h["loss"])
    ]
    lines = [head]
    if losses:
        first, last = result.history[0].get("step"), result.history[-1].get("step")
        loss = f"  train loss {losses[0]:.4g} (step {first}) -> {losses[-1]:.4g} (step {last})"
        if result.eval_loss is not None:
            loss += f", eval loss {result.eval_loss:.4g}"
        if result.baseline_loss is not None:
            loss += f"; a constant prediction scores {result.baseline_loss:.4g}"
        lines.append(loss)
    counts = severity_counts(result.findings)
    lines.append(f"  {result.skipped_steps} skipped steps, {result.rollbacks} rollbacks; {counts}")
    serious = [f for f in result.findings if f.severity != "info"]
    lines += report(serious, steps=0, skipped=0, rollbacks=0).splitlines()[1:]  # their lines only
    if checkpoint_dir is not None:
        where = f"  checkpoints in {checkpoint_dir}"
        if latest is not None:
            where += f" (latest {Path(latest).name})"
        lines.append(where + f"; findings in {Path(checkpoint_dir) / 'findings.json'}")
    if result.status in ("preempted", "interrupted"):
        lines.append(
            '  to go on: the same script with `fit(resume_from="latest")`'
            if checkpoint_dir is not None
            else "  nothing was saved (no checkpoint_dir): a new fit starts from the beginning"
        )
    return "\n".join(lines)
