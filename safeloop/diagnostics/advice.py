"""Learning-rate advice checked against the run that gave it.

A finding's suggested learning rate comes from a rule of thumb (an update-to-weight ratio near
1e-3, a few times lower than a rate that oscillates). The run itself may show better: after a
rollback halved the rate, the loss went down. A suggestion below that rate is then contradicted by
the run (``examples/divergence.py``: "from 0.3 to about 0.0003" while 0.15 trained the loss to
0.18). At the end of ``fit`` every learning-rate suggestion is rewritten as a range that starts at
the rate that trained. Host side, from the run's record only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from safeloop.diagnostics.updates import find_lr_hint
from safeloop.results import Finding
from safeloop.run_state import RunRecord

__all__ = ["TrainedRate", "trained_rate", "check_lr_advice", "TRAINED_DROP"]

# "Trained": the logged loss after the last rollback ended at least 10% below where it started.
TRAINED_DROP = 0.1


@dataclass(frozen=True)
class TrainedRate:
    """A learning rate the run trained at after a rollback.

    Attributes:
        lr (`float`): the first param group's rate after the last rollback.
        diverged_at (`float`): the rate it diverged at before.
        step (`int`): the step the run was rolled back to.
        loss_from (`float`): the first logged loss after the rollback.
        loss_to (`float`): the last logged loss.
    """

    lr: float
    diverged_at: float
    step: int
    loss_from: float
    loss_to: float


def trained_rate(record: RunRecord) -> TrainedRate | None:
    """The rate after the last rollback, if the loss then went down; None otherwise."""
    scales = record.events_of("lr_scale")
    if not scales or record.rollbacks == 0:
        return None
    last = scales[-1].detail
    after = [h for h in record.history if h.get("rollbacks") == record.rollbacks and "loss" in h]
    losses = [float(h["loss"]) for h in after]
    if len(losses) < 2 or not all(math.isfinite(v) for v in losses):
        return None
    if not losses[-1] < (1 - TRAINED_DROP) * losses[0]:
        return None
    lr_after, lr_before = last.get("lr_after") or [], last.get("lr_before") or []
    if not lr_after or not lr_before:
        return None
    return TrainedRate(float(lr_after[0]), float(lr_before[0]), scales[-1].step, losses[0], losses[-1])


def _lowers_the_rate(finding: Finding) -> bool:
    """A finding whose fix lowers the learning rate: lr-too-high, or one that ranks it first."""
    if finding.code == "lr-too-high":
        return True
    return (
        finding.code in ("loss-plateau", "no-learning")
        and "most likely first: 1) lr-too-high" in finding.message
    )


def check_lr_advice(findings: Sequence[Finding], record: RunRecord) -> list[Finding]:
    """The findings, with every suggestion to lower the learning rate checked against the run.

    Args:
        findings (`Sequence[Finding]`): the run's findings.
        record (`RunRecord`): its history and rollback events.

    Returns:
        `list[Finding]`: the same findings; where the run trained at a rate after a rollback, the
        suggestion of those that lower the rate gives a range starting at that rate.
    """
    trained = trained_rate(record)
    if trained is None:
        return list(findings)
    advice = (
        f"Use a learning rate between {trained.lr:.3g} and {trained.diverged_at:.3g}: this run trained at "
        f"{trained.lr:.3g} after its rollback to step {trained.step} (logged loss {trained.loss_from:.3g} "
        f"to {trained.loss_to:.3g}) and diverged at {trained.diverged_at:.3g}. Start from {trained.lr:.3g}, "
        f"with warm-up and gradient clipping; {find_lr_hint(trained.diverged_at, too_high=True)}."
    )
    return [dataclasses.replace(f, suggestion=advice) if _lowers_the_rate(f) else f for f in findings]
