"""The trace in memory: bounded on a long run, extremes kept, rollbacks kept apart, the report's lines."""

from __future__ import annotations

import math

from safeloop.report.data import assemble, records_from_memory
from safeloop.report.trace import CAPACITY, EVAL_CAPACITY, RunTrace
from tests.unit.report import records


def _values(step: int) -> dict[str, dict[str, float]]:
    grads = {name: 0.5 + i + step / 1e6 for i, name in enumerate(records.LAYERS)}
    grads["2.bias"] = 0.0  # a dead layer
    return {"grad_norms": grads, "update_ratios": {name: 1e-3 for name in records.WEIGHTS}}


def test_a_short_run_is_kept_as_logged_one_column_per_log_step():
    trace = RunTrace()
    for index in range(5):
        trace.log(index, 0, _values(index))
    layers, rows = trace.lines()
    assert layers == {"grad_norms": records.LAYERS, "update_ratios": records.WEIGHTS}
    assert sorted(rows) == [0, 1, 2, 3, 4] and trace.stride == 1
    assert rows[3]["grad_norms"] == [v for v in _values(3)["grad_norms"].values()]
    assert rows[3]["update_ratios"] == [1e-3, 1e-3]


def test_a_long_run_stays_bounded_and_keeps_a_one_step_spike_a_dip_and_a_dead_layer():
    trace = RunTrace()
    steps = 30_000
    for index in range(steps):
        values = _values(index)
        if index == 12_345:
            values["grad_norms"]["0.weight"] = 1e6  # an explosion at one log step
        if index == 23_456:
            values["grad_norms"]["2.weight"] = 1e-9  # a vanishing step
        trace.log(index, 0, values)
    assert CAPACITY // 2 <= len(trace) < CAPACITY and trace.stride > 1
    rows = trace.lines()[1]
    grads = {index: row["grad_norms"] for index, row in rows.items()}
    spike = min(index for index in grads if index >= 12_345)  # the column holding that log step
    dip = min(index for index in grads if index >= 23_456)
    assert grads[spike][0] == 1e6 and grads[dip][2] == 1e-9
    assert all(row[3] == 0.0 for row in grads.values())  # dead stays exactly zero, not missing
    assert max(rows) == steps - 1  # the last column ends at the last log step


def test_columns_on_either_side_of_a_rollback_are_never_merged():
    trace = RunTrace()
    for index in range(CAPACITY + 10):
        trace.log(index, 0 if index < 700 else 1, _values(index))
    assert 699 in trace.lines()[1]  # the last log step before the rollback ends a column


def test_a_run_rolled_back_at_every_log_step_still_stays_bounded():
    trace = RunTrace()
    for index in range(3 * CAPACITY):
        trace.log(index, index, _values(index))  # a new rollback count each time: nothing pairs up
    assert len(trace) < CAPACITY


def test_a_layer_first_measured_later_gets_its_row_and_none_before():
    trace = RunTrace()
    trace.log(0, 0, {"grad_norms": {"a": 1.0}})
    trace.log(1, 0, {"grad_norms": {"a": 1.0, "b": 2.0}})
    layers, rows = trace.lines()
    assert layers["grad_norms"] == ["a", "b"] and rows[0]["grad_norms"] == [1.0, None]


def test_many_evaluations_are_thinned_keeping_each_groups_lowest_and_highest():
    trace = RunTrace()
    for i in range(EVAL_CAPACITY + 100):
        trace.evaluated(i, 5.0 if i == 1001 else 1.0 + math.sin(i), i, 0)
    assert len(trace.evals) < EVAL_CAPACITY
    assert max(loss for _, loss, _, _ in trace.evals) == 5.0
    assert [e[0] for e in trace.evals] == sorted(e[0] for e in trace.evals)


def test_the_trace_becomes_the_lines_of_the_report_rollback_branch_and_evaluations_included():
    history = [records.entry(s, 1.0, rollbacks=r) for s, r in ((5, 0), (10, 0), (15, 0), (10, 1), (15, 1))]
    trace = RunTrace(settings={"clip_grad_norm": 1.0, "log_every": 5})
    for index, entry in enumerate(history):
        trace.log(index, entry["rollbacks"], _values(entry["step"]))
        if index == 1:
            trace.evaluated(10, 0.9, index + 1, 0)  # on the branch the rollback abandons
    trace.evaluated(15, 0.7, len(history), 1)
    rollback = {"rollback": 1, "detected_at": 15, "reason": "loss-spike"}
    lines = records_from_memory(
        history=history, events=[{"kind": "rollback", "step": 5, "detail": rollback}], findings=[],
        global_step=15, status="completed", eval_loss=0.7, baseline_loss=None, trace=trace,
    )  # fmt: skip
    data = assemble(lines, source="memory")
    assert data.settings["clip_grad_norm"] == 1.0
    assert data.grad_norms.names == records.LAYERS and data.grad_norms.steps == [5, 10, 15]
    assert data.evals == [(15, 0.7)]  # the abandoned branch's evaluation is set apart with it
    (branch,) = data.branches
    assert branch.grad_norms.steps == [10, 15] and len(branch.update_ratios) == 2


def test_a_copy_does_not_change_with_the_trace():
    trace = RunTrace()
    trace.log(0, 0, _values(0))
    kept = trace.copy()
    trace.log(1, 0, _values(1))
    trace.evaluated(1, 1.0, 2, 0)
    assert len(kept) == 1 and not kept.evals and len(trace) == 2


def test_a_writer_without_a_file_still_traces_and_its_hooks_cost_nothing_per_micro_batch():
    from safeloop.hooks import CallbackList
    from safeloop.report.record import RecordWriter
    from safeloop.run_state import Progress, RunRecord

    progress, record = Progress(), RunRecord()
    writer = RecordWriter(None, progress, record, reporter=None, settings={"clip_grad_norm": 2.0})  # type: ignore[arg-type]
    callbacks = CallbackList(writer.hooks)
    for hook in (
        "on_train_batch_start",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_train_batch_end",
    ):
        callbacks.call(hook)  # skipped: the hooks object has no such method (no call per micro-batch)
        assert not hasattr(writer.hooks[0], hook)
    progress.global_step = 5
    record.history.append(records.entry(5, 1.0))
    writer.log(
        record.history[-1], {"grad_norm/0.weight": 0.5, "update_ratio/0.weight": 1e-3, "baseline_loss": 2}
    )
    callbacks.call("on_validation_end", 0.75)
    assert record.trace.names == {"grad_norms": ["0.weight"], "update_ratios": ["0.weight"]}
    assert record.trace.evals == [(5, 0.75, 1, 0)] and record.trace.settings == {"clip_grad_norm": 2.0}
    assert writer.path is None
