"""SafeTrainer applies exactly the updates of a hand-written Accelerate loop (CPU, fixed seed)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch import nn

from safeloop import SafeTrainer
from tests.helpers.models import DictDataset, DictModel, classification_data, loader, mlp, state_equal

SEED = 1234


def _reset_accelerate() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def hand_written_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataloader: Any,
    loss_of: Callable[[nn.Module, Any], torch.Tensor],
    *,
    epochs: int,
    accumulation: int = 1,
    clip: float | None = None,
    scheduler: Any = None,
    max_steps: int | None = None,
) -> dict[str, torch.Tensor]:
    """The loop from Accelerate's documentation, written out by hand (seeded as `seed=` does)."""
    set_seed(SEED)
    accelerator = Accelerator(gradient_accumulation_steps=accumulation)
    if scheduler is not None:
        model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    else:
        model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    set_seed(SEED)
    model.train()
    steps = 0
    for _ in range(epochs):
        for batch in dataloader:
            with accelerator.accumulate(model):
                loss = loss_of(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and clip is not None:
                    accelerator.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad()
                if accelerator.sync_gradients:
                    steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    state = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    _reset_accelerate()
    return state


def tuple_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs), targets)


def _assert_parity(initial: nn.Module, expected: dict, trained: nn.Module) -> None:
    actual = trained.state_dict()
    assert state_equal(expected, actual), "SafeTrainer's parameters differ from the hand-written loop"
    assert not state_equal(initial.state_dict(), actual), "parameters did not change: vacuous parity"


def test_adamw_matches_hand_written_loop_bitwise():
    data = classification_data()
    model = mlp()
    initial = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    expected = hand_written_loop(
        reference,
        torch.optim.AdamW(reference.parameters(), lr=1e-2),
        loader(data),
        tuple_loss,
        epochs=2,
    )
    result = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        loader(data),
        loss_fn=nn.CrossEntropyLoss(),
        max_epochs=2,
        seed=SEED,
        progress_bar=False,
    ).fit()
    assert result.global_step == 2 * 12
    _assert_parity(initial, expected, model)


def test_sgd_momentum_with_steplr_matches_hand_written_loop_bitwise():
    data = classification_data()
    model = mlp()
    initial = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    expected = hand_written_loop(
        reference,
        ref_opt,
        loader(data),
        tuple_loss,
        epochs=3,
        scheduler=torch.optim.lr_scheduler.StepLR(ref_opt, step_size=5, gamma=0.5),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    result = SafeTrainer(
        model,
        opt,
        loader(data),
        loss_fn=nn.CrossEntropyLoss(),
        lr_scheduler=scheduler,
        max_epochs=3,
        seed=SEED,
        log_every=5,
        progress_bar=False,
    ).fit()
    _assert_parity(initial, expected, model)
    # 36 steps, StepLR(5, 0.5): the lr of the step logged at 5 is the initial one, at 10 halved
    lrs = {entry["step"]: entry["lr"] for entry in result.history}
    assert (
        lrs[5] == pytest.approx(0.1)
        and lrs[10] == pytest.approx(0.05)
        and lrs[35] == pytest.approx(0.1 / 2**6)
    )


def test_gradient_accumulation_with_partial_last_window_matches_bitwise():
    data = classification_data(n=100)  # 13 batches of 8 (last of 4): windows 4, 4, 4, 1
    model = mlp()
    initial = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    expected = hand_written_loop(
        reference,
        torch.optim.AdamW(reference.parameters(), lr=1e-2),
        loader(data),
        tuple_loss,
        epochs=2,
        accumulation=4,
    )
    result = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        loader(data),
        loss_fn=nn.CrossEntropyLoss(),
        gradient_accumulation_steps=4,
        max_epochs=2,
        seed=SEED,
        progress_bar=False,
    ).fit()
    assert result.global_step == 2 * 4  # the partial window is a global step of its own
    _assert_parity(initial, expected, model)


def test_clip_grad_norm_matches_hand_written_loop_bitwise_and_clips():
    data = classification_data()
    model = mlp()
    with torch.no_grad():  # large weights so that gradient norms exceed the clip bound
        for p in model.parameters():
            p.mul_(8.0)
    initial = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    expected = hand_written_loop(
        reference,
        torch.optim.SGD(reference.parameters(), lr=0.05),
        loader(data),
        tuple_loss,
        epochs=2,
        clip=1.0,
    )
    result = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        loader(data),
        loss_fn=nn.CrossEntropyLoss(),
        clip_grad_norm=1.0,
        max_epochs=2,
        seed=SEED,
        log_every=1,
        progress_bar=False,
    ).fit()
    _assert_parity(initial, expected, model)
    # the logged norm is the pre-clipping one: clipping did act on some steps
    assert max(entry["grad_norm"] for entry in result.history) > 1.0


def test_dict_batch_model_returning_loss_matches_bitwise():
    data = DictDataset(classification_data())
    torch.manual_seed(3)
    model = DictModel()
    initial = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    expected = hand_written_loop(
        reference,
        torch.optim.AdamW(reference.parameters(), lr=1e-2),
        loader(data),
        lambda m, batch: m(**batch).loss,
        epochs=2,
    )
    SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        loader(data),
        max_epochs=2,
        seed=SEED,
        progress_bar=False,
    ).fit()
    _assert_parity(initial, expected, model)


def test_custom_training_step_matches_bitwise():
    data = classification_data()
    model = mlp()
    initial = copy.deepcopy(model)
    reference = copy.deepcopy(model)

    def training_step(m: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        inputs, targets = batch
        logits = m(inputs)
        # label smoothing plus an L2 term on the logits: something loss_fn alone cannot express
        loss = nn.functional.cross_entropy(logits, targets, label_smoothing=0.1) + 1e-3 * logits.pow(2).mean()
        return {"loss": loss, "logits": logits}

    expected = hand_written_loop(
        reference,
        torch.optim.AdamW(reference.parameters(), lr=1e-2),
        loader(data),
        lambda m, batch: training_step(m, batch)["loss"],
        epochs=2,
    )
    SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        loader(data),
        training_step=training_step,
        max_epochs=2,
        seed=SEED,
        progress_bar=False,
    ).fit()
    _assert_parity(initial, expected, model)


def test_max_steps_stops_mid_epoch_and_matches_bitwise():
    data = classification_data()
    model = mlp()
    initial = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    expected = hand_written_loop(
        reference,
        torch.optim.AdamW(reference.parameters(), lr=1e-2),
        loader(data),
        tuple_loss,
        epochs=100,
        max_steps=17,
    )
    result = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        loader(data),
        loss_fn=nn.CrossEntropyLoss(),
        max_epochs=1,  # max_steps wins: the run goes on into a second epoch
        max_steps=17,
        seed=SEED,
        progress_bar=False,
    ).fit()
    assert result.global_step == 17
    _assert_parity(initial, expected, model)
