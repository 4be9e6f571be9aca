"""The NaN/Inf guard: a non-finite step changes nothing, and the run says where it came from."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import Callback, NonFiniteError, SafeTrainer
from safeloop.testing import NonFiniteGradient, PoisonedDataset, nonfinite_loss
from tests.conftest import _reset_accelerate
from tests.helpers.models import classification_data, loader, mlp

SEED = 99
K = 5  # the step that goes non-finite


class SignMomentum(torch.optim.Optimizer):
    """A custom optimizer (no found_inf support): sign of a momentum buffer."""

    def __init__(self, params, lr=1e-2, beta=0.9):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["beta"]).add_(p.grad)
                p.add_(buf.sign(), alpha=-group["lr"])


OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "custom": lambda params: SignMomentum(params, lr=1e-2),
}


def _hand_loop_skipping(model, optimizer, dataloader, *, skip_step: int, scheduler=None) -> None:
    """A hand-written Accelerate loop that skips the update of one step by hand."""
    set_seed(SEED)
    accelerator = Accelerator()
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    set_seed(SEED)
    for step, (inputs, targets) in enumerate(dataloader, start=1):
        loss = nn.functional.cross_entropy(model(inputs), targets)
        accelerator.backward(loss)
        if step != skip_step:
            optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()  # the schedule counts skipped steps too
    _reset_accelerate()


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return [
        value for key in sorted(state) for value in state[key].values() if isinstance(value, torch.Tensor)
    ]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("with_scheduler", [False, True], ids=["plain", "steplr"])
def test_nan_at_step_k_equals_a_run_that_skipped_batch_k_by_hand(name, with_scheduler):
    data = classification_data()
    model = mlp()
    reference = copy.deepcopy(model)
    ref_opt = OPTIMIZERS[name](reference.parameters())
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.5) if with_scheduler else None
    _hand_loop_skipping(reference, ref_opt, loader(data), skip_step=K, scheduler=ref_sched)

    opt = OPTIMIZERS[name](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if with_scheduler else None
    result = SafeTrainer(
        model,
        opt,
        loader(data),
        loss_fn=nonfinite_loss(nn.CrossEntropyLoss(), at_calls={K}),
        lr_scheduler=sched,
        seed=SEED,
        progress_bar=False,
    ).fit()

    assert result.skipped_steps == 1 and result.global_step == 12
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), f"{name}: {key} differs from the hand-skipped run"
    ours, theirs = _optimizer_tensors(opt), _optimizer_tensors(ref_opt)
    assert len(ours) == len(theirs) > 0
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), (
        f"{name}: optimizer state differs"
    )
    skip = [e for e in result.events if e.kind == "skip"]
    assert [e.step for e in skip] == [K] and skip[0].detail["cause"] == "loss"
    if with_scheduler:
        assert (
            opt.param_groups[0]["lr"]
            == ref_opt.param_groups[0]["lr"]
            == pytest.approx(0.5**4 * ref_opt.defaults["lr"])
        )


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_fused"])
def test_inf_in_one_gradient_skips_the_step_and_names_the_parameter(name):
    model = mlp()
    skipped: list[Any] = []

    class OnSkip(Callback):
        def on_skip(self, trainer, event):
            skipped.append(event)

    result = SafeTrainer(
        model,
        OPTIMIZERS[name](model.parameters()),
        loader(classification_data()),
        loss_fn=nn.CrossEntropyLoss(),
        callbacks=[NonFiniteGradient("2.weight", step=3), OnSkip()],
        progress_bar=False,
        log_every=4,
    ).fit()
    assert result.skipped_steps == 1
    assert [e.step for e in skipped] == [3]
    assert skipped[0].detail["cause"] == "gradients" and skipped[0].detail["params"] == ["2.weight"]
    grad_findings = [f for f in result.findings if f.code == "nonfinite-grad"]
    assert len(grad_findings) == 1 and grad_findings[0].params == ("2.weight",)
    assert "`2.weight`" in grad_findings[0].message and grad_findings[0].step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(result.history[-1]["loss"])


def test_poison_batch_with_huge_values_is_skipped_and_training_goes_on():
    base = classification_data()
    poisoned = PoisonedDataset(base, indices={33}, value=1e38)  # sample 33 is in batch 4 (0-based)
    model = mlp()
    result = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        DataLoader(poisoned, batch_size=8, shuffle=False),
        loss_fn=nn.CrossEntropyLoss(),
        max_epochs=3,
        progress_bar=False,
    ).fit()
    assert result.skipped_steps == 3  # once per epoch
    assert [e.step for e in result.events if e.kind == "skip"] == [5, 17, 29]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_nan_in_the_inputs_is_reported_as_nonfinite_input_with_its_position():
    poisoned = PoisonedDataset(classification_data(), indices={10}, value=float("nan"))
    model = mlp()
    result = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        DataLoader(poisoned, batch_size=8, shuffle=False),
        loss_fn=nn.CrossEntropyLoss(),
        progress_bar=False,
    ).fit()
    finding = next(f for f in result.findings if f.code == "nonfinite-input")
    assert finding.severity == "error" and finding.params == ("batch[0]",)
    assert "batch 1" in finding.message and "8 NaN/Inf" in finding.message
    assert result.skipped_steps == 1


class ExplodesOnLargeInputs(nn.Module):
    """Behaves as identity, but takes the log of a negative number where inputs exceed 40."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 40, torch.log(-x), x)


def test_replay_names_the_third_layer_and_the_batch_that_made_the_loss_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), ExplodesOnLargeInputs(), nn.Linear(16, 3))
    x, y = classification_data(n=64).tensors
    x = x.clone()
    x[27] *= 500.0  # sample 27: batch 3 with batch_size 8, inputs still finite
    result = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False),
        loss_fn=nn.CrossEntropyLoss(),
        progress_bar=False,
    ).fit()
    assert result.skipped_steps == 1
    finding = next(f for f in result.findings if f.code == "nonfinite-loss")
    assert finding.params == ("2",), finding.message
    assert "batch 3" in finding.message and "`2`" in finding.message
    skip = next(e for e in result.events if e.kind == "skip")
    assert skip.detail["origin"] == {"kind": "module", "batch_idx": 3, "where": "2"}


def test_raise_policy_stops_before_any_update_of_the_bad_step():
    data = classification_data()
    model = mlp()
    reference = copy.deepcopy(model)
    _hand_loop_until(reference, data, steps=K - 1)
    with pytest.raises(NonFiniteError, match=f"step {K}: the loss went non-finite") as excinfo:
        SafeTrainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            loader(data, shuffle=False),
            loss_fn=nonfinite_loss(nn.CrossEntropyLoss(), at_calls={K}),
            nan_guard="raise",
            progress_bar=False,
        ).fit()
    assert 'nan_guard="raise"' in str(excinfo.value)
    assert [f.code for f in excinfo.value.findings] == ["nonfinite-loss"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def _hand_loop_until(model: nn.Module, data, *, steps: int) -> None:
    accelerator = Accelerator()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt, dl = accelerator.prepare(model, opt, loader(data, shuffle=False))
    for step, (inputs, targets) in enumerate(dl, start=1):
        if step > steps:
            break
        accelerator.backward(nn.functional.cross_entropy(model(inputs), targets))
        opt.step()
        opt.zero_grad()
    _reset_accelerate()


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_fused"])
def test_more_skips_in_a_row_than_allowed_raise_nonfinite_error(name):
    model = mlp()
    with pytest.raises(NonFiniteError, match="4 optimizer steps in a row") as excinfo:
        SafeTrainer(
            model,
            OPTIMIZERS[name](model.parameters()),
            loader(classification_data()),
            loss_fn=nonfinite_loss(nn.CrossEntropyLoss(), at_calls=range(3, 12)),
            max_consecutive_skips=3,
            rollback=False,  # with rollback the run would go back to step 0 instead (test_rollback.py)
            log_every=10,
            progress_bar=False,
        ).fit()
    assert "max_consecutive_skips=3" in str(excinfo.value)
    assert any(f.code == "nonfinite-loss" for f in excinfo.value.findings)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skips_below_the_limit_do_not_escalate():
    model = mlp()
    result = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        loader(classification_data()),
        loss_fn=nonfinite_loss(nn.CrossEntropyLoss(), at_calls={2, 3, 4, 6, 7, 8}),
        max_consecutive_skips=3,
        progress_bar=False,
    ).fit()
    assert result.skipped_steps == 6


def test_guard_off_lets_nan_reach_the_parameters():
    model = mlp()
    SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        loader(classification_data()),
        loss_fn=nonfinite_loss(nn.CrossEntropyLoss(), at_calls={K}),
        nan_guard="off",
        progress_bar=False,
    ).fit()
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_one_bad_micro_batch_skips_the_whole_accumulated_step():
    model = mlp()
    result = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
        loader(classification_data()),
        loss_fn=nonfinite_loss(nn.CrossEntropyLoss(), at_calls={6}),  # 2nd micro-batch of step 2
        gradient_accumulation_steps=4,
        progress_bar=False,
    ).fit()
    assert result.skipped_steps == 1 and [e.step for e in result.events if e.kind == "skip"] == [2]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_run_skips_a_nan_step():
    model = mlp()
    result = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        loader(classification_data()),
        loss_fn=nonfinite_loss(nn.CrossEntropyLoss(), at_calls={K}),
        mixed_precision="bf16",
        progress_bar=False,
    ).fit()
    assert result.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_history_loss_excludes_skipped_steps_and_counts_them():
    model = mlp()
    result = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        loader(classification_data()),
        loss_fn=nonfinite_loss(nn.CrossEntropyLoss(), at_calls={2}),
        log_every=4,
        progress_bar=False,
    ).fit()
    assert math.isfinite(result.history[0]["loss"]) and result.history[0]["skipped_steps"] == 1


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_fused"])
def test_the_named_parameter_is_right_when_earlier_parameters_have_no_gradient(name):
    model = mlp()
    model[0].requires_grad_(False)  # frozen first layer: its parameters get no gradient
    result = SafeTrainer(
        model,
        OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad]),
        loader(classification_data()),
        loss_fn=nn.CrossEntropyLoss(),
        callbacks=[NonFiniteGradient("2.bias", step=2)],
        log_every=4,
        progress_bar=False,
    ).fit()
    skip = next(e for e in result.events if e.kind == "skip")
    assert skip.detail["params"] == ["2.bias"]
