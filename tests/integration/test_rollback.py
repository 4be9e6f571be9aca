"""Divergence and rollback: runs that blow up recover by themselves, healthy runs are left alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import Callback, DivergenceError, NonFiniteError, SafeTrainer
from safeloop.rollback import scale_learning_rates
from safeloop.testing import PoisonedDataset, nonfinite_loss, spiking_loss
from tests.conftest import _reset_accelerate
from tests.helpers.models import classification_data, mlp


def regression_data(n: int = 512, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    y = x @ torch.randn(16, 1, generator=gen) + 0.1 * torch.randn(n, 1, generator=gen)
    return TensorDataset(x, y)


def regressor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))


def _fit(model, lr, data=None, loss_fn=None, **kwargs):
    return SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        DataLoader(data or regression_data(), batch_size=32, shuffle=True),
        loss_fn=loss_fn or nn.MSELoss(),
        seed=1,
        progress_bar=False,
        **kwargs,
    ).fit()


def test_a_learning_rate_that_blows_up_a_hand_loop_recovers_after_a_rollback():
    lr = 0.3
    model = regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    torch.manual_seed(1)
    losses = []
    for _ in range(5):
        for x, y in DataLoader(regression_data(), batch_size=32, shuffle=True):
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert math.isnan(losses[-1]), "the hand-written loop was supposed to diverge at this learning rate"

    rolled = []

    class Watch(Callback):
        def on_rollback(self, trainer, event):
            rolled.append((event.step, trainer.global_step))

    result = _fit(regressor(), lr, max_epochs=5, callbacks=[Watch()])
    assert result.rollbacks >= 1 and rolled and rolled[0] == (0, 0)  # the state before step 1
    assert result.history[-1]["loss"] < 0.5 and math.isfinite(result.history[-1]["loss"])
    assert result.history[0]["lr"] == lr and result.history[-1]["lr"] == lr * 0.5**result.rollbacks
    rollback = next(e for e in result.events if e.kind == "rollback")
    assert rollback.detail["reason"] in ("loss-spike", "nonfinite") and rollback.detail["path"].endswith(
        "step-00000000"
    )
    assert rollback.detail["skipped_batches"] == rollback.detail["detected_at"]  # the batches since step 0
    scale = next(e for e in result.events if e.kind == "lr_scale")
    assert scale.detail["lr_before"] == [lr] and scale.detail["lr_after"] == [lr * 0.5]
    assert not Path(rollback.detail["path"]).parent.exists(), "the temporary checkpoint folder was left"


def test_one_poison_batch_mid_run_is_passed_and_the_run_ends_near_the_clean_one():
    clean = _fit(regressor(), 0.05, max_epochs=4)
    _reset_accelerate()
    poisoned = PoisonedDataset(regression_data(), indices={300}, value=float("nan"))
    result = _fit(regressor(), 0.05, data=poisoned, max_epochs=4)
    passed = result.skipped_steps + result.rollbacks
    assert passed >= 1, "the poison batch went unnoticed"
    assert result.history[-1]["loss"] == pytest.approx(clean.history[-1]["loss"], rel=0.25, abs=0.02)


def test_rollbacks_exhausted_raise_divergence_error_with_the_spikes_and_likely_causes():
    with pytest.raises(DivergenceError) as excinfo:
        _fit(regressor(), 5.0, max_epochs=5, max_rollbacks=1)
    message = str(excinfo.value)
    assert "diverged 2 time(s)" in message and "1 rollbacks were already made" in message
    assert "Learning rates tried: 5, 2.5" in message
    codes = [f.code for f in excinfo.value.findings]
    assert "lr-too-high" in codes
    lr_finding = next(f for f in excinfo.value.findings if f.code == "lr-too-high")
    assert "5, 2.5" in lr_finding.message and "below 1.25" in lr_finding.suggestion


def test_a_healthy_noisy_run_triggers_no_rollback_and_no_spike_finding():
    # batches of 2 with 20% wrong labels: the per-step loss swings widely around a stable level
    data = classification_data(n=600, seed=3)
    labels = data.tensors[1].clone()
    flip = torch.Generator().manual_seed(0)
    noisy = torch.rand(len(labels), generator=flip) < 0.2
    labels[noisy] = torch.randint(0, 3, (int(noisy.sum()),), generator=flip)
    model = mlp(seed=2)
    result = SafeTrainer(
        model,
        torch.optim.Adam(model.parameters(), lr=3e-3),
        DataLoader(TensorDataset(data.tensors[0], labels), batch_size=2, shuffle=True),
        loss_fn=nn.CrossEntropyLoss(),
        max_epochs=2,
        seed=0,
        progress_bar=False,
    ).fit()
    losses = [h["loss"] for h in result.history]
    assert max(losses) > 2 * min(losses), "the run was not noisy enough to test anything"
    assert result.rollbacks == 0 and not [e for e in result.events if e.kind == "rollback"]
    assert not [f for f in result.findings if f.code == "loss-spike"]


def test_with_rollback_off_a_spike_is_reported_and_nothing_is_restored():
    loss_fn = spiking_loss(nn.MSELoss(), at_calls=range(40, 46), factor=30.0)
    result = _fit(regressor(), 0.002, loss_fn=loss_fn, max_epochs=4, rollback=False)
    spikes = [f for f in result.findings if f.code == "loss-spike"]
    assert len(spikes) == 1 and spikes[0].step == 40 and "Nothing was restored" in spikes[0].message
    assert result.rollbacks == 0 and not [e for e in result.events if e.kind == "rollback"]


def test_a_finite_spike_rolls_back_to_the_newest_healthy_checkpoint_before_it(tmp_path):
    loss_fn = spiking_loss(nn.MSELoss(), at_calls=range(40, 46), factor=30.0)
    result = _fit(
        regressor(), 0.002, loss_fn=loss_fn, max_epochs=4, checkpoint_dir=tmp_path, checkpoint_every=15
    )
    rollback = next(e for e in result.events if e.kind == "rollback")
    assert rollback.step == 30 and rollback.detail["anomaly_start"] == 40  # 45 is after the start
    assert rollback.detail["reason"] == "loss-spike" and rollback.detail["zscore"] > 6
    assert rollback.detail["confirmed_at"] == 42 and rollback.detail["detected_at"] == 50  # log step
    # 16 steps an epoch: back to step 30 (epoch 1, batch 14), the 20 batches steps 31-50 used are
    # skipped (2 of epoch 1, all of epoch 2, 2 of epoch 3), then 14 steps in epoch 3
    assert rollback.detail["skipped_batches"] == 20
    assert result.rollbacks == 1 and result.global_step == 44


def test_a_rollback_never_restores_another_runs_checkpoint_left_in_the_folder(tmp_path):
    _fit(regressor(), 0.01, max_steps=35, checkpoint_dir=tmp_path, checkpoint_every=35)  # another run
    assert (tmp_path / "step-00000035").is_dir()  # healthy, and newer than this run's step 30
    loss_fn = spiking_loss(nn.MSELoss(), at_calls=range(40, 46), factor=30.0)
    result = _fit(
        regressor(), 0.002, loss_fn=loss_fn, max_epochs=4, checkpoint_dir=tmp_path, checkpoint_every=15
    )
    rollback = next(e for e in result.events if e.kind == "rollback")
    assert rollback.step == 30 and rollback.detail["anomaly_start"] == 40
    assert result.global_step == 44  # as without the stale folder


def test_without_rollback_a_non_finite_run_still_raises_nonfinite_error():
    with pytest.raises(NonFiniteError):
        _fit(regressor(), 5.0, max_epochs=2, rollback=False)


@pytest.mark.parametrize("kind", ["step", "lambda", "onecycle", "sequential", "cyclic", "cosine-floor"])
def test_a_scaled_learning_rate_persists_through_the_schedule(kind):
    def build():
        param = nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=0.1)
        if kind == "step":
            return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        if kind == "lambda":
            return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        if kind == "sequential":  # warm-up, then cosine: the inner schedulers compute the rates
            warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=4)
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
            return optimizer, torch.optim.lr_scheduler.SequentialLR(
                optimizer, [warmup, cosine], milestones=[4]
            )
        if kind == "cyclic":
            return optimizer, torch.optim.lr_scheduler.CyclicLR(
                optimizer, base_lr=0.01, max_lr=0.1, step_size_up=3
            )
        if kind == "cosine-floor":
            return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5, eta_min=0.05)
        return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20)

    plain, plain_schedule = build()
    scaled, scaled_schedule = build()
    for _ in range(3):
        plain.step(), plain_schedule.step(), scaled.step(), scaled_schedule.step()
    scale_learning_rates(scaled, scaled_schedule, 0.5)
    for _ in range(12):
        plain.step(), plain_schedule.step(), scaled.step(), scaled_schedule.step()
        assert scaled.param_groups[0]["lr"] == pytest.approx(0.5 * plain.param_groups[0]["lr"])


def test_adaptive_clipping_absorbs_a_gradient_spike_that_otherwise_forces_a_rollback():
    def spiky():
        return spiking_loss(nn.MSELoss(), at_calls={40}, factor=300.0)

    plain = _fit(regressor(), 0.01, loss_fn=spiky(), max_epochs=4)
    _reset_accelerate()
    clipped = _fit(regressor(), 0.01, loss_fn=spiky(), max_epochs=4, adaptive_clip=2.5)
    _reset_accelerate()
    clean = _fit(regressor(), 0.01, max_epochs=4)
    assert plain.rollbacks + plain.skipped_steps >= 1, "the spike was supposed to derail the plain run"
    assert clipped.rollbacks == 0 and clipped.skipped_steps == 0
    assert clipped.history[-1]["loss"] == pytest.approx(clean.history[-1]["loss"], rel=0.3, abs=0.02)


def test_a_device_side_skip_run_rolls_back_from_the_log_step_that_learnt_it():
    # fused AdamW skips on the device: the run of NaN steps 32-39 is learnt at log step 40
    model = regressor()
    result = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
        DataLoader(regression_data(), batch_size=32, shuffle=True),
        loss_fn=nonfinite_loss(nn.MSELoss(), at_calls=range(32, 40)),
        max_epochs=4,
        seed=1,
        progress_bar=False,
    ).fit()
    rollback = next(e for e in result.events if e.kind == "rollback")
    assert rollback.detail["reason"] == "nonfinite" and rollback.detail["anomaly_start"] == 32
    assert rollback.detail["detected_at"] == 40 and rollback.detail["skipped_batches"] == 40  # from step 0
    steps = [h["step"] for h in result.history]
    assert steps[:4] == [10, 20, 30, 40] and steps[4] == 10  # step 40's interval is logged, then back
