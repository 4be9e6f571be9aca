"""The run's record in memory, bounded: what ``FitResult.plot`` draws that the history lacks.

The writer of ``metrics.jsonl`` (:class:`~safeloop.report.record.RecordWriter`) hands each log
step's per-layer gradient norms and update ratios, and each evaluation, to a :class:`RunTrace`
as well as to the file, with or without a ``checkpoint_dir`` and on every process. At the end,
:meth:`RunTrace.lines` turns it back into record lines, which
:func:`~safeloop.report.data.records_from_memory` places among the history's, so that
``FitResult.plot`` draws what ``safeloop report`` draws, through the same reader and panels.

Memory stays bounded on a run of any length. Up to :data:`CAPACITY` log steps are kept as they
are; past that, neighbouring columns are merged in pairs (and each later log step joins the last
column until it holds as many as the others). A merged column keeps, per layer, the lowest and
the highest positive value of its log steps (0 when the layer was exactly 0 there and never
positive), and the figure shows the one further, in log scale, from the layer's median: the rule
the report uses for its own buckets (:func:`~safeloop.report.series.bucket_columns`), so a
vanishing or an exploding step stays visible. Columns on either side of a rollback are not
merged (the branch it abandoned is drawn apart), unless rollbacks alone would hold the trace
above its bound. So a heat map from memory has at least ``CAPACITY / 2`` columns, as many as the
report draws. Evaluations are kept likewise: past :data:`EVAL_CAPACITY`, groups of four keep
their lowest and highest loss.

Pure Python (``array`` and ``math``): the trainer builds one for every run, matplotlib or not.
"""

from __future__ import annotations

import math
import statistics
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CAPACITY", "EVAL_CAPACITY", "KINDS", "RunTrace"]

# columns kept before a merge halves them; the report draws at most 500 (series.MAX_POINTS // 2)
CAPACITY = 1000
EVAL_CAPACITY = 2000
KINDS = ("grad_norms", "update_ratios")
_NAN = float("nan")


def _low(a: float, b: float) -> float:
    """The lower positive value; 0 when neither is positive and one is 0; NaN when both are NaN."""
    if a > 0 and b > 0:
        return a if a < b else b
    if a > 0 or b > 0:
        return a if a > 0 else b
    return 0.0 if a == 0 or b == 0 else _NAN


def _high(a: float, b: float) -> float:
    """The higher positive value, with :func:`_low`'s rules for 0 and NaN."""
    if a > 0 and b > 0:
        return a if a > b else b
    return _low(a, b)


def _value(value: Any) -> float:
    """A measured value as the trace keeps it: positive finite or 0; anything else NaN (not measured)."""
    if type(value) is not float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            return _NAN
    return value if 0 <= value < math.inf else _NAN


@dataclass
class _Column:
    """One column of a heat map: one log step, or several merged.

    Attributes:
        index (`int`): the position in the history of its last log step.
        rollbacks (`int`): rollbacks done when it was logged (columns of two sides are not merged).
        count (`int`): log steps merged in it.
        low (`dict[str, array]`): per kind, each layer's lowest value (see the module docstring).
        high (`dict[str, array] | None`): the highest; None while ``count`` is 1 (equal to ``low``).
    """

    index: int
    rollbacks: int
    count: int
    low: dict[str, array]
    high: dict[str, array] | None = None

    def merge(self, later: _Column) -> None:
        """Take ``later`` (the next column in time) into this one."""
        high = self.high if self.high is not None else {kind: array("d", v) for kind, v in self.low.items()}
        later_high = later.high if later.high is not None else later.low
        for kind in KINDS:
            mine_low, mine_high = self.low[kind], high[kind]
            for values in (mine_low, mine_high):
                values.extend([_NAN] * (len(later.low[kind]) - len(values)))  # a name new since
            for i, value in enumerate(later.low[kind]):
                mine_low[i] = _low(mine_low[i], value)
            for i, value in enumerate(later_high[kind]):
                mine_high[i] = _high(mine_high[i], value)
        self.high = high
        self.index, self.rollbacks, self.count = later.index, later.rollbacks, self.count + later.count


@dataclass
class RunTrace:
    """Per-layer values and evaluations of a run, downsampled to a bounded size, for ``FitResult.plot``.

    Attributes:
        names (`dict[str, list[str]]`): per kind (``"grad_norms"``, ``"update_ratios"``), every
            layer name seen, in the order first seen (one heat-map row each).
        evals (`list[tuple[int, float, int, int]]`): each evaluation kept: its step, its loss,
            the number of history entries before it, and the rollbacks done before it.
        settings (`dict`): the trainer's plain settings (``clip_grad_norm``, ``log_every``, ...).
        stride (`int`): log steps per column once merging has begun (1 before).
    """

    names: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    evals: list[tuple[int, float, int, int]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    stride: int = 1
    _columns: list[_Column] = field(default_factory=list, repr=False)
    _positions: dict[str, dict[str, int]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}, repr=False
    )

    def __len__(self) -> int:
        """The columns kept."""
        return len(self._columns)

    def copy(self) -> RunTrace:
        """An independent copy (a ``FitResult`` keeps the trace as it was when ``fit`` returned)."""
        columns = [
            _Column(
                c.index, c.rollbacks, c.count, _copied(c.low), None if c.high is None else _copied(c.high)
            )
            for c in self._columns
        ]
        return RunTrace(
            names={k: list(v) for k, v in self.names.items()}, evals=list(self.evals),
            settings=dict(self.settings), stride=self.stride, _columns=columns,
            _positions={k: dict(v) for k, v in self._positions.items()},
        )  # fmt: skip

    def log(self, index: int, rollbacks: int, values: Mapping[str, Mapping[str, float]]) -> None:
        """One log step's per-layer values.

        Args:
            index (`int`): the position of its entry in the run's history.
            rollbacks (`int`): rollbacks done before it.
            values (`Mapping[str, Mapping[str, float]]`): per kind, each layer's value by name;
                a layer known from earlier log steps and absent here is not measured at this one.
        """
        if not any(values.get(kind) for kind in KINDS) and not any(self.names.values()):
            return  # nothing measured yet (diagnostics off, or before their first measurement)
        last = self._columns[-1] if self._columns else None
        if last is not None and last.count < self.stride and last.rollbacks == rollbacks:
            self._add_to(last, values)  # a merged column not full yet
            last.index, last.count = index, last.count + 1
        else:
            low: dict[str, array] = {}
            for kind in KINDS:
                given = values.get(kind) or {}
                positions = self._known(kind, given)
                row = array("d", [_NAN]) * len(self.names[kind])
                for name, value in given.items():
                    row[positions[name]] = _value(value)
                low[kind] = row
            self._columns.append(_Column(index, rollbacks, 1, low))
        if len(self._columns) >= CAPACITY:
            self._halve()

    def _known(self, kind: str, given: Mapping[str, float]) -> dict[str, int]:
        """Each layer's row, new names added at the end."""
        positions, names = self._positions[kind], self.names[kind]
        for name in given:
            if name not in positions:
                positions[name] = len(names)
                names.append(name)
        return positions

    def _add_to(self, column: _Column, values: Mapping[str, Mapping[str, float]]) -> None:
        """One log step's values into a column's lowest and highest (the hot path past CAPACITY)."""
        if column.high is None:
            column.high = {kind: array("d", row) for kind, row in column.low.items()}
        for kind in KINDS:
            given = values.get(kind) or {}
            positions = self._known(kind, given)
            low, high = column.low[kind], column.high[kind]
            if len(low) < len(positions):  # a name new since
                low.extend([_NAN] * (len(positions) - len(low)))
                high.extend([_NAN] * (len(positions) - len(high)))
            for name, value in given.items():
                v = _value(value)
                i = positions[name]
                if v > 0:
                    if not low[i] > 0 or v < low[i]:
                        low[i] = v
                    if not high[i] > 0 or v > high[i]:
                        high[i] = v
                elif v == 0 and not low[i] > 0:  # 0 counts where nothing positive was seen
                    low[i] = high[i] = 0.0

    def evaluated(self, step: int, loss: float, index: int, rollbacks: int) -> None:
        """An evaluation's loss at ``step``, after ``index`` history entries and ``rollbacks`` rollbacks."""
        self.evals.append((int(step), float(loss), int(index), int(rollbacks)))
        if len(self.evals) >= EVAL_CAPACITY:
            self.evals = _thin(self.evals)

    def _halve(self) -> None:
        """Merge neighbouring columns in pairs (never across a rollback, unless too many rollbacks)."""
        columns, merged = self._columns, []
        for strict in (True, False):
            merged, i = [], 0
            while i < len(columns):
                first = columns[i]
                if i + 1 < len(columns) and (not strict or columns[i + 1].rollbacks == first.rollbacks):
                    first.merge(columns[i + 1])
                    i += 2
                else:
                    i += 1
                merged.append(first)
            columns = merged
            self.stride *= 2
            if len(columns) <= CAPACITY * 3 // 4:
                break
        self._columns = columns

    def lines(self) -> tuple[dict[str, Any] | None, dict[int, dict[str, list[float | None]]]]:
        """The trace as record pieces: a ``layers`` line, and each column's lists by history position.

        A merged column shows, per layer, its lowest or its highest value, whichever is further in
        log scale from the layer's median over the run (the report's rule for its own buckets).

        Returns:
            `tuple`: the ``layers`` line's fields (None when nothing was measured), and per history
            position the ``grad_norms`` and ``update_ratios`` lists of its ``log`` line.
        """
        if not self._columns:
            return None, {}
        rows: dict[int, dict[str, list[float | None]]] = {column.index: {} for column in self._columns}
        for kind in KINDS:
            width = len(self.names[kind])
            if not width:
                continue
            medians = self._medians(kind, width)
            for column in self._columns:
                low = column.low[kind]
                high = low if column.high is None else column.high[kind]
                row: list[float | None] = []
                for i in range(width):
                    a = low[i] if i < len(low) else _NAN
                    b = high[i] if i < len(high) else _NAN
                    row.append(_pick(a, b, medians[i]))
                rows[column.index][kind] = row
        layers = {kind: list(self.names[kind]) for kind in KINDS}
        return layers, rows

    def _medians(self, kind: str, width: int) -> list[float]:
        """Each layer's median log10 value over every kept value (0 for a layer never positive)."""
        logs: list[list[float]] = [[] for _ in range(width)]
        for column in self._columns:
            for values in (column.low[kind], *(() if column.high is None else (column.high[kind],))):
                for i, value in enumerate(values):
                    if value > 0:
                        logs[i].append(math.log10(value))
        return [statistics.median(found) if found else 0.0 for found in logs]


def _copied(rows: dict[str, array]) -> dict[str, array]:
    return {kind: array("d", row) for kind, row in rows.items()}


def _pick(low: float, high: float, median: float) -> float | None:
    """The value shown for a column: the extreme further from the median; None when not measured."""
    if low > 0 and high > 0:
        return high if abs(math.log10(high) - median) >= abs(median - math.log10(low)) else low
    if low == 0 or high == 0:
        return 0.0
    return None


def _thin(evals: list[tuple[int, float, int, int]]) -> list[tuple[int, float, int, int]]:
    """Halve the evaluations: each group of four (of one side of the rollbacks) keeps its extremes."""
    kept: list[tuple[int, float, int, int]] = []
    group: list[tuple[int, float, int, int]] = []

    def flush() -> None:
        if len(group) <= 2:
            kept.extend(group)
        else:
            low = min(group, key=lambda e: e[1] if math.isfinite(e[1]) else math.inf)
            high = max(group, key=lambda e: e[1] if math.isfinite(e[1]) else -math.inf)
            kept.extend(sorted({id(low): low, id(high): high}.values(), key=group.index))
        group.clear()

    for item in evals:
        if group and (len(group) == 4 or group[-1][3] != item[3]):
            flush()
        group.append(item)
    flush()
    return kept
