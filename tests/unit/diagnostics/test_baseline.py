"""The baseline loss (best constant prediction) against closed forms and against torch's own losses."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from safeloop.diagnostics.baseline import Baseline, TargetSample, loss_form


def _baseline(loss_fn, outputs: torch.Tensor, targets: torch.Tensor, batches: int = 1) -> Baseline:
    sample = TargetSample(loss_form(loss_fn))
    for out, tgt in zip(outputs.chunk(batches), targets.chunk(batches), strict=True):
        sample.see(out, tgt)
    baseline = Baseline.of(sample.form, sample.statistics().tolist(), sample.layout)
    assert baseline is not None
    return baseline


def _classes(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])


def test_uniform_classes_give_log_c():
    targets = _classes([40] * 10)
    baseline = _baseline(nn.CrossEntropyLoss(), torch.zeros(400, 10), targets, batches=4)
    assert baseline.value == pytest.approx(math.log(10), abs=1e-12)
    assert baseline.samples == 400 and "10 of 10 classes" in baseline.how


def test_skewed_classes_give_their_entropy_and_torch_agrees_at_the_constant():
    targets = _classes([700, 200, 100])
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    baseline = _baseline(F.cross_entropy, torch.zeros(1000, 3), targets)
    assert baseline.value == pytest.approx(float(-(p * p.log()).sum()), abs=1e-12)
    # the constant logits log(p) reach exactly that loss in torch
    assert float(F.cross_entropy(p.log().expand(1000, 3), targets)) == pytest.approx(baseline.value, abs=1e-9)


def test_label_smoothing_mixes_the_frequencies_with_uniform():
    targets = _classes([600, 300, 100])
    eps = 0.1
    q = 0.9 * torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64) + eps / 3
    baseline = _baseline(nn.CrossEntropyLoss(label_smoothing=eps), torch.zeros(1000, 3), targets)
    assert baseline.value == pytest.approx(float(-(q * q.log()).sum()), abs=1e-12)
    constant = F.cross_entropy(q.log().expand(1000, 3), targets, label_smoothing=eps)
    assert float(constant) == pytest.approx(baseline.value, abs=1e-9)
    assert "label smoothing 0.1" in baseline.how


def test_class_weights_and_ignore_index():
    targets = _classes([500, 300, 200])
    targets[::4] = -100  # a quarter ignored
    weight = torch.tensor([1.0, 2.0, 4.0])
    baseline = _baseline(nn.CrossEntropyLoss(weight=weight), torch.zeros(1000, 3), targets)
    kept = targets[targets != -100]
    mass = torch.bincount(kept, minlength=3).double() * weight.double()
    p = mass / mass.sum()
    assert baseline.value == pytest.approx(float(-(p * p.log()).sum()), abs=1e-12)
    assert float(F.cross_entropy(p.log().expand(1000, 3), targets, weight=weight.double())) == pytest.approx(
        baseline.value, abs=1e-9
    )


def test_sequence_targets_and_nll_of_log_probabilities():
    targets = torch.randint(0, 5, (64, 12), generator=torch.Generator().manual_seed(0))
    baseline = _baseline(nn.NLLLoss(), torch.zeros(64, 5, 12), targets, batches=2)  # (N, C, L)
    p = torch.bincount(targets.reshape(-1), minlength=5).double() / targets.numel()
    assert baseline.value == pytest.approx(float(-(p * p.log()).sum()), abs=1e-12)


def test_soft_targets_give_the_entropy_of_their_mean():
    soft = torch.softmax(torch.randn(200, 4, generator=torch.Generator().manual_seed(1)), 1)
    mean = soft.double().mean(0)
    baseline = _baseline(nn.CrossEntropyLoss(), torch.zeros(200, 4), soft)
    assert baseline.value == pytest.approx(float(-(mean * mean.log()).sum()), abs=1e-6)


def test_multi_output_regression_mse_is_the_mean_per_output_variance():
    gen = torch.Generator().manual_seed(2)
    targets = torch.randn(500, 3, generator=gen) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor(
        [5.0, -1.0, 0.0]
    )
    baseline = _baseline(nn.MSELoss(), torch.zeros(500, 3), targets, batches=5)
    expected = (1 / 3) * sum(float(targets[:, j].double().var(correction=0)) for j in range(3))
    assert baseline.value == pytest.approx(expected, rel=1e-9)
    # not the pooled variance: each output gets its own mean
    assert baseline.value < float(targets.double().var(correction=0))


def test_l1_is_the_mean_absolute_deviation_from_the_median():
    targets = torch.tensor([[0.0, 10.0], [1.0, 10.0], [5.0, 13.0]])
    baseline = _baseline(nn.L1Loss(), torch.zeros(3, 2), targets)
    # medians 1 and 10: deviations (1 + 0 + 4) and (0 + 0 + 3), over 6 elements
    assert baseline.value == pytest.approx(8 / 6, abs=1e-12)


@pytest.mark.parametrize(
    "loss_fn",
    [nn.HuberLoss(delta=0.5), nn.SmoothL1Loss(beta=2.0), functools.partial(F.huber_loss, delta=3.0)],
    ids=["huber", "smooth-l1", "partial-huber"],
)
def test_huber_type_losses_match_a_grid_search(loss_fn):
    targets = torch.randn(300, 2, generator=torch.Generator().manual_seed(3)).double() * 2 + 1
    baseline = _baseline(loss_fn, torch.zeros(300, 2), targets)
    grid = torch.linspace(-6, 8, 14001, dtype=torch.float64)
    best = [
        min(
            float(loss_fn(torch.full((300,), float(g), dtype=torch.float64), targets[:, j]))
            for g in grid[::7]
        )
        for j in range(2)
    ]
    assert baseline.value == pytest.approx(sum(best) / 2, abs=2e-5)
    assert baseline.value <= sum(best) / 2 + 1e-12


def test_binary_cross_entropy_per_output():
    gen = torch.Generator().manual_seed(4)
    targets = (torch.rand(400, 3, generator=gen) < torch.tensor([0.1, 0.5, 0.9])).float()
    p = targets.double().mean(0)
    expected = float((-(p * p.log() + (1 - p) * (1 - p).log())).mean())
    for loss_fn in (nn.BCEWithLogitsLoss(), nn.BCELoss()):
        assert _baseline(loss_fn, torch.zeros(400, 3), targets).value == pytest.approx(expected, abs=1e-12)


def test_one_class_gives_zero():
    assert (
        _baseline(nn.CrossEntropyLoss(), torch.zeros(50, 4), torch.zeros(50, dtype=torch.long)).value == 0.0
    )


@pytest.mark.parametrize(
    ("loss_fn", "problem"),
    [
        (nn.CrossEntropyLoss(reduction="sum"), "reduction='sum'"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0])), "per-element weights"),
        (nn.CrossEntropyLoss(weight=torch.ones(3), label_smoothing=0.1), "label smoothing"),
    ],
)
def test_forms_without_a_closed_form_say_why(loss_fn, problem):
    form = loss_form(loss_fn)
    assert form is not None and form.problem is not None and problem in form.problem


def test_unrecognised_losses_have_no_form():
    assert loss_form(lambda o, t: ((o - t) ** 2).mean()) is None
    assert loss_form(nn.KLDivLoss()) is None


def test_the_sample_stops_after_its_batches_and_keeps_one_layout():
    sample = TargetSample(loss_form(nn.MSELoss()), max_batches=2)
    sample.see(torch.zeros(4, 2), torch.ones(4, 2))
    sample.see(torch.zeros(4, 3), torch.ones(4, 3))  # another layout: left out
    sample.see(torch.zeros(4, 2), torch.ones(4, 2))
    assert not sample.wants and sample.batches == 2 and sample.layout == (2,)


def test_dense_targets_stop_the_sample_at_its_element_budget():
    sample = TargetSample(loss_form(nn.MSELoss()))
    images = torch.zeros(64, 3, 128, 128)  # 3.1M elements a batch
    sample.see(images, images)
    assert sample.wants
    sample.see(images, images)
    assert not sample.wants and sample.batches == 2
