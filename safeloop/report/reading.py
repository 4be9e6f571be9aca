"""Reading a run's record back: find ``metrics.jsonl``, parse it, refuse what cannot be read.

What a killed run leaves is read, not refused: a last line cut in the middle (the run died while
writing it) is skipped with a note, and so is a cut line that a resumed run closed before going
on. Everything else that is not a record line stops the reading with a :class:`RecordError`
whose message says what was found, where, and what to do: no record in the folder, a line that
is not JSON in the middle of the file, a line from a newer format than this safeloop reads.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from safeloop.errors import SafeLoopError
from safeloop.report.data import RunData, assemble
from safeloop.report.format import FORMAT_VERSION, LINE_TYPES, RECORD_FILE

__all__ = ["RecordError", "find_record", "read_lines", "read_run"]


class RecordError(SafeLoopError, ValueError):
    """A run record that cannot be read (missing, damaged, or from a newer format)."""


# A log line as the writer makes it: the history entry as JSON, then the per-layer lists, which
# are most of its characters. Parsing 100k such lines with `json` is most of a long run's report;
# their lists are checked here (numbers, NaN, Infinity, null only) but kept as text, and turned
# into numbers all at once by NumPy when a heat map is drawn (`series.layer_matrix`).
_LOG_PREFIX = f'{{"v":{FORMAT_VERSION},"type":"log",'
_LISTS = re.compile(
    r'(?:,"grad_norms":\[([-+0-9.eE,NaIfinityul]*)\])?(?:,"update_ratios":\[([-+0-9.eE,NaIfinityul]*)\])?'
)


def _log_line(raw: str) -> dict[str, Any] | None:
    """A writer's log line with its per-layer lists as text, or None to parse it as any line."""
    if not raw.startswith(_LOG_PREFIX) or not raw.endswith("]}"):
        return None
    cut = raw.find(',"grad_norms":[')
    if cut < 0:
        cut = raw.find(',"update_ratios":[')
    lists = _LISTS.fullmatch(raw, cut, len(raw) - 1) if cut > 0 else None
    if lists is None:
        return None
    value = json.loads(raw[:cut] + "}")  # a damaged head raises ValueError, as the whole line would
    if not isinstance(value, dict):
        return None
    grads, ratios = lists.groups()
    if grads is not None:
        value["grad_norms"] = grads
    if ratios is not None:
        value["update_ratios"] = ratios
    return value


def find_record(target: str | os.PathLike[str]) -> Path:
    """The record file of ``target``: a run's ``checkpoint_dir``, or a ``metrics.jsonl`` itself.

    Raises:
        RecordError: ``target`` does not exist, or holds no record.
    """
    path = Path(target)
    if not path.exists():
        raise RecordError(
            f"{path} does not exist: give the run's checkpoint_dir (the folder holding {RECORD_FILE})."
        )
    if path.is_file():
        return path
    record = path / RECORD_FILE
    if record.is_file():
        return record
    if (path.parent / RECORD_FILE).is_file() and path.name.startswith("step-"):
        raise RecordError(
            f"{path} is one checkpoint, not a run: the run's record is in the folder above it; "
            f"run `safeloop report {path.parent}`."
        )
    if any(path.glob("step-*")) or (path / "findings.json").exists():
        why = (
            "this checkpoint_dir holds checkpoints but no record: the run was made by a safeloop "
            "older than the record, or stopped before its first log step"
        )
    else:
        why = (
            "a run writes it into its checkpoint_dir at each log step; SafeTrainer(checkpoint_dir=...) "
            "must be set (a temporary checkpoint folder keeps no record)"
        )
    raise RecordError(f"no run record in {path}: {RECORD_FILE} is missing ({why}).")


def _check(value: Any, path: Path, number: int) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("v"), int) or "type" not in value:
        raise RecordError(
            f"{path} line {number} is JSON but not a record line (no format version `v` and `type`): "
            f"this is not a safeloop {RECORD_FILE}; point the report at a run's checkpoint_dir."
        )
    if value["v"] > FORMAT_VERSION:
        raise RecordError(
            f"{path} line {number} has record format version {value['v']}, and this safeloop reads "
            f"versions up to {FORMAT_VERSION}: it was written by a newer safeloop; upgrade to read it "
            '(pip install -U "safeloop[report]").'
        )
    return value


def read_lines(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse a record file into its lines (dicts) and the reader's notes.

    Args:
        path (`str | os.PathLike`): the ``metrics.jsonl`` file.

    Returns:
        `tuple[list[dict], list[str]]`: the record lines in file order, and notes on lines skipped.

    Raises:
        RecordError: a damaged line that is not the cut end of a killed run, a newer format, an
            unreadable or empty file.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as error:
        raise RecordError(
            f"{path} could not be read ({error.strerror or error}): check its permissions."
        ) from None
    lines: list[dict[str, Any]] = []
    notes: list[str] = []
    unknown = 0
    pending: tuple[int, str] | None = None  # an unparsable line: cut by a kill, if a fit line follows
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            value = _log_line(raw)
            if value is None:
                value = json.loads(raw)
        except ValueError:
            if pending is not None:
                _damaged(path, *pending)
            pending = (number, raw)
            continue
        value = _check(value, path, number)
        if pending is not None:
            if value["type"] != "fit":
                _damaged(path, *pending)
            notes.append(
                f"line {pending[0]} was cut (the run was killed while writing it, then resumed): skipped"
            )
            pending = None
        if value["type"] in LINE_TYPES:
            lines.append(value)
        else:
            unknown += 1
    if pending is not None:  # nothing after it: the end of a killed run
        step = next((line["step"] for line in reversed(lines) if line["type"] == "log"), None)
        upto = "no log step" if step is None else f"its last complete log step, step {step}"
        notes.append(
            f"the last line ({pending[0]}) was cut (the run was killed while writing it): read up to {upto}"
        )
    if unknown:
        notes.append(f"{unknown} lines of a type this safeloop does not know were skipped")
    if not lines:
        raise RecordError(
            f"{path} holds no record line: the run wrote nothing yet (it stopped before its first "
            "log step, or the file was emptied); run longer than log_every steps."
        )
    return lines, notes


def _damaged(path: Path, number: int, raw: str) -> None:
    shown = raw if len(raw) <= 60 else raw[:57] + "..."
    raise RecordError(
        f"{path} line {number} is not JSON ({shown!r}), and it is not the cut last line of a killed "
        "run: the file was damaged or edited; restore it from a copy, or cut the file before that line."
    )


def read_run(target: str | os.PathLike[str]) -> RunData:
    """Read a run's record (a ``checkpoint_dir`` or a ``metrics.jsonl``) into the run the report draws.

    Raises:
        RecordError: see :func:`find_record` and :func:`read_lines`.
    """
    path = find_record(target)
    lines, notes = read_lines(path)
    return assemble(lines, source=str(path), notes=notes)
