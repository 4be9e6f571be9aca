"""The rules on host values: no-learning, the label mix, the train/eval gap, an oscillating loss."""

from __future__ import annotations

import math
import random

import torch

from safeloop.diagnostics.baseline import Baseline
from safeloop.diagnostics.labels import check_label_mix, check_train_eval_gap, eval_targets
from safeloop.diagnostics.no_learning import NoLearning
from safeloop.diagnostics.oscillation import Oscillation
from safeloop.diagnostics.updates import Cause

BASELINE = Baseline(1.6094, "the entropy of the class frequencies (5 of 5 classes seen)", 256)


def _feed(rule: NoLearning, levels: list[float], noise: float = 0.02, seed: int = 0) -> int | None:
    """Feed one log check per level (10 noisy steps each); the step of the first True, if any."""
    rng = random.Random(seed)
    for check, level in enumerate(levels, 1):
        if rule.update(10 * check, [level + rng.gauss(0, noise) for _ in range(10)]):
            return 10 * check
    return None


def _no_learning() -> NoLearning:
    rule = NoLearning(window=10)
    rule.baseline = BASELINE
    return rule


def test_a_loss_at_the_baseline_with_a_slight_drift_is_no_learning():
    levels = [1.62 - 0.0004 * i for i in range(40)]  # memorising: 1% of the baseline in 40 checks
    rule = _no_learning()
    step = _feed(rule, levels)
    assert step == 210  # two windows of 10 checks, then two checks in a row
    finding = rule.finding(step, [], [])
    assert finding.code == "no-learning" and finding.severity == "warning"
    assert "of the baseline loss 1.609" in finding.message and "256 targets" in finding.message
    assert "do not predict the targets" in finding.message


def test_a_loss_above_the_baseline_is_no_learning_and_causes_are_ranked():
    rule = _no_learning()
    assert _feed(rule, [2.4] * 30) == 210
    causes = [Cause(5, "lr-too-high", "median update-to-weight ratio 0.3", ("w",), "Lower the lr.")]
    finding = rule.finding(210, causes, [], eval_loss=2.5)
    assert "1) lr-too-high: median update-to-weight ratio 0.3" in finding.message
    assert "last eval loss is 2.5" in finding.message and finding.suggestion == "Lower the lr."


def test_a_hard_task_descending_slowly_from_the_baseline_is_learning():
    levels = [1.61 - 0.003 * i for i in range(60)]  # 1.9% of the baseline per window
    assert _feed(_no_learning(), levels) is None


def test_a_run_below_the_baseline_from_the_start_is_learning():
    assert _feed(_no_learning(), [0.4] * 60) is None  # fine-tuning a pretrained model


def test_no_baseline_or_a_zero_one_judges_nothing():
    rule = NoLearning(window=10)
    assert _feed(rule, [2.0] * 40) is None
    rule.baseline = Baseline(0.0, "one class", 64)
    assert _feed(rule, [2.0] * 40) is None


def test_a_restart_forgets_the_abandoned_branch():
    rule = _no_learning()
    assert _feed(rule, [1.6] * 20) is None  # one check short of the streak
    rule.restart()
    assert _feed(rule, [1.6] * 20) is None  # counted again from the restored state


def test_an_eval_loss_that_never_left_the_baseline():
    rule = _no_learning()
    _feed(rule, [1.2] * 10)  # the train loss memorises, below the baseline
    assert not rule.update_eval(100, 1.7)
    assert rule.update_eval(116, 1.65)
    finding = rule.finding(116, [], [])
    assert "eval loss stayed at 1.65 or above over 2 evaluations" in finding.message
    assert (
        "while the train loss is 1.1" in finding.message or "while the train loss is 1.2" in finding.message
    )


def test_an_eval_loss_that_was_low_before_overfitting_is_not_no_learning():
    rule = _no_learning()
    _feed(rule, [0.3] * 10)
    assert not rule.update_eval(100, 0.9)
    assert not rule.update_eval(200, 1.8)  # overfit late: the best eval was far below the baseline
    assert not rule.update_eval(300, 2.1)


def test_one_class_and_a_mix_apart():
    one = check_label_mix(torch.tensor([0.0, 64.0, 0.0]), None, batches=8)
    assert [f.code for f in one] == ["label-distribution"]
    assert "All 64 training targets in the first 8 batches are class 1 (of 3 classes" in one[0].message
    apart = check_label_mix(torch.tensor([50.0, 50.0, 0.0, 0.0]), torch.tensor([0.0, 5.0, 45.0, 50.0]), 8)
    assert len(apart) == 1 and "are 95% apart" in apart[0].message
    assert "eval class 3 50%, class 2 45%, class 1 5%" in apart[0].message
    assert apart[0].params == ("train labels", "eval labels")


def test_one_class_is_a_warning_only_where_a_rare_class_cannot_explain_it():
    assert check_label_mix([0.0, 64.0, 0.0], None, 8)[0].severity == "info"  # rarer than 4.7%?
    assert "below 4.7% of the samples" in check_label_mix([0.0, 64.0, 0.0], None, 8)[0].message
    assert check_label_mix([1024.0, 0.0], None, 32)[0].severity == "warning"
    eval_spread = check_label_mix([256.0, 0.0, 0.0, 0.0, 0.0], [60.0, 60.0, 60.0, 60.0, 60.0], 8)
    assert [f.severity for f in eval_spread] == ["warning", "warning"]  # one class, and the mix apart
    assert "while 80% of the first eval targets are other classes" in eval_spread[0].message
    fraud = check_label_mix([256.0, 0.0], [297.0, 3.0], 8)  # 1% positives: none in 256 is likely
    assert [f.severity for f in fraud] == ["info"]


def test_a_random_split_and_small_samples_raise_nothing():
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 10, (256,), generator=gen)
    train, held = torch.bincount(labels[:128], minlength=10), torch.bincount(labels[128:], minlength=10)
    assert check_label_mix(train.double(), held.double(), 4) == []
    assert check_label_mix(torch.tensor([0.0, 20.0]), torch.tensor([20.0, 0.0]), 2) == []  # < 32 targets
    # 100 classes, 64 eval targets: two samples of one set are far apart by chance alone
    many = torch.randint(0, 100, (320,), generator=gen)
    train100, held100 = torch.bincount(many[:256], minlength=100), torch.bincount(many[256:], minlength=100)
    assert check_label_mix(train100.tolist(), held100.tolist(), 8) == []


def test_train_eval_gap():
    gap = check_train_eval_gap(300, 0.004, 5.4, 1.609)
    assert gap is not None and gap.code == "train-eval-gap"
    assert (
        "train loss is 0.004 and the eval loss 5.4" in gap.message
        and "at or above the baseline" in gap.message
    )
    overfit = check_train_eval_gap(300, 0.05, 1.4, 2.303)
    assert overfit is not None and "overfitting" in overfit.message
    assert check_train_eval_gap(300, 0.30, 0.45, 1.609) is None  # a normal gap
    assert (
        check_train_eval_gap(300, 0.01, 0.5, 1.609) is None
    )  # far apart in ratio, small against the baseline
    assert check_train_eval_gap(300, math.nan, 0.5, 1.609) is None


def test_eval_targets_by_the_batch_conventions():
    labels = torch.tensor([1, 2])
    assert eval_targets((torch.zeros(2, 3), labels)) is labels
    assert eval_targets({"input_ids": torch.zeros(2, 3), "labels": labels}) is labels
    assert eval_targets((torch.zeros(2, 3), torch.zeros(2))) is None  # regression targets
    assert eval_targets([torch.zeros(2, 3)]) is None


def _oscillation_run(levels: list[float], ratio: float, noise: float = 0.05, seed: int = 0):
    rule, rng = Oscillation(window=10), random.Random(seed)
    for check, level in enumerate(levels, 1):
        losses = [level + rng.gauss(0, noise) for _ in range(10)]
        finding = rule.check(10 * check, losses, ratio, {"a.weight": ratio * 2, "b.weight": ratio}, 0.1)
        if finding is not None:
            return finding
    return None


def test_a_loss_bouncing_above_its_best_at_large_updates_is_lr_too_high():
    levels = [3.0, 2.0, 1.4, 1.0, 0.9, 0.9, 0.95, 1.0, 1.05, 1.0, 1.1, 1.15, 1.2, 1.1, 1.2, 1.25, 1.2, 1.2]
    finding = _oscillation_run(levels, ratio=0.02)
    assert finding is not None and finding.code == "lr-too-high"
    assert (
        "% above its best 0.9" in finding.message
        and "ratio ||dw||/||w|| is 0.02 at lr 0.1" in finding.message
    )
    assert "between 0.01 and 0.033" in finding.suggestion and finding.params[0] == "a.weight"


def test_small_updates_or_a_loss_near_its_best_are_no_oscillation():
    bouncing = [3.0, 2.0, 1.4, 1.0, 0.9, 0.9, 0.95, 1.0, 1.05, 1.0, 1.1, 1.15, 1.2, 1.1, 1.2, 1.25, 1.2, 1.2]
    assert _oscillation_run(bouncing, ratio=0.003) is None  # a normal update size
    noisy = [3.0, 2.0, 1.4, 1.0] + [0.9] * 30  # a noisy loss at its level
    assert _oscillation_run(noisy, ratio=0.05, noise=0.2) is None


def test_no_verdict_while_the_learning_rate_still_rises():
    rule, rng = _no_learning(), random.Random(0)
    for check in range(1, 41):  # a linear warm-up over the whole run: the loss barely moves
        losses = [1.61 + rng.gauss(0, 0.02) for _ in range(10)]
        assert not rule.update(10 * check, losses, lr=1e-5 * check)
    bouncing = [3.0, 2.0, 1.4, 1.0, 0.9, 0.9, 0.95, 1.0, 1.05, 1.0, 1.1, 1.15, 1.2, 1.1, 1.2, 1.25, 1.2, 1.2]
    osc, rng = Oscillation(window=10), random.Random(0)
    for check, level in enumerate(bouncing, 1):  # a warm restart every check: the rate rises again
        lr = 0.1 if check % 2 else 0.05
        losses = [level + rng.gauss(0, 0.05) for _ in range(10)]
        assert osc.check(10 * check, losses, 0.02, {"a.weight": 0.04}, lr) is None
