"""The gradient noise scale under ``SafeLoopCallback``: SafeTrainer's estimate, from Lightning's hooks.

``tests.helpers.models.noisy_regression`` knows its ``B_simple`` exactly while the weights stay
put (``lr=0``). With ``accumulate_grad_batches`` the callback must give the estimate SafeTrainer
gives on the same batches (the same gradients at the same moments: equal to the last bit), within
20% of the closed form; one process without accumulation has one batch size and says so in
Lightning's terms; ``"split"`` is refused. The 2-process DDP estimate (the communication hook on
Lightning's DDP module) is in ``tests/distributed/test_lightning_ddp.py``, the FSDP2 one (each
process's gradient at the reduce-scatter) in ``tests/distributed/test_lightning_fsdp.py``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

pytest.importorskip("lightning")

from lightning.pytorch.plugins import MixedPrecision

from safeloop import ConfigError, SafeTrainer
from safeloop.lightning import SafeLoopCallback
from safeloop.lightning.fsdp import fsdp_noise_refusal
from safeloop.lightning.processes import LightningProcesses
from safeloop.testing import nonfinite_loss
from tests.helpers.lightning_models import QUIET, Regression, trainer
from tests.helpers.models import noisy_regression

pytestmark = [pytest.mark.usefixtures("one_thread"), *(pytest.mark.filterwarnings(q) for q in QUIET)]

STEPS = 200


def _fit(batch: int, accumulation: int, *, steps: int = STEPS, nan_at=frozenset(), plugins=(), **guards):
    dataset, model, true = noisy_regression(n=65536)
    callback = SafeLoopCallback(summary=False, rollback=False, **guards)
    fitted = trainer(
        callback, max_steps=steps, max_epochs=-1, accumulate_grad_batches=accumulation, plugins=list(plugins)
    )
    fitted.fit(Regression(model, set(nan_at)), DataLoader(dataset, batch_size=batch, shuffle=False))
    return callback, true


def test_under_accumulation_the_estimate_is_safetrainers_on_the_same_batches():
    callback, true = _fit(8, 4)  # 8 samples against 32
    estimate = callback.result.gradient_noise_scale
    dataset, model, _ = noisy_regression(n=65536)
    reference = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(dataset, batch_size=8, shuffle=False),
        loss_fn=nn.MSELoss(),
        max_steps=STEPS,
        gradient_accumulation_steps=4,
        rollback=False,
        progress_bar=False,
        summary=False,
    ).fit()
    # the same gradients read at the same moments: the same estimate, to the last bit
    assert estimate == reference.gradient_noise_scale
    assert estimate.value == pytest.approx(true, rel=0.2)
    assert (estimate.steps, estimate.batch_size, estimate.samples) == (STEPS, 32, STEPS * 32)
    logged = [entry.get("gradient_noise_scale") for entry in callback.result.history]
    assert logged[0] is None and logged[-1] == estimate.value  # absent before it is measured
    [advice] = [f for f in callback.findings if f.code == "batch-size"]
    assert f"~{round(estimate.value)})" in advice.message and "Batch 32" in advice.message


def test_a_batch_below_the_noise_scale_is_advised_in_lightnings_terms():
    callback, true = _fit(2, 2)  # a batch of 4 per step, about 1/9 of the noise scale
    [advice] = [f for f in callback.findings if f.code == "batch-size"]
    assert advice.message.startswith("Batch 4 is about 1/")
    assert (
        "(`Trainer(accumulate_grad_batches=...)` or more devices when memory is short)" in advice.suggestion
    )
    assert "gradient_accumulation_steps" not in advice.suggestion
    assert callback.result.gradient_noise_scale.value == pytest.approx(true, rel=0.3)


def test_one_process_without_accumulation_says_why_in_lightnings_terms(caplog):
    with caplog.at_level(logging.INFO, logger="safeloop"):
        callback, _ = _fit(16, 1, steps=30)
    assert callback.result.gradient_noise_scale is None
    assert all("gradient_noise_scale" not in entry for entry in callback.result.history)
    assert not [f for f in callback.findings if f.code == "batch-size"]
    [line] = [r.getMessage() for r in caplog.records if "noise scale not measured" in r.getMessage()]
    assert line.endswith(
        "one process without gradient accumulation has one batch size; "
        "`Trainer(accumulate_grad_batches=...)` > 1 or several DDP processes measure it"
    )


def test_off_measures_nothing_and_says_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="safeloop"):
        callback, _ = _fit(8, 2, steps=30, gradient_noise_scale="off")
    assert callback.result.gradient_noise_scale is None and "noise scale" not in caplog.text


def test_split_is_refused_with_what_measures_it_under_lightning():
    with pytest.raises(
        ConfigError, match=r'`gradient_noise_scale="split"`: under Lightning the forward'
    ) as caught:
        SafeLoopCallback(gradient_noise_scale="split")
    assert "`Trainer(accumulate_grad_batches=...)` > 1 or on several DDP processes" in str(caught.value)
    with pytest.raises(ConfigError, match="`gradient_noise_scale` must be one of 'auto', 'split', 'off'"):
        SafeLoopCallback(gradient_noise_scale="on")


def test_a_refused_step_is_left_out_of_the_estimate_as_safetrainer_leaves_it():
    # accumulation 2: batch 60 is step 31's first micro-batch; the guard refuses that step
    callback, _ = _fit(8, 2, steps=60, nan_at={60})
    assert callback.result.skipped_steps == 1
    estimate = callback.result.gradient_noise_scale
    assert estimate is not None and estimate.steps == 59
    dataset, model, _ = noisy_regression(n=65536)
    reference = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(dataset, batch_size=8, shuffle=False),
        loss_fn=nonfinite_loss(nn.MSELoss(), at_calls={61}),  # the same micro-batch
        max_steps=60,
        gradient_accumulation_steps=2,
        rollback=False,
        progress_bar=False,
        summary=False,
    ).fit()
    assert reference.skipped_steps == 1 and estimate == reference.gradient_noise_scale


def test_under_an_fp16_scaler_the_scaled_gradients_give_the_same_estimate():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    callback, _ = _fit(8, 4, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    plain, _ = _fit(8, 4)
    # the first micro-batch's gradient is read still scaled, and divided by the scale squared
    assert callback.result.gradient_noise_scale.value == pytest.approx(
        plain.result.gradient_noise_scale.value, rel=0.05
    )


@pytest.mark.parametrize(
    ("precision", "name"),
    [("16-mixed", "fp16"), ("16-true", "fp16"), ("bf16-mixed", "bf16"), ("32-true", "no")],
)
def test_the_trainers_precision_reads_as_accelerates_name(precision, name):
    trainer = SimpleNamespace(precision=precision, world_size=2, strategy=None)
    assert LightningProcesses(trainer, nn.Linear(2, 2)).mixed_precision == name


@pytest.mark.parametrize(
    ("accumulation", "precision", "dtype", "says"),
    [
        (2, "32-true", torch.float32, "`accumulate_grad_batches` > 1 every micro-batch reduce-scatters"),
        (1, "16-mixed", torch.float32, "with fp16 FSDP2 reduces gradients divided by a factor"),
        (1, "32-true", torch.float16, "with fp16 FSDP2 reduces gradients divided by a factor"),
        (1, "bf16-mixed", torch.float32, None),
        (1, "32-true", torch.float32, None),
    ],
)
def test_under_fsdp2_accumulation_and_fp16_are_said_in_lightnings_terms(accumulation, precision, dtype, says):
    # the rest (one process, an old torch, several parameter groups) is attach_sharded_probe's
    trainer = SimpleNamespace(
        precision=precision, world_size=2, strategy=None, accumulate_grad_batches=accumulation
    )
    module = nn.Linear(2, 2).to(dtype)
    reason = fsdp_noise_refusal(LightningProcesses(trainer, module))
    assert reason is None if says is None else says in reason
