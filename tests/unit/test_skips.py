"""The skip handler on hand-made step values: one entry point, steps taken in order."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from safeloop.config import TrainerConfig
from safeloop.errors import NonFiniteError
from safeloop.findings import Reporter
from safeloop.hooks import CallbackList
from safeloop.metrics import StepValues
from safeloop.rollback import DivergencePolicy
from safeloop.run_state import Progress, RunRecord
from safeloop.skips import SkipHandler
from tests.helpers.models import mlp

APPLIED = StepValues(loss=math.nan, grad_norm=math.nan, finite=True)
SKIPPED = StepValues(loss=math.nan, grad_norm=1.0, finite=False)
OVERFLOW = StepValues(loss=0.5, grad_norm=math.inf, finite=False, overflow=True)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def on_skip(self, trainer, event) -> None:
        self.calls.append(("on_skip", event.step))

    def on_finding(self, trainer, finding) -> None:
        self.calls.append(("on_finding", finding.code))


def handler(*, policy: str = "skip", limit: int = 1, rollback: bool = True):
    progress, record = Progress(), RunRecord()
    recorder = Recorder()
    reporter = Reporter(Accelerator(cpu=True), progress, record, CallbackList([recorder]))
    config = TrainerConfig(max_consecutive_skips=limit)
    skips = SkipHandler(
        policy=policy,
        max_consecutive_skips=limit,
        param_names=["0.weight", "0.bias", "2.weight", "2.bias"],
        history_steps=10,
        accumulation=1,
        model=mlp(),
        loss_of=lambda model, batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1]),
        record=record,
        reporter=reporter,
        divergences=DivergencePolicy(config, progress, reporter, rollback_enabled=rollback),
    )
    return skips, progress, record, recorder


def test_steps_are_taken_in_order_so_an_applied_step_between_two_skips_ends_the_run():
    skips, progress, record, recorder = handler(limit=1)
    progress.global_step = 3
    # skip, applied, skip: two runs of one skip each, none past max_consecutive_skips=1
    assert skips.learn(3, [SKIPPED, APPLIED, SKIPPED]) is None
    assert (record.skipped_steps, skips.tracker.consecutive) == (2, 1)
    assert [e.step for e in record.events_of("skip")] == [1, 3]
    assert [c for c in recorder.calls if c[0] == "on_skip"] == [("on_skip", 1), ("on_skip", 3)]
    # one more skip in a row makes the run two long: a divergence that starts at step 3
    progress.global_step = 4
    divergence = skips.learn(4, [SKIPPED])
    assert divergence is not None
    assert (divergence.reason, divergence.start_step, divergence.step) == ("nonfinite", 3, 4)
    assert divergence.detail == {"consecutive": 2}


def test_scaler_overflows_are_counted_apart_and_never_escalate():
    skips, _, record, _ = handler(limit=0)
    assert skips.learn(4, [OVERFLOW, OVERFLOW, APPLIED, OVERFLOW]) is None
    assert (record.overflow_skips, record.skipped_steps, skips.tracker.consecutive) == (3, 0, 0)
    assert record.events == []


def test_without_rollback_a_run_past_the_limit_raises_with_every_finding():
    skips, progress, record, _ = handler(limit=1, rollback=False)
    progress.global_step = 2
    with pytest.raises(
        NonFiniteError, match=r"2 optimizer steps in a row .* `max_consecutive_skips=1`"
    ) as caught:
        skips.learn(2, [SKIPPED, SKIPPED])
    assert record.skipped_steps == 2
    assert [f.code for f in caught.value.findings] == ["nonfinite-loss"]


def test_the_raise_policy_raises_at_the_first_skip_and_records_no_skip_event():
    skips, _, record, recorder = handler(policy="raise", limit=5)
    values = StepValues(loss=0.25, grad_norm=math.inf, finite=False, bad_params=(2,))
    with pytest.raises(NonFiniteError, match=r"step 7: the gradients of 2.weight went non-finite"):
        skips.learn(7, [values])
    assert record.events == [] and record.skipped_steps == 0
    assert ("on_finding", "nonfinite-grad") in recorder.calls


def test_a_skipped_steps_batch_is_replayed_until_a_rollback_drops_the_kept_batches():
    batch = (torch.full((2, 8), math.nan), torch.zeros(2, dtype=torch.long))
    replayed, _, record, _ = handler(limit=3)
    replayed.remember(5, 0, batch)
    replayed.learn(5, [SKIPPED])
    assert record.events_of("skip")[0].detail["origin"]["kind"] == "input"
    assert not replayed.healthy

    dropped, _, record, _ = handler(limit=3)
    dropped.remember(5, 0, batch)
    dropped.learn(4, [SKIPPED])
    dropped.after_rollback()
    assert dropped.healthy
    dropped.learn(5, [SKIPPED])
    assert "origin" not in record.events_of("skip")[1].detail
