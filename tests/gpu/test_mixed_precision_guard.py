"""GPU-only checks of the NaN/Inf guard: fp16 scaler interplay and host syncs per step.

CI has no GPU: every test here skips with the reason. Run on a GPU machine with
`python -m pytest tests/gpu -q`.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

from safeloop import Callback, SafeTrainer
from safeloop.testing import nonfinite_loss
from tests.helpers.models import classification_data, loader, mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(mixed_precision: str, **kwargs):
    model = mlp()
    return SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
        loader(classification_data(n=256)),
        loss_fn=kwargs.pop("loss_fn", nn.CrossEntropyLoss()),
        mixed_precision=mixed_precision,
        progress_bar=False,
        **kwargs,
    )


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_nan_step_is_skipped_under_mixed_precision(precision):
    trainer = _run(precision, loss_fn=nonfinite_loss(nn.CrossEntropyLoss(), at_calls={7}), max_epochs=2)
    result = trainer.fit()
    assert result.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_fp16_scaler_overflows_are_counted_apart_and_do_not_escalate():
    # a loss scaled far beyond fp16 range overflows the gradients for the first steps
    trainer = _run("fp16", max_consecutive_skips=0, max_epochs=1, log_every=4)
    trainer.accelerator.scaler.update(2.0**40)
    result = trainer.fit()
    assert result.history[-1]["overflow_skips"] >= 1
    assert result.skipped_steps == 0


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_no_host_sync_on_steps_that_do_not_log(precision):
    syncs: list[int] = []

    class Count(Callback):
        def on_train_batch_start(self, trainer, batch, batch_idx):
            syncs.append(len(caught))

    trainer = _run(precision, max_steps=20, log_every=10, callbacks=[Count()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_step = [b - a for a, b in itertools.pairwise(syncs)]
    print(f"{precision}: host syncs per step {per_step}")
    # the fp16 scaler's own update reads nothing with a fused optimizer; only log steps read
    assert all(n == 0 for i, n in enumerate(per_step, start=1) if i % 10 != 0)
