"""The numbers behind the figures: downsampling that keeps extremes, smoothing, per-layer matrices.

A plot is about a thousand pixels wide, so a 100k-step record is cut into at most
:data:`MAX_POINTS` buckets of consecutive log steps. Lines keep the lowest and the highest value
of each bucket, in the order they came (min-max decimation), so a one-step spike stays as high as
it was; a heat map cell keeps the value of its bucket that is furthest, in log scale, from its
layer's median, so a vanishing or an exploding step stays visible too. NumPy is imported with
this module, which only the figure code imports.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import numpy as np

from safeloop.report.data import LayerTable

__all__ = ["MAX_POINTS", "as_array", "decimate", "smooth", "layer_matrix", "bucket_columns"]

MAX_POINTS = 1000


def as_array(values: Sequence[object]) -> np.ndarray:
    """Floats, None as NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _buckets(n: int, count: int) -> np.ndarray:
    """Start index of each of ``count`` near-equal buckets over ``n`` points."""
    return np.unique(np.linspace(0, n, count + 1).astype(np.int64)[:-1])


def decimate(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points that keep each bucket's minimum and maximum, in order.

    Args:
        x (`np.ndarray`): steps, increasing.
        y (`np.ndarray`): values; NaN (not measured) is kept where a whole bucket is NaN.
        max_points (`int`, *optional*): the budget (two points per bucket).

    Returns:
        `tuple[np.ndarray, np.ndarray]`: the kept points.
    """
    n = len(y)
    if n <= max_points:
        return x, y
    count = max(1, max_points // 2)
    starts = _buckets(n, count)
    size = int(np.ceil(n / len(starts))) + 1
    # pad every bucket to one width so that argmin and argmax run on a 2-D view
    index = starts[:, None] + np.arange(size)[None, :]
    ends = np.append(starts[1:], n)
    valid = index < ends[:, None]
    index = np.minimum(index, n - 1)
    block = y[index]
    low = np.where(valid & ~np.isnan(block), block, np.inf).argmin(axis=1)
    high = np.where(valid & ~np.isnan(block), block, -np.inf).argmax(axis=1)
    rows = np.arange(len(starts))
    first = np.minimum(low, high)
    second = np.maximum(low, high)
    picked = np.stack([index[rows, first], index[rows, second]], axis=1).ravel()
    return x[picked], y[picked]


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points, NaN left out (a skipped interval)."""
    if window <= 1 or len(y) < 3:
        return y.copy()
    finite = np.isfinite(y)
    values = np.where(finite, y, 0.0)
    kernel = np.ones(window)
    total = np.convolve(values, kernel, mode="same")
    count = np.convolve(finite.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def smoothing_window(n: int) -> int:
    """Points averaged by the smoothed loss: about 1/40 of the run, odd; 1 (none) under 20 points."""
    if n < 20:
        return 1
    return max(3, n // 40) | 1


def _rows(rows: list[object], width: int) -> np.ndarray:
    """Rows of ``width`` values (lists, or a file's list text) as one float matrix, None as NaN."""
    if rows and all(isinstance(row, str) for row in rows):
        text = ",".join(rows).replace("null", "nan")  # type: ignore[arg-type]
        with warnings.catch_warnings():  # a value it cannot read stops it short: the check below
            warnings.simplefilter("ignore", DeprecationWarning)
            values = np.fromstring(text, sep=",") if text else np.zeros(0)
        if values.size == len(rows) * width:
            return values.reshape(len(rows), width)
    matrix = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        items = row.split(",") if isinstance(row, str) else list(row)  # type: ignore[attr-defined]
        for j, item in enumerate(items[:width]):
            with contextlib.suppress(TypeError, ValueError):  # one it cannot read: drawn as not measured
                matrix[i, j] = np.nan if item in (None, "null") else float(item)
    return matrix


def layer_matrix(table: LayerTable) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The table as (names, steps, layers x steps matrix with NaN where not measured)."""
    steps = np.array(table.steps, dtype=float)
    matrix = np.full((len(table.names), len(table.steps)), np.nan)
    if not len(table):
        return list(table.names), steps, matrix
    mapping = np.array(table.mapping)
    for m, positions in enumerate(table.mappings):
        rows = np.nonzero(mapping == m)[0]
        if len(rows) and positions:
            matrix[np.ix_(positions, rows)] = _rows([table.rows[r] for r in rows], len(positions)).T
    order = np.argsort(steps, kind="stable")
    return list(table.names), steps[order], matrix[:, order]


def bucket_columns(
    steps: np.ndarray, matrix: np.ndarray, max_columns: int = MAX_POINTS // 2, *, first_width: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_columns`` columns, each its bucket's value furthest from the layer's median.

    Args:
        steps (`np.ndarray`): the step of each column, increasing.
        matrix (`np.ndarray`): layers x steps, positive values (NaN where not measured).
        max_columns (`int`, *optional*): the budget.
        first_width (`float`, *optional*): the first column's width in steps (``log_every``);
            0: that of the second.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: the column edges (one more than columns, on the step
        axis) and the reduced matrix.
    """
    n = matrix.shape[1]
    if n == 0:
        return np.array([0.0, 1.0]), matrix
    full = _edges(steps, first_width)
    if n <= max_columns:
        return full, matrix
    starts = _buckets(n, max_columns)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.where(matrix > 0, matrix, np.nan))
    with warnings.catch_warnings():  # a layer never measured has no median: 0 stands in
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(logs, axis=1, keepdims=True)
    median = np.where(np.isnan(median), 0.0, median)
    low = np.fmin.reduceat(np.where(np.isnan(logs), np.inf, logs), starts, axis=1)
    high = np.fmax.reduceat(np.where(np.isnan(logs), -np.inf, logs), starts, axis=1)
    pick_high = np.abs(high - median) >= np.abs(median - low)
    chosen = np.where(pick_high, high, low)
    chosen = np.where(np.isfinite(chosen), 10.0**chosen, np.nan)
    # a bucket where the layer is 0 everywhere (a dead layer) stays 0, not missing
    zero = np.add.reduceat((matrix == 0).astype(int), starts, axis=1) > 0
    chosen = np.where(np.isnan(chosen) & zero, 0.0, chosen)
    return np.append(full[starts], full[n]), chosen


def _edges(steps: np.ndarray, first_width: float = 0.0) -> np.ndarray:
    """Cell edges: a log step's values are of its interval, so its cell spans (previous step, step]."""
    if first_width <= 0:
        first_width = float(steps[1] - steps[0]) if len(steps) > 1 else 1.0
    return np.concatenate([[max(steps[0] - first_width, 0.0)], steps])  # step 1 is the first step
