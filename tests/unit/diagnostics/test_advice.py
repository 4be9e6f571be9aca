"""Learning-rate advice checked against the run's record (a rate that trained after a rollback)."""

from __future__ import annotations

from safeloop.diagnostics.advice import check_lr_advice, trained_rate
from safeloop.results import Event, Finding
from safeloop.run_state import RunRecord

HIGH = Finding("lr-too-high", "warning", "ratio 0.7", (), 20, "Multiply the learning rate by about 1e-03")
PLATEAU_LR = Finding("loss-plateau", "warning", "... most likely first: 1) lr-too-high: ratio", (), 90, "x")
PLATEAU_OTHER = Finding("loss-plateau", "warning", "... most likely first: 1) dead-units: ...", (), 90, "y")
DEAD = Finding("dead-units", "warning", "rows", ("0.weight",), 30, "Use LeakyReLU.")


def _record(
    after: list[float], lr_before: float = 0.3, lr_after: float = 0.15, rollbacks: int = 1
) -> RunRecord:
    record = RunRecord()
    record.history = [{"step": 10 * i, "loss": 1e9, "rollbacks": 0} for i in range(1, 4)]
    record.history += [{"step": 10 * i, "loss": v, "rollbacks": rollbacks} for i, v in enumerate(after, 1)]
    record.rollbacks = rollbacks
    record.events = [
        Event("rollback", 0, {"reason": "loss-spike"}),
        Event("lr_scale", 0, {"lr_before": [lr_before], "lr_after": [lr_after], "total_scale": 0.5}),
    ]
    return record


def test_a_rate_that_trained_after_a_rollback_bounds_every_suggestion_that_lowers_the_rate():
    record = _record([2.66, 0.24, 0.16, 0.18])
    trained = trained_rate(record)
    assert trained is not None and (trained.lr, trained.diverged_at, trained.loss_from, trained.loss_to) == (
        0.15,
        0.3,
        2.66,
        0.18,
    )
    revised = check_lr_advice([HIGH, DEAD, PLATEAU_LR, PLATEAU_OTHER], record)
    expected = (
        "Use a learning rate between 0.15 and 0.3: this run trained at 0.15 after its rollback to step 0"
    )
    assert revised[0].suggestion.startswith(expected) and revised[2].suggestion.startswith(expected)
    assert "logged loss 2.66 to 0.18" in revised[0].suggestion
    assert "`trainer.find_lr(min_lr=" in revised[0].suggestion  # the range test to pin it
    assert revised[1] == DEAD and revised[3] == PLATEAU_OTHER  # advice that does not lower the rate
    assert revised[0].message == HIGH.message


def test_no_rollback_or_a_rate_that_did_not_train_leaves_the_advice():
    stuck = _record([1.61, 1.60, 1.62])  # at chance after the rollback: nothing shown to work
    assert trained_rate(stuck) is None and check_lr_advice([HIGH], stuck) == [HIGH]
    fresh = RunRecord()
    fresh.history = [{"step": 10, "loss": 2.0, "rollbacks": 0}, {"step": 20, "loss": 1.0, "rollbacks": 0}]
    assert trained_rate(fresh) is None and check_lr_advice([HIGH], fresh) == [HIGH]
    one_entry = _record([2.0])
    assert trained_rate(one_entry) is None


def test_the_last_rollback_counts():
    record = _record([3.0, 1.0], rollbacks=2)
    record.events += [
        Event("rollback", 40, {"reason": "nonfinite"}),
        Event("lr_scale", 40, {"lr_before": [0.15], "lr_after": [0.075], "total_scale": 0.25}),
    ]
    trained = trained_rate(record)
    assert trained is not None and (trained.lr, trained.diverged_at, trained.step) == (0.075, 0.15, 40)
