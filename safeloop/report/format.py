"""The line format of the run's record, ``metrics.jsonl``: one JSON object per line.

Every line carries the format version (``"v"``) and its ``"type"``; a reader refuses a version
newer than :data:`FORMAT_VERSION` instead of guessing. The types (docs/report.md has the fields):

- ``fit``: a ``fit()`` starts: its first step, the checkpoint it resumed from, the settings.
- ``layers``: the parameter names that the per-layer lists of the following ``log`` lines follow.
- ``log``: one log step: the history entry, and the per-layer gradient norms and update ratios.
- ``eval``, ``event``, ``finding``, ``lr_find``, ``end``: an evaluation, an ``Event``, a
  ``Finding`` (written again when its count or text changes), a learning-rate range test, the
  end of a ``fit``.

Non-finite numbers are written as ``NaN``, ``Infinity`` and ``-Infinity``, as Python's ``json``
writes and reads them. This module imports nothing from safeloop, so that both the writer (in
the trainer) and the reader (in the report) depend on it alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "RECORD_FILE",
    "LINE_TYPES",
    "dump_line",
    "log_line",
    "number_list",
]

FORMAT_VERSION = 1
RECORD_FILE = "metrics.jsonl"
LINE_TYPES = ("fit", "layers", "log", "eval", "event", "finding", "lr_find", "end")

_COMPACT = {"separators": (",", ":")}


def dump_line(kind: str, fields: Mapping[str, Any]) -> str:
    """One record line: ``{"v": ..., "type": kind, **fields}`` and a newline.

    Args:
        kind (`str`): one of :data:`LINE_TYPES`.
        fields (`Mapping[str, Any]`): JSON-able values (non-finite floats allowed).

    Returns:
        `str`: the line, ending in a newline.
    """
    return json.dumps({"v": FORMAT_VERSION, "type": kind, **fields}, **_COMPACT) + "\n"  # type: ignore[arg-type]


def _number(value: float | None) -> str:
    if value is None:
        return "null"
    if math.isfinite(value):
        # 6 significant digits: a plot needs no more, and the file stays a third of repr's size
        return f"{value:.6g}"
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def number_list(values: Iterable[float | None]) -> str:
    """A JSON array of numbers at 6 significant digits (``null`` for a value not measured)."""
    return "[" + ",".join(_number(v) for v in values) + "]"


def log_line(
    entry: Mapping[str, Any],
    *,
    grad_norms: Iterable[float | None] | None = None,
    update_ratios: Iterable[float | None] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The ``log`` line of one log step.

    The history entry is written as JSON; the per-layer lists, which make most of a line, are
    formatted directly (no per-value JSON encoding) in the order of the last ``layers`` line.

    Args:
        entry (`Mapping[str, Any]`): the history entry (``step``, ``loss``, ``lr``, ...).
        grad_norms (`Iterable[float | None]`, *optional*): per-layer gradient norms.
        update_ratios (`Iterable[float | None]`, *optional*): per-layer ``||dw|| / ||w||``.
        extra (`Mapping[str, Any]`, *optional*): more fields (``baseline_loss`` once known).

    Returns:
        `str`: the line, ending in a newline.
    """
    head = json.dumps({"v": FORMAT_VERSION, "type": "log", **entry, **(extra or {})}, **_COMPACT)  # type: ignore[arg-type]
    tail = ""
    if grad_norms is not None:
        tail += ',"grad_norms":' + number_list(grad_norms)
    if update_ratios is not None:
        tail += ',"update_ratios":' + number_list(update_ratios)
    return head[:-1] + tail + "}\n"
