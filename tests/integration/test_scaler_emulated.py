"""The guard with a GradScaler on CPU: Accelerate creates none there, so one is attached by hand.

This drives the real `torch.amp.GradScaler` logic (scaled backward, unscale_, found_inf, skip,
scale update) through SafeTrainer without a GPU; tests/gpu repeats it under real fp16 autocast.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from safeloop import SafeTrainer
from safeloop.testing import nonfinite_loss
from tests.helpers.models import classification_data, loader, mlp


def _scaled_accelerator(init_scale: float) -> Accelerator:
    accelerator = Accelerator()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    accelerator.native_amp = True
    accelerator.state._mixed_precision = "fp16"  # unscale_gradients() acts only under "fp16"
    return accelerator


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "adamw-fused"])
def test_guard_skip_goes_through_the_scaler_and_is_counted_as_a_guard_skip(fused):
    model = mlp()
    accelerator = _scaled_accelerator(init_scale=2.0**8)
    result = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused),
        loader(classification_data()),
        loss_fn=nonfinite_loss(nn.CrossEntropyLoss(), at_calls={4}),
        accelerator=accelerator,
        log_every=4,
        progress_bar=False,
    ).fit()
    assert result.skipped_steps == 1
    assert [e.step for e in result.events if e.kind == "skip"] == [4]
    # the scaler skipped it too, but a NaN loss is a fault, not the scale settling
    assert result.history[-1]["overflow_skips"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scaler_overflows_alone_are_counted_apart_and_never_escalate():
    model = mlp()
    # a scale far beyond what float32 gradients can hold: the first steps overflow, the scaler
    # halves its scale each time until the gradients fit
    accelerator = _scaled_accelerator(init_scale=3.0e38)
    result = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        loader(classification_data()),
        loss_fn=nn.CrossEntropyLoss(),
        accelerator=accelerator,
        max_consecutive_skips=0,  # any guard skip would raise
        log_every=12,
        progress_bar=False,
    ).fit()
    assert result.skipped_steps == 0
    assert result.history[-1]["overflow_skips"] >= 1
    assert accelerator.scaler.get_scale() < 3.0e38
