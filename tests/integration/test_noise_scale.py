"""The gradient noise scale measured in a run, against the closed form of a linear regression.

``tests.helpers.models.noisy_regression`` knows its ``B_simple`` exactly while the weights stay
put (``lr=0``), so each way of measuring must land within 20% of it. The 2-process DDP estimate
is in ``tests/distributed/test_noise_scale.py``.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from safeloop import ConfigError, SafeTrainer
from safeloop.testing import nonfinite_loss
from tests.helpers.models import classification_data, loader, mlp, noisy_regression


def _fit(steps: int, batch: int, loss_fn=None, **kwargs):
    dataset, model, true = noisy_regression(n=65536)
    trainer = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(dataset, batch_size=batch, shuffle=True),
        loss_fn=loss_fn or nn.MSELoss(),
        max_steps=steps,
        seed=0,
        rollback=False,
        progress_bar=False,
        summary=False,
        **kwargs,
    )
    return trainer.fit(), true


def test_accumulation_measures_the_closed_form_noise_scale():
    result, true = _fit(600, 8, gradient_accumulation_steps=4)  # 8 samples against 32
    estimate = result.gradient_noise_scale
    assert estimate is not None and estimate.value == pytest.approx(true, rel=0.2)
    assert (estimate.steps, estimate.batch_size, estimate.samples) == (600, 32, 600 * 32)
    assert estimate.first is not None and estimate.first_step == 20  # the first log step past MIN_STEPS
    logged = [entry.get("gradient_noise_scale") for entry in result.history]
    assert logged[0] is None and logged[-1] == estimate.value  # absent before it is measured
    [advice] = [f for f in result.findings if f.code == "batch-size"]
    assert f"~{round(estimate.value)})" in advice.message and "Batch 32" in advice.message


def test_split_measures_it_on_one_process_without_accumulation():
    result, true = _fit(1000, 16, gradient_noise_scale="split")  # 8 samples against 16
    estimate = result.gradient_noise_scale
    assert estimate is not None and estimate.value == pytest.approx(true, rel=0.2)
    assert estimate.batch_size == 16


def test_one_process_without_accumulation_says_why_it_is_not_measured(caplog):
    with caplog.at_level(logging.INFO, logger="safeloop"):
        result, _ = _fit(30, 16)
    assert result.gradient_noise_scale is None
    assert all("gradient_noise_scale" not in entry for entry in result.history)
    assert not [f for f in result.findings if f.code == "batch-size"]
    [line] = [r.getMessage() for r in caplog.records if "noise scale not measured" in r.getMessage()]
    assert "one batch size" in line and 'gradient_noise_scale="split"' in line


def test_off_measures_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="safeloop"):
        result, _ = _fit(30, 8, gradient_accumulation_steps=2, gradient_noise_scale="off")
    assert result.gradient_noise_scale is None and "noise scale" not in caplog.text


def test_a_refused_step_is_left_out_of_the_estimate():
    # accumulation 2: loss call 61 is step 31's first micro-batch; the guard refuses that step
    result, true = _fit(
        60, 8, loss_fn=nonfinite_loss(nn.MSELoss(), at_calls={61}), gradient_accumulation_steps=2
    )
    assert result.skipped_steps == 1
    estimate = result.gradient_noise_scale
    assert estimate is not None and estimate.steps == 59
    assert estimate.value == pytest.approx(true, rel=0.5)  # 59 steps: a rough but finite estimate


def test_split_applies_the_whole_batchs_mean_gradient():
    # the two halves' losses are weighted by their share: the update is the unsplit one up to
    # rounding (not bitwise: the sums are taken in another order), odd batches included
    def trained(mode: str) -> list[torch.Tensor]:
        model = mlp(seed=0)
        SafeTrainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader(classification_data(n=63), batch_size=9, shuffle=False),
            loss_fn=nn.CrossEntropyLoss(),
            max_epochs=3,
            gradient_noise_scale=mode,
            progress_bar=False,
            summary=False,
        ).fit()
        return [p.detach() for p in model.parameters()]

    for split, whole in zip(trained("split"), trained("off"), strict=True):
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", ["on", True, None, "SPLIT"])
def test_a_bad_setting_is_refused_with_the_choices(value):
    model = mlp()
    with pytest.raises(ConfigError, match="`gradient_noise_scale` must be one of 'auto', 'split', 'off'"):
        SafeTrainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader(classification_data()),
            gradient_noise_scale=value,
        )


def test_on_a_real_classifier_the_noise_scale_rises_as_the_loss_falls():
    # as McCandlish et al. report: the mean gradient shrinks faster than its noise
    generator = torch.Generator().manual_seed(0)
    centers = 1.2 * torch.randn(4, 16, generator=generator)
    labels = torch.randint(0, 4, (8192,), generator=generator)
    inputs = centers[labels] + torch.randn(8192, 16, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    result = SafeTrainer(
        model,
        torch.optim.Adam(model.parameters(), lr=3e-3),
        DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=8, shuffle=True),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=640,
        gradient_accumulation_steps=4,
        log_every=20,
        seed=0,
        progress_bar=False,
        summary=False,
    ).fit()
    measured = [(e["loss"], e["gradient_noise_scale"]) for e in result.history if "gradient_noise_scale" in e]
    (first_loss, first), (last_loss, last) = measured[0], measured[-1]
    assert last_loss < first_loss / 10 and last > 1.5 * first
    estimate = result.gradient_noise_scale
    assert estimate is not None and (estimate.first, estimate.value) == (first, last)
    [advice] = [f for f in result.findings if f.code == "batch-size"]
    assert f"It was ~{first:.0f} at step 20" in advice.message
