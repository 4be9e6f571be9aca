"""A schedule that anneals the learning rate long before the end of the run is ``lr-too-low``.

safeloop steps ``lr_scheduler`` once per optimizer step; a schedule written in epochs (StepLR,
ExponentialLR per epoch) then decays steps-per-epoch times too fast, and the run goes on at a
learning rate of ~0 with the loss flat. Schedules over the whole run (cosine, one-cycle, cosine
restarts) stay silent: their lr is low only at the end, or only for an instant.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import SafeTrainer
from safeloop.results import FitResult

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS, BATCH = 5, 32  # 2048 samples: 64 steps per epoch, 320 in all


def _fit(make_scheduler, seed: int = 0) -> FitResult:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 16, generator=gen)
    y = (torch.tanh(x @ torch.randn(16, 32, generator=gen)) @ torch.randn(32, 5, generator=gen)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True, generator=gen)
    trainer = SafeTrainer(
        model, optimizer, loader, loss_fn=nn.CrossEntropyLoss(), lr_scheduler=make_scheduler(optimizer),
        max_epochs=EPOCHS, seed=seed, progress_bar=False, summary=False,
    )  # fmt: skip
    return trainer.fit()


EPOCH_SCHEDULES = {
    "step-30": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1),
    "exponential-0.9": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
    "multistep": lambda opt: torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[20, 40, 60, 80, 100], gamma=0.1
    ),
}


@pytest.mark.parametrize("name", list(EPOCH_SCHEDULES))
def test_an_epoch_schedule_stepped_per_optimizer_step_is_lr_too_low(name):
    result = _fit(EPOCH_SCHEDULES[name])
    [low] = [f for f in result.findings if f.code == "lr-too-low"]
    assert low.step <= 0.75 * 320 and "annealed the learning rate long before the end" in low.message
    assert "of the 320 planned steps still to come" in low.message and "64 times too fast" in low.message
    assert "`step_size=30 * 64`" in low.suggestion


RUN_SCHEDULES = {
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=320),
    "one-cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=320),
    "cosine-restarts": lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=64),
    "step-per-epoch-sized": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2 * 64, gamma=0.1),
}


@pytest.mark.parametrize("name", list(RUN_SCHEDULES))
def test_schedules_over_the_run_are_no_alarm(name):
    result = _fit(RUN_SCHEDULES[name])
    assert not [f for f in result.findings if f.code == "lr-too-low"], result.findings
