"""Where findings go: deduplicated into the run's list, the log, the trackers, a JSON file, a report.

A finding is kept once per code and place (its parameters): a repeat raises its ``count`` and
keeps the first step. The main process logs each new finding (Python ``logging``, logger
``safeloop``) and logs ``findings/<code>`` to the trackers; ``fit`` ends with :func:`report`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator

from safeloop.distributed import gather_json
from safeloop.results import Finding, FitResult

if TYPE_CHECKING:
    from safeloop.trainer import SafeTrainer

__all__ = ["agree_findings", "add_finding", "write_findings", "report", "finish_report", "FINDINGS_FILE"]

logger = logging.getLogger("safeloop")

FINDINGS_FILE = "findings.json"
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_ORDER = {"error": 0, "warning": 1, "info": 2}


def agree_findings(accelerator: Accelerator, findings: Sequence[Finding]) -> list[Finding]:
    """The union of every process's findings, in rank order (a collective: all processes call it).

    Findings measured on each process's own batch (the first batch, a skipped step's replay)
    differ between processes; after this every process holds, and acts on, the same ones.
    """
    if accelerator.num_processes == 1:
        return list(findings)
    merged: list[Finding] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for rank_findings in gather_json(accelerator, [f.to_dict() for f in findings]):
        for data in rank_findings:
            finding = Finding(**{**data, "params": tuple(data["params"])})
            if (finding.code, finding.params) not in seen:
                seen.add((finding.code, finding.params))
                merged.append(finding)
    return merged


def add_finding(trainer: SafeTrainer, finding: Finding) -> None:
    """Add ``finding`` to the run, or count a repeat of one already there."""
    for index, known in enumerate(trainer._findings):
        if known.code == finding.code and known.params == finding.params:
            trainer._findings[index] = dataclasses.replace(known, count=known.count + finding.count)
            return
    trainer._findings.append(finding)
    if trainer.accelerator.is_main_process:
        where = f" (step {finding.step})" if finding.step is not None else ""
        logger.log(_LEVELS[finding.severity], "safeloop [%s]%s %s", finding.code, where, finding.message)
        if trainer.accelerator.trackers:
            trainer.accelerator.log({f"findings/{finding.code}": 1}, step=trainer.global_step)
    trainer._callbacks.call("on_finding", trainer, finding)


def write_findings(folder: str | os.PathLike[str], findings: Sequence[Finding]) -> Path:
    """Write ``findings.json`` (a JSON list of findings) into ``folder``, atomically."""
    path = Path(folder) / FINDINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FINDINGS_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps([f.to_dict() for f in findings], indent=1))
    os.replace(tmp, path)
    return path


def report(findings: Sequence[Finding], *, steps: int, skipped: int, rollbacks: int) -> str:
    """A short readable summary of a run: counts, then one line per finding, errors first.

    Example:
        >>> print(report([], steps=100, skipped=0, rollbacks=0))
        safeloop: 100 steps, 0 skipped, 0 rollbacks; no findings.
    """
    head = f"safeloop: {steps} steps, {skipped} skipped, {rollbacks} rollbacks"
    if not findings:
        return head + "; no findings."
    counts = {s: sum(1 for f in findings if f.severity == s) for s in ("error", "warning", "info")}
    summary = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n)
    lines = [f"{head}; {summary}:"]
    for finding in sorted(findings, key=lambda f: _ORDER[f.severity]):
        seen = f" x{finding.count}" if finding.count > 1 else ""
        first_line = finding.message.splitlines()[0] if finding.message else ""
        lines.append(f"  [{finding.severity}] {finding.code}{seen}: {first_line}")
        if finding.suggestion and finding.severity != "info":
            lines.append(f"      fix: {finding.suggestion}")
    return "\n".join(lines)


def finish_report(trainer: SafeTrainer, result: FitResult) -> None:
    """End of ``fit`` (main process): log the report; write ``findings.json`` to ``checkpoint_dir``."""
    if not trainer.accelerator.is_main_process:
        return
    if trainer.config.checkpoint_dir is not None:
        write_findings(trainer.config.checkpoint_dir, result.findings)
    serious = any(f.severity != "info" for f in result.findings)
    logger.log(logging.WARNING if serious else logging.INFO, "%s", result.report())
