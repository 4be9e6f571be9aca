"""A learning rate of 0 is ``lr-too-low``: applied updates that move no weight at all.

A zero update used to count as "not measured" (a skipped step, a group frozen on purpose), so a
run whose every learning rate was 0 got a plateau "with updates of a normal size". Now an applied
log-step update that moves none of the weights that got a gradient is a ratio of 0; weights that
stay put beside others that move (a backbone frozen with ``lr=0``), a warm-up from 0 and a
skipped log step still say nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import SafeTrainer
from safeloop.results import FitResult
from safeloop.testing import NonFiniteGradient

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 12, generator=gen)
    y = (x @ torch.randn(12, 4, generator=gen)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=gen)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


def _fit(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 60, **kwargs) -> FitResult:
    trainer = SafeTrainer(
        model, optimizer, _data(), loss_fn=nn.CrossEntropyLoss(), max_steps=steps, seed=0,
        progress_bar=False, summary=False, log_every=10, **kwargs,
    )  # fmt: skip
    return trainer.fit()


def _zero_lr(kind: str) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    model = _model()
    params = list(model.parameters())
    if kind == "sgd":
        return model, torch.optim.SGD(params, lr=0.0), {}
    if kind == "adam":
        return model, torch.optim.Adam(params, lr=0.0), {}
    if kind == "adamw-decay":  # decoupled decay scales by 1 - lr * wd: nothing moves either
        return model, torch.optim.AdamW(params, lr=0.0, weight_decay=0.1), {}
    if kind == "two-groups":
        groups = [{"params": params[:2], "lr": 0.0}, {"params": params[2:], "lr": 0.0}]
        return model, torch.optim.SGD(groups, lr=0.1, momentum=0.9), {}
    optimizer = torch.optim.Adam(params, lr=1e-3)  # a schedule whose factor is 0 throughout
    return model, optimizer, {"lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)}


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw-decay", "two-groups", "lambda-zero"])
def test_a_learning_rate_of_zero_is_lr_too_low_within_three_log_checks(kind):
    model, optimizer, extra = _zero_lr(kind)
    before = [p.detach().clone() for p in model.parameters()]
    result = _fit(model, optimizer, **extra)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # nothing moved
    [low] = [f for f in result.findings if f.code == "lr-too-low"]
    assert low.step == 30 and low.severity == "warning"
    assert "No weight moved" in low.message and "||dw|| = 0" in low.message
    assert set(low.params) == {"0.weight", "2.weight"}
    assert "above 0" in low.suggestion and "find_lr" in low.suggestion


def test_the_plateau_names_the_zero_learning_rate_not_normal_updates():
    model, optimizer, _ = _zero_lr("sgd")
    result = _fit(model, optimizer, steps=200)
    [plateau] = [f for f in result.findings if f.code == "loss-plateau"]
    assert "every learning rate is 0" in plateau.message
    assert "updates are of a normal size" not in plateau.message


def test_a_backbone_frozen_with_lr_zero_beside_a_training_head_is_no_alarm():
    model = _model()
    groups = [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters(), "lr": 3e-2}]
    backbone = model[0].weight.detach().clone()
    result = _fit(model, torch.optim.SGD(groups, momentum=0.9), steps=200)
    assert torch.equal(model[0].weight, backbone)
    assert not [f for f in result.findings if f.severity in ("warning", "error")], result.findings
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"]


def test_a_warm_up_from_zero_is_no_alarm():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 50))
    result = _fit(model, optimizer, steps=200, lr_scheduler=warmup)
    assert result.history[0]["lr"] < result.history[-1]["lr"] == pytest.approx(3e-3)
    assert not [f for f in result.findings if f.severity in ("warning", "error")], result.findings


def test_skipped_log_steps_do_not_count_as_a_zero_learning_rate():
    # every log step's gradient is non-finite: the step measured is skipped, so nothing moved
    model = _model()
    poison = [NonFiniteGradient("2.weight", step=step) for step in range(10, 61, 10)]
    result = _fit(model, torch.optim.Adam(model.parameters(), lr=3e-3), steps=60, callbacks=poison)
    assert result.skipped_steps == 6
    assert not [f for f in result.findings if f.code == "lr-too-low"], result.findings
