"""The writer of the run's record: ``metrics.jsonl`` in ``checkpoint_dir``, appended as the run goes.

The main process appends one ``log`` line per log step (the history entry and the per-layer
values the diagnostics measured), the events and findings that are new since the previous
write, each evaluation and each rollback when it happens, and an ``end`` line. Each write is
flushed to the operating system, so a killed run keeps its record up to its last log step; the
file is never rewritten. A resumed ``fit`` appends a ``fit`` line naming its checkpoint: the
reader drops (and shows as abandoned) what the file holds past the resumed step. The line format
is :mod:`safeloop.report.format`; docs/report.md describes it.

Writing costs no host read: every value written is already a Python number where it is written.
A failing write (a full disk) is logged once and turns the writer off; training goes on.

The same values go to the run's trace in memory (``RunRecord.trace``, a bounded
:class:`~safeloop.report.trace.RunTrace`) on every process, with or without a file:
``FitResult.plot`` draws from it what ``safeloop report`` draws from the file.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from safeloop.config import TrainerConfig
from safeloop.findings import Reporter
from safeloop.report.format import RECORD_FILE, dump_line, log_line
from safeloop.results import Event, Finding, FitResult
from safeloop.run_state import Progress, RunRecord

__all__ = ["RecordWriter", "RecordHooks"]

logger = logging.getLogger("safeloop")

_GRAD, _RATIO = "grad_norm/", "update_ratio/"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def event_key(kind: str, step: int, detail: Mapping[str, Any]) -> tuple[str, int, str]:
    """What makes two events the same one (a resumed run holds the events of its checkpoint again)."""
    return kind, int(step), json.dumps(detail, sort_keys=True, default=str)


class RecordWriter:
    """Appends the run's record to ``checkpoint_dir/metrics.jsonl`` (main process only).

    A writer built without a folder (no ``checkpoint_dir``, or another process than the main
    one) writes no file; it still hands the per-layer values and the evaluations to the record's
    trace (``record.trace``), which :attr:`hooks` feeds with the evaluations.

    Args:
        directory (`str | None`): the run's ``checkpoint_dir``, or None (off).
        progress (`Progress`): the step the lines are of.
        record (`RunRecord`): the history, the events and the evaluation loss.
        reporter (`Reporter`): the findings.
        settings (`dict`, *optional*): the plain settings written in each ``fit`` line.
    """

    def __init__(
        self,
        directory: str | None,
        progress: Progress,
        record: RunRecord,
        reporter: Reporter,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = None if directory is None else Path(directory) / RECORD_FILE
        self.progress = progress
        self.record = record
        self.reporter = reporter
        self.settings = dict(settings or {})
        self._active = False  # between a fit's start and its end
        self._events_done = 0
        self._written_findings: dict[tuple[str, tuple[str, ...]], Finding] = {}
        self._layers: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        record.trace.settings = dict(self.settings)  # what the fit line holds, for FitResult.plot
        self.hooks: tuple[RecordHooks, ...] = (RecordHooks(self),)

    @classmethod
    def for_run(
        cls,
        config: TrainerConfig,
        accelerator: Accelerator,
        progress: Progress,
        record: RunRecord,
        reporter: Reporter,
    ) -> RecordWriter:
        """The writer of a run: on with a user-given ``checkpoint_dir``, on the main process only.

        A temporary checkpoint folder (``checkpoint_dir=None`` with rollback on) is removed after
        ``fit``, so a record there would be lost with it: the writer is then off.
        """
        on = config.checkpoint_dir is not None and accelerator.is_main_process
        settings = {
            k: v for k, v in vars(config).items() if v is None or isinstance(v, (int, float, str, bool))
        }
        return cls(config.checkpoint_dir if on else None, progress, record, reporter, settings)

    @property
    def enabled(self) -> bool:
        """Whether this writer writes (a folder was given and no write has failed)."""
        return self.path is not None

    # -- the run's moments ----------------------------------------------------------------

    def start(self, resume_from: object = None) -> None:
        """A ``fit`` starts (after its resume): write the ``fit`` line, and what the file lacks.

        Args:
            resume_from (`object`, *optional*): ``fit``'s argument; the checkpoint actually
                loaded is read from the ``resume`` event it left.
        """
        if self.path is None:
            return
        step = self.progress.global_step
        events = self.record.events
        resumed = None
        if resume_from is not None and events and events[-1].kind == "resume" and events[-1].step == step:
            resumed = events[-1].detail.get("path")
        fresh = resumed is None and step == 0  # the reader sets aside what the file held before
        try:
            seen, had_log, torn = self._scan(fresh)
        except OSError as error:
            self._fail(error)
            return
        # a run killed while writing left its last line cut: end it, the reader skips it
        lines = ["\n"] if torn else []
        fit = {"step": step, "resumed_from": resumed, "time": _now(), "settings": self.settings}
        lines.append(dump_line("fit", fit))
        if resumed is not None and not had_log:
            # a checkpoint from another folder: its history is this run's past, per-layer values aside
            lines += [
                log_line({**entry, "source": "checkpoint"})
                for entry in self.record.history
                if entry["step"] <= step
            ]
        self._layers, self._active, self._events_done = None, True, 0
        self._events(lines, seen)
        self._findings(lines, self.reporter.findings)
        self._emit(lines)

    def log(self, entry: Mapping[str, Any], tracked: Mapping[str, float]) -> None:
        """Append one log step: new events and findings first, then its ``log`` line.

        Args:
            entry (`Mapping[str, Any]`): the history entry of the log step.
            tracked (`Mapping[str, float]`): the diagnostics' tracker values
                (``grad_norm/<name>``, ``update_ratio/<name>``, ``baseline_loss``).
        """
        grads: dict[str, float] = {}
        ratios: dict[str, float] = {}
        extra: dict[str, float] = {}
        for key, value in tracked.items():
            if key.startswith(_GRAD):
                grads[key[len(_GRAD) :]] = value
            elif key.startswith(_RATIO):
                ratios[key[len(_RATIO) :]] = value
            elif key == "baseline_loss":
                extra[key] = value
        record = self.record  # the entry is the history's last (LogStep appends it first)
        rollbacks = int(entry.get("rollbacks", record.rollbacks))
        record.trace.log(len(record.history) - 1, rollbacks, {"grad_norms": grads, "update_ratios": ratios})
        if not self._active:
            return
        lines: list[str] = []
        self._events(lines)
        self._findings(lines, self.reporter.findings)
        names = self._declare(lines, grads, ratios)
        lines.append(
            log_line(
                entry,
                grad_norms=[grads.get(n) for n in names[0]] if names[0] else None,
                update_ratios=[ratios.get(n) for n in names[1]] if names[1] else None,
                extra=extra,
            )
        )
        self._emit(lines)

    def evaluated(self, loss: float) -> None:
        """Append an evaluation's loss at the step it was measured (and keep it in the trace)."""
        step, record = self.progress.global_step, self.record
        record.trace.evaluated(step, loss, len(record.history), record.rollbacks)
        self._append(dump_line("eval", {"step": step, "loss": float(loss)}))

    def rolled_back(self) -> None:
        """Append the rollback's events now, so that a run killed before its next log step shows it."""
        self._append(None)

    def lr_find(self, result: Any) -> None:
        """Append a learning-rate range test's curve and suggestion (an ``LRFinderResult``)."""
        if self.path is None:
            return
        fields = {"step": self.progress.global_step, "time": _now(), **dataclasses.asdict(result)}
        lines = []
        try:
            if not self._active and self.path.exists() and not self._ends_with_newline():
                lines.append("\n")  # a killed run's cut last line
        except OSError as error:
            self._fail(error)
            return
        lines.append(dump_line("lr_find", fields))
        self._emit(lines)

    def finish(self, result: FitResult) -> None:
        """The end of a ``fit`` that returned: the last events, the findings, the ``end`` line."""
        if not self._active:
            return
        lines: list[str] = []
        self._events(lines)
        self._findings(lines, result.findings)
        end = {
            "step": result.global_step,
            "status": result.status,
            "skipped_steps": result.skipped_steps,
            "rollbacks": result.rollbacks,
            "eval_loss": result.eval_loss,
            "baseline_loss": result.baseline_loss,
            "time": _now(),
        }
        lines.append(dump_line("end", end))
        self._emit(lines)
        self._active = False

    def close(self) -> None:
        """``fit``'s ``finally``: a ``fit`` ended by an exception gets its events and its ``end`` line."""
        if not self._active:
            return
        self._active = False
        lines: list[str] = []
        self._events(lines)
        self._findings(lines, self.reporter.findings)
        error = sys.exc_info()[1]  # the exception on its way out of fit, if any
        text = None
        if error is not None:
            first = str(error).strip().splitlines()
            text = type(error).__name__ + (f": {first[0]}" if first else "")
        lines.append(
            dump_line(
                "end", {"step": self.progress.global_step, "status": "error", "error": text, "time": _now()}
            )
        )
        self._emit(lines)

    # -- helpers ----------------------------------------------------------------------------

    def _append(self, line: str | None) -> None:
        if not self._active:
            return
        lines: list[str] = []
        self._events(lines)
        self._findings(lines, self.reporter.findings)
        if line is not None:
            lines.append(line)
        self._emit(lines)

    def _emit(self, lines: list[str]) -> None:
        """Append the lines in one write, flushed to the OS at close (a killed process loses none)."""
        if not lines or self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as file:
                file.write("".join(lines))
        except OSError as error:
            self._fail(error)

    def _events(self, lines: list[str], seen: set[tuple[str, int, str]] | None = None) -> None:
        events = self.record.events
        for event in events[self._events_done :]:
            data = event.to_dict()
            if seen and event_key(event.kind, event.step, data["detail"]) in seen:
                continue  # already in the file: a resumed run's checkpoint holds its past events
            lines.append(dump_line("event", data))
        self._events_done = len(events)

    def _findings(self, lines: list[str], findings: list[Finding]) -> None:
        for finding in findings:
            key = (finding.code, finding.params)
            if self._written_findings.get(key) != finding:  # new, or its count or text changed
                lines.append(dump_line("finding", finding.to_dict()))
                self._written_findings[key] = finding

    def _declare(
        self, lines: list[str], grads: Mapping[str, float], ratios: Mapping[str, float]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The layer names the lists follow; a ``layers`` line when a name is new."""
        known = self._layers or ((), ())
        if self._layers is None or not (grads.keys() <= set(known[0]) and ratios.keys() <= set(known[1])):
            # the union, in the order first seen: a weight whose ratio is not measured at one log
            # step (a zero weight) keeps its row, with null there
            known = (
                (*known[0], *(n for n in grads if n not in known[0])),
                (*known[1], *(n for n in ratios if n not in known[1])),
            )
            self._layers = known
            lines.append(dump_line("layers", {"grad_norms": list(known[0]), "update_ratios": list(known[1])}))
        return known

    def _scan(self, fresh: bool) -> tuple[set[tuple[str, int, str]], bool, bool]:
        """The event keys and whether log lines are in the file since its last fresh start; torn end."""
        assert self.path is not None  # invariant: only called when on
        seen: set[tuple[str, int, str]] = set()
        had_log = False
        if not self.path.exists() or self.path.stat().st_size == 0:
            return seen, had_log, False
        with open(self.path, "rb") as file:
            for raw in file:
                head = raw[:32]
                if b'"type":"fit"' in head:
                    fit = _loads(raw)
                    if fit is not None and fit.get("resumed_from") is None and fit.get("step") == 0:
                        seen.clear()  # an earlier run in the same folder: none of it is this run's
                        had_log = False
                elif b'"type":"event"' in head:
                    event = _loads(raw)
                    if event is not None:
                        seen.add(event_key(event["kind"], event["step"], event.get("detail", {})))
                elif b'"type":"log"' in head:
                    had_log = True
        torn = not self._ends_with_newline()
        return (set() if fresh else seen), (False if fresh else had_log), torn

    def _ends_with_newline(self) -> bool:
        assert self.path is not None  # invariant: only called when on
        if self.path.stat().st_size == 0:
            return True
        with open(self.path, "rb") as file:
            file.seek(-1, 2)
            return file.read(1) == b"\n"

    def _fail(self, error: OSError) -> None:
        logger.warning(
            "safeloop: could not write the run record %s (%s); training goes on without it", self.path, error
        )
        self.path, self._active = None, False  # the hooks stay: the trace goes on


def _loads(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None  # a cut line: the reader reports it
    return value if isinstance(value, dict) else None


class RecordHooks:
    """The writer's place among the callbacks: evaluations and rollbacks are noted when they happen.

    It has these two hooks only: the callback list skips a hook an object lacks, so a run pays
    nothing per micro-batch for it. The trainer passed as each hook's first argument is not used:
    the writer reads the run's state objects.

    Args:
        writer (`RecordWriter`): where the lines go.
    """

    def __init__(self, writer: RecordWriter) -> None:
        self.writer = writer

    def on_validation_end(self, trainer: object, eval_loss: float) -> None:
        """An evaluation: its loss at its step, in the file and in the trace."""
        self.writer.evaluated(eval_loss)

    def on_rollback(self, trainer: object, event: Event) -> None:
        """A rollback: its events now."""
        self.writer.rolled_back()
