"""The record's format, its reader and the lineage it is assembled into (no training, no drawing)."""

from __future__ import annotations

import json
import math

import pytest

from safeloop.report.data import assemble, records_from_memory
from safeloop.report.format import FORMAT_VERSION, dump_line, log_line
from safeloop.report.reading import RecordError, find_record, read_lines, read_run
from tests.unit.report import records


def test_a_log_line_is_json_with_the_version_and_non_finite_values_and_gaps():
    line = log_line(
        records.entry(10, float("nan")), grad_norms=[1.5, None, float("inf")], update_ratios=[1e-7]
    )
    value = json.loads(line)
    assert line.endswith("}\n") and value["v"] == FORMAT_VERSION and value["type"] == "log"
    assert math.isnan(value["loss"]) and value["grad_norms"][:2] == [1.5, None]
    assert value["grad_norms"][2] == math.inf and value["update_ratios"] == [1e-7]


def test_the_live_run_its_abandoned_branch_and_its_events_are_told_apart(tmp_path):
    data = read_run(records.write(tmp_path, records.eventful_run()))
    assert [e["step"] for e in data.history] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [e["rollbacks"] for e in data.history] == [0, 0, 0, 1, 1, 1, 1, 1]
    (branch,) = data.branches
    assert (branch.kind, branch.at, branch.detected_at, branch.number) == ("rollback", 15, 25, 1)
    assert [e["step"] for e in branch.entries] == [20, 25] and branch.entries[1]["loss"] == 1e6
    assert branch.grad_norms.steps == [20, 25] and data.grad_norms.steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [e["kind"] for e in data.events] == ["reinit", "skip", "rollback", "lr_scale", "preempt"]
    assert data.evals == [(32, 0.9)] and data.status == "preempted" and data.baseline_loss == 2.5
    assert [f["severity"] for f in data.findings] == ["error", "warning", "info"]  # most severe first
    assert data.settings["clip_grad_norm"] == 1.0 and not data.notes


def test_a_killed_runs_cut_last_line_is_skipped_and_the_record_read_up_to_its_last_log_step(tmp_path):
    lines = records.eventful_run()[:9]  # up to the log line of step 25
    cut = records.log(30, 0.5)[:37]  # killed while writing the next one
    data = read_run(records.write(tmp_path, lines, tail=cut))
    assert data.history[-1]["step"] == 25 and data.status is None
    assert any("was cut" in note and "step 25" in note for note in data.notes)
    assert any("no end line" in note for note in data.notes)


def test_a_cut_line_that_a_resumed_run_closed_is_skipped_too(tmp_path):
    lines = [records.fit(), records.layers(), records.log(5, 2.0), records.log(10, 1.0)]
    resumed = [
        records.fit(5, "run/step-00000005"),
        records.layers(),
        records.log(10, 1.1),
        records.log(15, 0.9),
    ]
    data = read_run(records.write(tmp_path, [*lines, records.log(15, 0.8)[:20] + "\n", *resumed]))
    assert [e["step"] for e in data.history] == [5, 10, 15]
    assert data.history[1]["loss"] == 1.1  # the resumed run's step 10, not the abandoned one
    (branch,) = data.branches
    assert (branch.kind, branch.at, [e["step"] for e in branch.entries]) == ("resume", 5, [10])
    assert any("cut" in note for note in data.notes) and any(
        "resumed at step 5" in note for note in data.notes
    )


def test_a_new_run_from_step_0_in_the_same_folder_sets_the_earlier_one_aside(tmp_path):
    lr_find = dump_line("lr_find", {"lrs": [1e-3], "losses": [1.0], "suggestion": 1e-3})
    lines = [
        records.fit(),
        records.log(5, 9.0),
        records.log(10, 8.0),
        lr_find,
        records.fit(),
        records.log(5, 1.0),
    ]
    data = read_run(records.write(tmp_path, lines))
    assert [e["loss"] for e in data.history] == [1.0] and not data.branches
    assert data.lr_find is not None and data.lr_find["suggestion"] == 1e-3  # run after the earlier one's end
    assert any("earlier run" in note for note in data.notes)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"v":1,"type":"fit","step":0}\nnot json\n{"v":1,"type":"log","step":5}\n', "line 2 is not JSON"),
        ('{"v":1,"type":"fit","step":0}\n{"v":2,"type":"log","step":5}\n', "format version 2"),
        ('[1, 2]\n{"v":1,"type":"fit","step":0}\n', "not a record line"),
        ("", "holds no record line"),
    ],
)
def test_damaged_records_and_newer_formats_are_refused_with_what_and_where(tmp_path, text, expected):
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    with pytest.raises(RecordError, match=expected) as error:
        read_lines(path)
    assert str(path) in str(error.value)


def test_a_folder_without_a_record_says_where_the_record_comes_from(tmp_path):
    with pytest.raises(RecordError, match=r"metrics\.jsonl is missing.*checkpoint_dir"):
        find_record(tmp_path)
    with pytest.raises(RecordError, match="does not exist"):
        find_record(tmp_path / "nowhere")
    records.write(tmp_path, [records.fit()])
    (tmp_path / "step-00000010").mkdir()
    with pytest.raises(RecordError, match="one checkpoint, not a run"):
        find_record(tmp_path / "step-00000010")


def test_a_fit_result_in_memory_puts_each_rollback_before_the_entries_logged_after_it():
    history = [records.entry(s, 1.0, rollbacks=r) for s, r in ((5, 0), (10, 0), (15, 0), (10, 1), (15, 1))]
    events = [
        {"kind": "skip", "step": 12, "detail": {}},
        {"kind": "rollback", "step": 5, "detail": {"rollback": 1, "detected_at": 15, "reason": "nonfinite"}},
    ]
    lines = records_from_memory(
        history=history, events=events, findings=[], global_step=15, status="completed", eval_loss=0.5,
        baseline_loss=None,
    )  # fmt: skip
    data = assemble(lines, source="memory")
    assert [e["step"] for e in data.history] == [5, 10, 15] and data.history[-1]["rollbacks"] == 1
    assert [e["step"] for e in data.branches[0].entries] == [10, 15]
    assert [e["step"] for e in data.abandoned_events] == [12] and data.evals == [(15, 0.5)]
