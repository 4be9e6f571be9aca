"""The figures: each mark is an artist with its gid, one heat-map row per layer, long and short runs."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure

from safeloop.report.data import assemble
from safeloop.report.figures import draw_loss
from safeloop.report.format import dump_line
from safeloop.report.heatmaps import draw_layers
from safeloop.report.panels import draw_panel, overview, panels_for
from safeloop.report.reading import read_lines
from safeloop.report.series import MAX_POINTS, bucket_columns, decimate
from tests.unit.report import records


def _gids(figure) -> set[str]:
    return {artist.get_gid() for artist in figure.findobj() if artist.get_gid()}


def _data(tmp_path, lines):
    found, notes = read_lines(records.write(tmp_path, lines))
    return assemble(found, source="test", notes=notes)


def test_the_loss_panel_marks_the_skip_the_rollback_with_its_branch_the_reinit_and_the_preemption(tmp_path):
    data = _data(tmp_path, records.eventful_run())
    figure = draw_panel(panels_for(data)[0], data)
    gids = _gids(figure)
    for mark in ("skip", "rollback", "rollback-span", "abandoned", "reinit", "preempt", "baseline", "eval"):
        assert f"safeloop-{mark}" in gids, mark
    (ax,) = figure.axes
    (skips,) = [a for a in ax.collections if a.get_gid() == "safeloop-skip"]
    assert skips.get_offsets()[:, 0].tolist() == [7]
    (rollback,) = [line for line in ax.get_lines() if line.get_gid() == "safeloop-rollback"]
    assert rollback.get_xdata()[0] == 25  # where the divergence was read
    (branch,) = [line for line in ax.get_lines() if line.get_gid() == "safeloop-abandoned"]
    assert branch.get_xdata().tolist() == [15, 20, 25]  # leaves the live curve at the step restored


def test_the_learning_rate_panel_shows_the_rollbacks_cut(tmp_path):
    data = _data(tmp_path, records.eventful_run())
    figure = draw_panel(next(p for p in panels_for(data) if p.name == "lr"), data)
    (cut,) = [line for line in figure.axes[0].get_lines() if line.get_gid() == "safeloop-lr-cut"]
    assert (cut.get_xdata()[0], cut.get_ydata()[0]) == (15, 0.05)


def test_the_heat_maps_have_one_row_per_measured_layer_and_a_branch_of_their_own(tmp_path):
    data = _data(tmp_path, records.eventful_run())
    names = [p.name for p in panels_for(data)]
    assert names == [
        "loss", "lr", "grad-norm", "layer-grad-norm", "layer-grad-norm-branch-1", "update-ratio",
        "update-ratio-branch-1",
    ]  # fmt: skip
    for kind, names in (("grad_norms", records.LAYERS), ("update_ratios", records.WEIGHTS)):
        figure = Figure()
        mesh = draw_layers(figure.add_subplot(), data, kind)
        assert mesh.get_array().shape == (len(names), len(data.history))  # layers x log steps
        assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == names
        branch = draw_layers(Figure().add_subplot(), data, kind, data.branches[0])
        assert branch.get_array().shape == (len(names), 2)


def test_a_run_of_a_few_steps_draws_every_panel_with_its_points(tmp_path):
    lines = [records.fit(), records.layers(), records.log(1, 2.0), records.log(2, 1.9), records.log(5, 1.7)]
    data = _data(tmp_path, lines)
    figure = overview(data)
    loss = next(line for line in figure.axes[0].get_lines() if line.get_gid() == "safeloop-loss")
    assert loss.get_xdata().tolist() == [1, 2, 5] and loss.get_marker() == "o"
    assert {"safeloop-heatmap-grad_norms", "safeloop-heatmap-update_ratios"} <= _gids(figure)


def test_a_long_run_is_cut_to_the_point_budget_and_keeps_its_extremes():
    steps = np.arange(1, 100_001, dtype=float)
    values = np.ones_like(steps)
    values[[123, 77_777]] = [50.0, 1e-4]
    x, y = decimate(steps, values)
    assert len(x) <= MAX_POINTS and y.max() == 50.0 and y.min() == 1e-4 and np.all(np.diff(x) >= 0)
    matrix = np.ones((3, len(steps)))
    matrix[1, 500], matrix[2, 90_000] = 1e6, 1e-9
    edges, cells = bucket_columns(steps, matrix)
    assert cells.shape == (3, MAX_POINTS // 2) and len(edges) == MAX_POINTS // 2 + 1
    assert cells[1].max() == 1e6 and cells[2].min() == 1e-9  # a one-step blow-up or collapse stays


def test_a_long_record_draws_within_the_budget(tmp_path):
    lines = [records.fit(), records.layers()]
    lines += [records.log(s, 1.0 + 1 / s) for s in range(5, 20_001, 5)]
    lines.append(dump_line("end", {"step": 20_000, "status": "completed"}))
    data = _data(tmp_path, lines)
    figure = draw_panel(panels_for(data)[0], data)
    loss = next(line for line in figure.axes[0].get_lines() if line.get_gid() == "safeloop-loss")
    assert len(loss.get_xdata()) <= MAX_POINTS
    assert "safeloop-smoothed" in _gids(figure)


def test_the_loss_panel_keeps_the_live_run_readable_under_a_branch_that_blew_up(tmp_path):
    data = _data(tmp_path, records.eventful_run())
    data.branches[0].entries[-1]["loss"] = 1e15
    figure = Figure()
    draw_loss(figure.add_subplot(), data)
    ax = figure.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim()[1] < 1e6
    assert "safeloop-offscale" in _gids(figure)
