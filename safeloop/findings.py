"""The one owner of a run's findings and events: add, deduplicate, agree, log, tell callbacks.

A finding is kept once per code and place (its parameters): a repeat raises its ``count`` and
keeps the first step. The main process logs each new finding (Python ``logging``, logger
``safeloop``) and logs ``findings/<code>`` to the trackers. Events go to the run's record
(``RunRecord.events``), and to the callback hook that announces them. Components hold a
:class:`Reporter`, never the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

from accelerate import Accelerator

from safeloop.distributed import gather_json
from safeloop.hooks import CallbackList
from safeloop.results import Event, Finding, FitResult
from safeloop.run_state import Progress, RunRecord

__all__ = ["Reporter", "agree_findings", "write_findings", "FINDINGS_FILE"]

logger = logging.getLogger("safeloop")

FINDINGS_FILE = "findings.json"
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


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


def write_findings(folder: str | os.PathLike[str], findings: Sequence[Finding]) -> Path:
    """Write ``findings.json`` (a JSON list of findings) into ``folder``, atomically."""
    path = Path(folder) / FINDINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FINDINGS_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps([f.to_dict() for f in findings], indent=1))
    os.replace(tmp, path)
    return path


class Reporter:
    """Collects the findings of a run and announces its findings and events.

    Args:
        accelerator (`Accelerator`): who logs (the main process) and agrees (all processes).
        progress (`Progress`): the step that tracker values are logged at.
        record (`RunRecord`): where events go.
        callbacks (`CallbackList`): told of each new finding and of announced events.

    Attributes:
        findings (`list[Finding]`): the run's findings, deduplicated, in the order first seen.
    """

    def __init__(
        self, accelerator: Accelerator, progress: Progress, record: RunRecord, callbacks: CallbackList
    ) -> None:
        self.accelerator = accelerator
        self.progress = progress
        self.record = record
        self.callbacks = callbacks
        self.findings: list[Finding] = []

    def add(self, finding: Finding, *, before: Collection[str] = ()) -> None:
        """Add ``finding`` to the run, or count a repeat of one already there.

        Args:
            finding (`Finding`): the finding.
            before (`Collection[str]`, *optional*): codes of findings that ``finding`` explains: a
                new finding goes in front of the first of them already listed (findings otherwise
                keep the order first seen), so that ``FitResult.findings`` and ``report()``, which
                sorts by severity only, name the cause first. A repeat stays where it is.
        """
        for index, known in enumerate(self.findings):
            if known.code == finding.code and known.params == finding.params:
                self.findings[index] = dataclasses.replace(known, count=known.count + finding.count)
                return
        at = next((i for i, known in enumerate(self.findings) if known.code in before), len(self.findings))
        self.findings.insert(at, finding)
        if self.accelerator.is_main_process:
            where = f" (step {finding.step})" if finding.step is not None else ""
            logger.log(_LEVELS[finding.severity], "safeloop [%s]%s %s", finding.code, where, finding.message)
            if self.accelerator.trackers:
                self.accelerator.log({f"findings/{finding.code}": 1}, step=self.progress.global_step)
        self.callbacks.call("on_finding", finding)

    def keep(self, finding: Finding) -> None:
        """Keep ``finding`` without announcing it (a note made while the trainer is built)."""
        self.findings.append(finding)

    def add_all(
        self,
        findings: Iterable[Finding],
        *,
        agree: bool = False,
        first: dict[str, Collection[str]] | None = None,
    ) -> None:
        """Add several findings; with ``agree``, first take their union over processes (a collective).

        ``first`` maps a code to the codes its findings go in front of (see :meth:`add`).
        """
        if agree:
            findings = agree_findings(self.accelerator, list(findings))
        for finding in findings:
            self.add(finding, before=(first or {}).get(finding.code, ()))

    def replace(self, old: Finding, new: Finding) -> None:
        """Put ``new`` in the place of ``old`` (same code, parameters and step), keeping its count.

        For a finding completed later (a measurement that came after it); the log and the
        ``on_finding`` callbacks saw the first version. Nothing happens when ``old`` is not listed.
        """
        for index, known in enumerate(self.findings):
            if (known.code, known.params, known.step) == (old.code, old.params, old.step):
                self.findings[index] = dataclasses.replace(new, count=known.count)
                return

    def of_code(self, code: str) -> list[Finding]:
        """The findings with ``code``, in order."""
        return [finding for finding in self.findings if finding.code == code]

    def event(self, event: Event, hook: str | None = None) -> None:
        """Record ``event`` in the run's record and, when given, fire callback ``hook`` with it."""
        self.record.events.append(event)
        if hook is not None:
            self.callbacks.call(hook, event)

    def finish(self, result: FitResult, checkpoint_dir: str | None) -> None:
        """End of ``fit`` (main process): the report logged at INFO, ``findings.json`` written.

        The report reaches the terminal in the trainer's summary (``summary=True``); each finding
        was logged at its own severity when found.
        """
        if not self.accelerator.is_main_process:
            return
        if checkpoint_dir is not None:
            write_findings(checkpoint_dir, result.findings)
        logger.info("%s", result.report())
