"""The gradient noise scale's arithmetic, the probe's bookkeeping and the batch-size advice."""

from __future__ import annotations

import collections
import math

import pytest
import torch

from safeloop.diagnostics.noise_scale import (
    MIN_STEPS,
    NoiseScale,
    NoiseScaleEstimate,
    NoiseScaleProbe,
    batch_size_finding,
    split_halves,
    two_sizes,
)


def _expected_squares(gradient: float, trace: float, batch: int) -> float:
    """E|G_B|^2 = |G|^2 + tr(S) / B: what a batch of ``batch`` samples measures on average."""
    return gradient + trace / batch


@pytest.mark.parametrize(("small", "large"), [(8, 32), (16, 32), (1, 1024), (64, 65)])
@pytest.mark.parametrize(("gradient", "trace"), [(1.0, 40.0), (0.01, 3.0), (250.0, 1e5)])
def test_exact_squared_norms_give_the_exact_noise_scale(small, large, gradient, trace):
    scale = NoiseScale(small, large, batch_size=large)
    values = [_expected_squares(gradient, trace, small), _expected_squares(gradient, trace, large), 1.0]
    for step in range(1, MIN_STEPS + 5):
        scale.update(step, values)
    assert scale.value == pytest.approx(trace / gradient, rel=1e-9)


def test_the_estimate_waits_for_enough_steps_and_a_positive_gradient_term():
    scale = NoiseScale(8, 32, batch_size=32)
    good = [_expected_squares(1.0, 40.0, 8), _expected_squares(1.0, 40.0, 32), 1.0]
    for step in range(1, MIN_STEPS):
        assert scale.update(step, good) is None  # too few steps
    assert scale.update(MIN_STEPS, good) == pytest.approx(40.0)
    assert (scale.first, scale.first_step) == (pytest.approx(40.0), MIN_STEPS)
    # noise alone (the small batch's squared norm 4x the large one's): |G|^2 < 0, no estimate
    noisy = NoiseScale(8, 32, batch_size=32)
    for step in range(1, 3 * MIN_STEPS):
        noisy.update(step, [4.0, 1.0, 1.0])
    assert noisy.value is None and noisy.estimate() is None


def test_interval_sums_are_weighted_by_their_step_count():
    # 10 steps read at once weigh as 10 single steps (inside the interval they weigh alike)
    at_once, one_by_one = NoiseScale(8, 32, 32), NoiseScale(8, 32, 32)
    rng = torch.Generator().manual_seed(0)
    rows = (torch.rand(40, 2, generator=rng) * torch.tensor([3.0, 1.0])).tolist()
    for start in range(0, 40, 10):
        chunk = rows[start : start + 10]
        at_once.update(start + 10, [sum(r[0] for r in chunk), sum(r[1] for r in chunk), 10.0])
        for offset, row in enumerate(chunk):
            one_by_one.update(start + offset + 1, [row[0], row[1], 1.0])
    assert at_once.steps == one_by_one.steps == 40
    assert at_once._weight == pytest.approx(one_by_one._weight, rel=1e-12)
    assert at_once._gradient == pytest.approx(one_by_one._gradient, rel=0.02)
    assert at_once._trace == pytest.approx(one_by_one._trace, rel=0.02)
    assert at_once.update(50, [0.0, 0.0, 0.0]) == at_once.value  # an empty interval changes nothing


def test_sampled_gradients_recover_a_known_noise_scale():
    # per-sample gradients g ~ N(G, diag(s)): B_simple = sum(s) / |G|^2, here 50
    torch.manual_seed(0)
    dims, small, large = 20, 4, 32
    mean = torch.full((dims,), 0.2)
    spread = torch.full((dims,), 50 * float(mean.square().sum()) / dims)
    scale = NoiseScale(small, large, large)
    for step in range(1, 2001):
        samples = mean + spread.sqrt() * torch.randn(large, dims)
        first, whole = samples[:small].mean(0), samples.mean(0)
        scale.update(step, [float(first.square().sum()), float(whole.square().sum()), 1.0])
    assert scale.value == pytest.approx(50.0, rel=0.15)


def test_the_two_batch_sizes_of_each_mode():
    assert two_sizes(8, 4, 1, "accumulation") == (8, 32)
    assert two_sizes(8, 4, 2, "accumulation") == (8, 64)
    assert two_sizes(16, 1, 2, "ddp") == (16, 32)
    assert two_sizes(16, 1, 1, "split") == (8, 16)
    assert two_sizes(1, 1, 1, "split") is None  # one sample cannot be halved
    assert two_sizes(8, 1, 1, "ddp") is None


Pair = collections.namedtuple("Pair", ["inputs", "targets"])


def test_batches_split_along_their_first_dimension_keeping_their_types():
    x, y = torch.arange(10).reshape(5, 2), torch.arange(5)
    first, second = split_halves({"x": x, "nested": [y, (y,)]})
    assert first["x"].tolist() == x[:2].tolist() and second["nested"][1][0].tolist() == [2, 3, 4]
    first, second = split_halves(Pair(x, y))
    assert isinstance(first, Pair) and first.targets.tolist() == [0, 1]
    assert split_halves((x, torch.arange(4))) is None  # first dimensions differ
    assert split_halves((x, "names")) is None  # not a tensor
    assert split_halves(torch.ones(1, 3)) is None  # one sample


class _Scaler:
    def __init__(self, scale: float) -> None:
        self._scale = torch.tensor(scale)


@pytest.mark.parametrize("scale", [None, 1024.0])
def test_the_first_micro_batch_gradient_is_unscaled_and_undivided(scale):
    weight = torch.nn.Parameter(torch.zeros(3))
    probe = NoiseScaleProbe([weight], "accumulation", 4, None if scale is None else _Scaler(scale))
    probe.see(8)
    gradient = torch.tensor([1.0, 2.0, 2.0])  # |g_1| = 3
    weight.grad = gradient / 4 * (1.0 if scale is None else scale)  # what backward leaves
    probe.after_backward(first=True)
    for _ in range(3):
        probe.see(8)
        probe.after_backward(first=False)
    probe.at_step(torch.tensor(2.0), torch.tensor(1.0))
    assert probe.measurements(torch.device("cpu")).tolist() == pytest.approx([9.0, 4.0, 1.0])


def test_refused_non_finite_and_irregular_windows_are_left_out():
    weight = torch.nn.Parameter(torch.zeros(2))
    probe = NoiseScaleProbe([weight], "accumulation", 2, None)

    def window(sizes, grad, total, ok):
        for index, size in enumerate(sizes):
            probe.see(size)
            weight.grad = torch.tensor(grad)
            probe.after_backward(first=index == 0)
        probe.at_step(torch.tensor(total), None if ok is None else torch.tensor(ok))

    window([8, 8], [0.5, 0.0], 1.0, 1.0)  # kept: small 4 * 0.25 = 1, large 1
    window([8, 8], [0.5, 0.0], 1.0, 0.0)  # refused by the guard
    window([8, 8], [math.nan, 0.0], 1.0, None)  # non-finite, no guard
    window([8, 8], [0.5, 0.0], math.inf, 1.0)  # an fp16 overflow
    window([8], [0.5, 0.0], 1.0, 1.0)  # a short last window
    window([8, 5], [0.5, 0.0], 1.0, 1.0)  # a smaller last batch
    assert probe.measurements(torch.device("cpu")).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert probe.measurements(torch.device("cpu")).tolist() == [0.0, 0.0, 0.0]  # read once


def _estimate(value: float, batch: int, first: float | None = None) -> NoiseScaleEstimate:
    return NoiseScaleEstimate(
        value=value, samples=1000 * batch, steps=1000, batch_size=batch, first=first, first_step=20
    )


def test_a_small_batch_is_told_how_many_fewer_steps_a_larger_one_needs():
    finding = batch_size_finding(_estimate(650.0, 32, first=120.0), step=1000)
    assert finding.code == "batch-size" and finding.severity == "warning"  # 20x below
    assert "Batch 32 is about 1/20 of the measured gradient noise scale (~650)" in finding.message
    assert "~10.7x fewer steps" in finding.message  # (1 + 650/32) / 2
    assert "~120 at step 20" in finding.message and "grows as the loss falls" in finding.message
    assert "learning rate" in finding.suggestion


def test_a_large_batch_is_told_how_many_samples_it_wastes():
    finding = batch_size_finding(_estimate(680.0, 8192), step=500)
    assert finding.severity == "warning"
    assert "Batch 8192 is ~12x the measured gradient noise scale (~680)" in finding.message
    assert "~6.5x fewer samples" in finding.message  # (1 + 8192/680) / 2


@pytest.mark.parametrize(
    ("value", "batch", "severity"), [(100.0, 64, "info"), (200.0, 64, "info"), (64.0, 400, "info")]
)
def test_batches_within_ten_times_the_noise_scale_are_an_info(value, batch, severity):
    assert batch_size_finding(_estimate(value, batch), step=100).severity == severity
