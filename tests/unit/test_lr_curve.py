"""The range test's curve on made-up points: spacing, smoothing, rules and verdicts."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from safeloop.lr_finder.curve import DebiasedEma, judge, log_spaced, suggest


def _curve(lrs, loss_at, noise=0.0, seed=0, beta=0.9):
    rng = random.Random(seed)
    raw = [loss_at(lr) + rng.gauss(0, noise) for lr in lrs]
    ema = DebiasedEma(beta)
    return raw, [ema.add(v) for v in raw]


def _u_shape(best_lr: float, floor: float = 0.5, start: float = 2.0):
    """A loss that falls from `start` to `floor` towards `best_lr`, then blows up past it."""

    def loss(lr: float) -> float:
        x = math.log10(lr / best_lr)
        return floor + (start - floor) / (1 + math.exp(4 * (x + 1.5))) + (10 * x * x if x > 0 else 0)

    return loss


def test_log_spaced_starts_and_ends_exactly_and_is_even_in_log():
    lrs = log_spaced(1e-7, 10.0, 100)
    assert lrs[0] == 1e-7 and lrs[-1] == 10.0 and len(lrs) == 100
    steps = [math.log(b / a) for a, b in itertools.pairwise(lrs)]
    assert max(steps) == pytest.approx(min(steps), rel=1e-9)


def test_the_debiased_average_has_no_start_up_bias():
    ema = DebiasedEma(0.98)
    assert ema.add(3.0) == pytest.approx(3.0)
    assert all(ema.add(3.0) == pytest.approx(3.0) for _ in range(50))
    plain = DebiasedEma(0.0)
    assert [plain.add(v) for v in (1.0, 5.0)] == [1.0, 5.0]


@pytest.mark.parametrize("best_lr", [1e-3, 3e-2, 0.5])
def test_the_minimum_rule_lands_a_decade_below_the_lowest_loss(best_lr):
    lrs = log_spaced(1e-7, 10.0, 100)
    raw, smoothed = _curve(lrs, _u_shape(best_lr), noise=0.01)
    cut = next((i for i, s in enumerate(smoothed) if i and s > 4 * min(smoothed[:i])), len(lrs))
    found = suggest(lrs[:cut], smoothed[:cut])
    lowest = min(range(10, cut), key=smoothed.__getitem__)
    assert found["minimum"] == pytest.approx(lrs[lowest] / 10)
    assert best_lr / 30 < found["minimum"] < best_lr * 3
    assert found["steepest"] is not None and found["steepest"] < lrs[lowest]
    assert (
        judge(lrs[:cut], raw[:cut], smoothed[:cut], stopped_early=True, baseline=None, smoothing=0.9) is None
    )


def test_a_flat_curve_does_not_respond():
    lrs = log_spaced(1e-7, 10.0, 100)
    raw, smoothed = _curve(lrs, lambda lr: 1.0986, noise=0.002)
    verdict = judge(lrs, raw, smoothed, stopped_early=False, baseline=None, smoothing=0.9)
    assert verdict is not None and verdict.code == "no-response"
    assert "does not respond" in verdict.message


def test_a_curve_that_never_beats_the_constant_prediction_does_not_respond():
    lrs = log_spaced(1e-7, 10.0, 100)
    # a fall of 6% (from a poor start down to the constant prediction) inside a scatter of 0.2
    raw = [1.0 + 0.06 / (1 + lr * 1e4) + 0.1 * (-1) ** i for i, lr in enumerate(lrs)]
    ema = DebiasedEma(0.9)
    smoothed = [ema.add(v) for v in raw]
    verdict = judge(lrs, raw, smoothed, stopped_early=False, baseline=1.0, smoothing=0.9)
    assert verdict is not None and verdict.code == "no-response"
    assert "best constant prediction (1" in verdict.message
    # without a baseline the same curve is noise; with a baseline it is well below, still noise
    for baseline in (None, 1.5):
        verdict = judge(lrs, raw, smoothed, stopped_early=False, baseline=baseline, smoothing=0.9)
        assert verdict is not None and verdict.code == "noise"


def test_a_small_fall_in_big_scatter_is_noise():
    # the smoothed minimum of pure noise sits below the start by chance (it is a minimum): the rule
    # calls about 9 curves in 10 noise; these 10 seeds give 9
    lrs = log_spaced(1e-7, 10.0, 100)
    codes = []
    for seed in range(10):
        raw, smoothed = _curve(lrs, lambda lr: 2.0 - 0.02 * (lr > 1e-2), noise=0.4, seed=seed)
        verdict = judge(lrs, raw, smoothed, stopped_early=False, baseline=None, smoothing=0.9)
        codes.append(None if verdict is None else verdict.code)
    assert codes.count("noise") >= 8 and set(codes) <= {"noise", None}
    # the same scatter ending in a blow-up did respond: the suggestion stands
    raw, smoothed = _curve(lrs, lambda lr: 2.0 - 0.02 * (lr > 1e-2), noise=0.4, seed=0)
    assert judge(lrs, raw, smoothed, stopped_early=True, baseline=None, smoothing=0.9) is None


def test_a_sweep_that_blows_up_at_once_has_no_descent():
    lrs = log_spaced(1.0, 1e4, 100)[:6]
    raw = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    verdict = judge(lrs, raw, raw, stopped_early=True, baseline=None, smoothing=0.9)
    assert verdict is not None and verdict.code == "no-descent" and "min_lr" in verdict.message


def test_a_loss_that_only_rises_has_no_descent_and_asks_for_a_lower_start():
    lrs = log_spaced(1e-2, 10.0, 40)
    raw, smoothed = _curve(lrs, lambda lr: 1.0 + lr, noise=0.001)
    verdict = judge(lrs, raw, smoothed, stopped_early=True, baseline=None, smoothing=0.9)
    assert verdict is not None and verdict.code in ("no-descent", "no-response")
    assert verdict.code != "no-descent" or "min_lr=" in verdict.message


def test_a_shallow_dip_before_a_rise_is_a_response_not_a_flat_curve():
    # the loss barely dips (1.5%) before the rate is too high, then rises well above its start
    # without reaching the stop factor (the sweep ran to max_lr): it responded to the rate
    lrs = log_spaced(1e-7, 10.0, 100)
    raw, smoothed = _curve(lrs, lambda lr: 1.39 - 0.03 * (0.05 < lr < 0.5) + 1.2 * (lr >= 0.5), noise=0.02)
    assert judge(lrs, raw, smoothed, stopped_early=False, baseline=1.386, smoothing=0.9) is None
    assert 0.005 < suggest(lrs, smoothed)["minimum"] < 0.05
