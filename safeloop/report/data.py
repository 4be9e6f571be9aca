"""One view of a run, from its record's lines or from a ``FitResult``: what is live, what was abandoned.

A run's record holds every log step ever written, including those a rollback or a resume later
undid. :func:`assemble` replays the lines in order: a ``rollback`` event at step ``t`` (or a
``fit`` line resuming at ``t``) moves every log step, event and evaluation past ``t`` into an
abandoned branch, and a fresh ``fit`` (step 0, no checkpoint) sets aside an earlier run written
to the same folder. The figures draw the live run, and each branch faded.

Pure Python on plain dicts: no NumPy, no matplotlib, nothing of safeloop imported (the
``FitResult.plot`` path imports this module from ``safeloop.results``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunData", "Branch", "LayerTable", "assemble", "records_from_memory", "SEVERITY_ORDER"]

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass
class LayerTable:
    """Per-layer values of the live log steps, as written (aligned to the names declared then).

    Attributes:
        names (`list[str]`): every layer name seen, in the order first declared (one row each).
        steps (`list[int]`): the step of each written row.
        rows (`list[list | str]`): each row's values (None where not measured), in its mapping's
            order; or, read from a file, the JSON list's text without brackets (``"0.5,null,2"``),
            turned into numbers all at once when drawn.
        mapping (`list[int]`): for each row, the index in :attr:`mappings` its values follow.
        mappings (`list[list[int]]`): positions in :attr:`names` of each declared name list.
    """

    names: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    rows: list[Any] = field(default_factory=list)
    mapping: list[int] = field(default_factory=list)
    mappings: list[list[int]] = field(default_factory=list)

    def declare(self, names: Sequence[str]) -> None:
        """The names the following rows follow."""
        index = {name: i for i, name in enumerate(self.names)}
        for name in names:
            if name not in index:
                index[name] = len(self.names)
                self.names.append(name)
        self.mappings.append([index[name] for name in names])

    def add(self, step: int, values: list[Any] | str) -> None:
        """One row at ``step`` (after a :meth:`declare`)."""
        self.steps.append(step)
        self.rows.append(values)
        self.mapping.append(len(self.mappings) - 1)

    def cut(self, after: int) -> LayerTable:
        """Take out the rows past step ``after`` (an abandoned branch) and return them.

        The returned table shares this one's names and mappings (both only grow).
        """
        gone = LayerTable(self.names, mappings=self.mappings)
        if not self.steps or max(self.steps) <= after:
            return gone
        keep = []
        for i, step in enumerate(self.steps):
            if step <= after:
                keep.append(i)
            else:
                gone.steps.append(step)
                gone.rows.append(self.rows[i])
                gone.mapping.append(self.mapping[i])
        self.steps = [self.steps[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]
        self.mapping = [self.mapping[i] for i in keep]
        return gone

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class Branch:
    """Log steps a rollback or a resume abandoned.

    Attributes:
        kind (`str`): ``"rollback"`` or ``"resume"``.
        at (`int`): the step the run went back to.
        detected_at (`int | None`): the step where the divergence was read (rollbacks).
        number (`int`): the rollback's number in the run (1, 2, ...), 0 for a resume.
        reason (`str`): the divergence (``"loss-spike"``, ``"nonfinite"``) or ``"resume"``.
        entries (`list[dict]`): the abandoned log lines, in order.
        grad_norms (`LayerTable`): their per-layer gradient norms.
        update_ratios (`LayerTable`): their per-layer update ratios.
    """

    kind: str
    at: int
    detected_at: int | None
    number: int
    reason: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    grad_norms: LayerTable = field(default_factory=LayerTable)
    update_ratios: LayerTable = field(default_factory=LayerTable)

    @property
    def title(self) -> str:
        """How the report names it."""
        if self.kind == "rollback":
            return f"branch abandoned by rollback {self.number} ({self.reason}, back to step {self.at})"
        return f"branch overwritten by the resume at step {self.at}"


@dataclass
class RunData:
    """Everything the report draws.

    Attributes:
        source (`str`): where it was read from (a file, or ``"memory"``).
        history (`list[dict]`): the live log lines, in step order.
        branches (`list[Branch]`): the abandoned ones.
        events (`list[dict]`): live events (``kind``, ``step``, ``detail``), in order.
        abandoned_events (`list[dict]`): events of abandoned branches.
        evals (`list[tuple[int, float]]`): live evaluations (step, loss).
        findings (`list[dict]`): the findings, most severe first.
        grad_norms (`LayerTable`): per-layer gradient norms (mean over each log interval).
        update_ratios (`LayerTable`): per-layer ``||dw|| / ||w||`` of each log step.
        baseline_loss (`float | None`): the constant-prediction loss, when known.
        settings (`dict`): the trainer's plain settings, from the last ``fit`` line.
        lr_find (`dict | None`): the last learning-rate range test of this run.
        status (`str | None`): how the last ``fit`` ended, None when no ``end`` line follows it.
        end (`dict | None`): that ``end`` line.
        notes (`list[str]`): what the reader set aside or could not read, for the reader of the report.
    """

    source: str
    history: list[dict[str, Any]] = field(default_factory=list)
    branches: list[Branch] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    abandoned_events: list[dict[str, Any]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    grad_norms: LayerTable = field(default_factory=LayerTable)
    update_ratios: LayerTable = field(default_factory=LayerTable)
    baseline_loss: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    lr_find: dict[str, Any] | None = None
    status: str | None = None
    end: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def events_of(self, *kinds: str) -> list[dict[str, Any]]:
        """The live events of these kinds, in order."""
        return [event for event in self.events if event["kind"] in kinds]

    @property
    def last_step(self) -> int:
        """The last live step known (a log line, an event or the end)."""
        steps = [0]
        if self.history:
            steps.append(self.history[-1]["step"])
        if self.events:
            steps.append(max(event["step"] for event in self.events))
        if self.end is not None:
            steps.append(int(self.end.get("step", 0)))
        return max(steps)


class _Assembler:
    """Replays record lines into a :class:`RunData`."""

    def __init__(self, source: str) -> None:
        self.data = RunData(source)
        self.earlier_lines = 0
        self.lr_find_after_log: dict[str, Any] | None = None

    def cut(self, after: int, branch: Branch) -> None:
        data = self.data
        keep = [entry for entry in data.history if entry["step"] <= after]
        branch.entries = [entry for entry in data.history if entry["step"] > after]
        data.history = keep
        if branch.entries:
            data.branches.append(branch)
        gone = [event for event in data.events if event["step"] > after]
        if gone:
            data.abandoned_events.extend(gone)
            data.events = [event for event in data.events if event["step"] <= after]
        data.evals = [(step, loss) for step, loss in data.evals if step <= after]
        branch.grad_norms = data.grad_norms.cut(after)
        branch.update_ratios = data.update_ratios.cut(after)

    def fresh(self) -> None:
        """A new run from step 0 in the same file: set the earlier one aside."""
        data = self.data
        self.earlier_lines += len(data.history) + sum(len(b.entries) for b in data.branches)
        kept_lr_find = self.lr_find_after_log
        self.data = RunData(data.source, notes=data.notes, lr_find=kept_lr_find)

    def line(self, item: Mapping[str, Any]) -> None:
        data, kind = self.data, item.get("type")
        if kind == "log":
            entry = dict(item)  # the line itself, less its per-layer lists, is the history entry
            step = int(entry["step"])
            if "grad_norms" in entry:
                data.grad_norms.add(step, entry.pop("grad_norms"))
            if "update_ratios" in entry:
                data.update_ratios.add(step, entry.pop("update_ratios"))
            data.history.append(entry)
            self.lr_find_after_log = None
            if item.get("baseline_loss") is not None:
                data.baseline_loss = float(item["baseline_loss"])
        elif kind == "layers":
            data.grad_norms.declare(item.get("grad_norms", []))
            data.update_ratios.declare(item.get("update_ratios", []))
        elif kind == "event":
            event = {"kind": item["kind"], "step": int(item["step"]), "detail": item.get("detail") or {}}
            if any(_same(event, known) for known in data.events[-64:]):
                return  # written again by a resumed run (its checkpoint holds it)
            data.events.append(event)
            if event["kind"] == "rollback":
                detail = event["detail"]
                branch = Branch(
                    "rollback",
                    event["step"],
                    detail.get("detected_at"),
                    int(detail.get("rollback", len(data.branches) + 1)),
                    str(detail.get("reason", "divergence")),
                )
                self.cut(event["step"], branch)
        elif kind == "eval":
            data.evals.append((int(item["step"]), float(item["loss"])))
        elif kind == "finding":
            finding = {k: v for k, v in item.items() if k not in ("v", "type")}
            key = (finding.get("code"), tuple(finding.get("params") or ()))
            data.findings = [f for f in data.findings if (f.get("code"), tuple(f.get("params") or ())) != key]
            data.findings.append(finding)
        elif kind == "fit":
            self.fit(item)
        elif kind == "lr_find":
            found = {k: v for k, v in item.items() if k not in ("v", "type")}
            data.lr_find = self.lr_find_after_log = found
        elif kind == "end":
            data.end = {k: v for k, v in item.items() if k not in ("v", "type")}
            data.status = str(data.end.get("status"))
            if data.end.get("baseline_loss") is not None:
                data.baseline_loss = float(data.end["baseline_loss"])

    def fit(self, item: Mapping[str, Any]) -> None:
        step, resumed = int(item.get("step", 0)), item.get("resumed_from")
        if resumed is None and step == 0:
            self.fresh()
        else:
            self.cut(step, Branch("resume", step, None, 0, "resume"))
        data = self.data
        data.settings = dict(item.get("settings") or {})
        data.status, data.end = None, None
        # each fit declares its layer names again; rows written before keep their own mapping


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["kind"] == b["kind"] and a["step"] == b["step"] and a["detail"] == b["detail"]


def assemble(records: Iterable[Mapping[str, Any]], *, source: str, notes: Sequence[str] = ()) -> RunData:
    """Replay record lines (as dicts) into the live run and its abandoned branches.

    Args:
        records (`Iterable[Mapping]`): the lines, in file order (already checked by the reader).
        source (`str`): where they come from, for the report's title.
        notes (`Sequence[str]`, *optional*): the reader's notes (a cut last line, ...).

    Returns:
        `RunData`: the run as the figures draw it.
    """
    assembler = _Assembler(source)
    assembler.data.notes.extend(notes)
    for item in records:
        assembler.line(item)
    data = assembler.data
    if assembler.earlier_lines:
        data.notes.append(
            f"the file also holds an earlier run in the same folder ({assembler.earlier_lines} log lines "
            "before the last fit that started from step 0): not shown"
        )
    for branch in data.branches:
        if branch.kind == "resume":
            data.notes.append(
                f"resumed at step {branch.at}: {len(branch.entries)} log lines written past it before "
                "(by a run that went on after that checkpoint) are drawn as an abandoned branch"
            )
    if data.status is None and (data.history or data.events):
        data.notes.append(
            f"no end line after the last fit: the run is still going, or it was stopped (killed, "
            f"out of memory) after step {data.last_step}; the record goes up to its last log step"
        )
    data.findings.sort(key=lambda f: (SEVERITY_ORDER.get(f.get("severity", "info"), 3), f.get("step") or 0))
    return data


def records_from_memory(
    *,
    history: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    findings: Sequence[Mapping[str, Any]],
    global_step: int,
    status: str,
    eval_loss: float | None,
    baseline_loss: float | None,
    settings: Mapping[str, Any] | None = None,
    lr_find: Mapping[str, Any] | None = None,
    trace: Any = None,
) -> list[dict[str, Any]]:
    """Record lines for a run held in memory (``FitResult``), in the order the record would have them.

    The history keeps the abandoned branches too; each entry's ``rollbacks`` count says which
    rollback came before it, so rollback ``n``'s event is placed before the first entry written
    after it. The trace (a :class:`~safeloop.report.trace.RunTrace`) adds the per-layer values
    to the log lines of the entries it kept them for, each evaluation where it ran (after the
    entries and rollbacks before it), and the trainer's settings. Without one (or without
    evaluations in it), the last evaluation loss is placed at the last step.

    Args:
        history (`Sequence[Mapping]`): the ``FitResult``'s history, abandoned branches included.
        events (`Sequence[Mapping]`): its events, as dicts, in order.
        findings (`Sequence[Mapping]`): its findings, as dicts.
        global_step (`int`): its last step.
        status (`str`): how it ended.
        eval_loss (`float | None`): its last evaluation loss.
        baseline_loss (`float | None`): its constant-prediction loss.
        settings (`Mapping`, *optional*): settings that override the trace's (None values do not).
        lr_find (`Mapping`, *optional*): an ``LRFinderResult`` as a dict.
        trace (`RunTrace`, *optional*): the per-layer values and evaluations kept in memory.

    Returns:
        `list[dict]`: the lines, for :func:`assemble`.
    """
    chosen = dict(getattr(trace, "settings", None) or {})
    chosen.update({k: v for k, v in (settings or {}).items() if v is not None})
    layers, rows = (None, {}) if trace is None else trace.lines()
    if trace is not None and trace.stride > 1:
        # a column holds several log steps: the heat map's first column is as wide as the others
        chosen.pop("log_every", None)
    # each line's place in time: (history entries before it, rollbacks before it, kind, order)
    timed: list[tuple[tuple[int, int, int, int], dict[str, Any]]] = []
    for position, entry in enumerate(history):
        line = {"type": "log", **entry, **rows.get(position, {})}
        timed.append(((position + 1, int(entry.get("rollbacks", 0)), 0, position), line))
    place = (0, 0)
    for order, event in enumerate(events):
        if event["kind"] == "rollback":
            number = int(event["detail"].get("rollback", 0))
            after = next(
                (p for p, entry in enumerate(history) if int(entry.get("rollbacks", 0)) >= number),
                len(history),
            )
            place = (after, number)
        timed.append(((*place, 1, order), {"type": "event", **event}))
    if trace is not None and trace.evals:
        for order, (step, loss, before, rollbacks) in enumerate(trace.evals):
            timed.append(((before, rollbacks, 2, order), {"type": "eval", "step": step, "loss": loss}))
    elif eval_loss is not None:
        timed.append(
            ((len(history), len(events), 2, 0), {"type": "eval", "step": global_step, "loss": eval_loss})
        )
    lines: list[dict[str, Any]] = [{"type": "fit", "step": 0, "resumed_from": None, "settings": chosen}]
    if lr_find is not None:
        lines.append({"type": "lr_find", **lr_find})
    if layers is not None:
        lines.append({"type": "layers", **layers})
    lines.extend(line for _, line in sorted(timed, key=lambda item: item[0]))
    lines.extend({"type": "finding", **finding} for finding in findings)
    end = {"step": global_step, "status": status, "baseline_loss": baseline_loss, "eval_loss": eval_loss}
    lines.append({"type": "end", **end})
    return lines
