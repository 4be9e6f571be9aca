"""The two findings of manual optimization: ``loss.backward()`` called directly, and no clipping.

``direct-backward``: a manual ``training_step`` that calls ``loss.backward()`` instead of
``self.manual_backward(loss)`` is named once, at the first step; under fp16, where torch's
``unscale_`` raises first, the finding names the cause of that error. ``exploding-grad`` with
nothing clipping: SafeTrainer's finding (the deep linear net of ``test_diagnostics.py`` whose
weights are scaled by 1.6 at step 46), completed with how to clip under Lightning, in manual and
in automatic optimization; a clipping call, even a loose one, leaves SafeTrainer's text. A
healthy manual run that clips gets neither.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.plugins import MixedPrecision

from safeloop.lightning import SafeLoopCallback
from tests.helpers.lightning_models import QUIET, Classifier, batches, trainer

pytestmark = [pytest.mark.usefixtures("one_thread"), *(pytest.mark.filterwarnings(q) for q in QUIET)]


class _DirectBackward(Classifier):
    """Manual optimization with a hand-written loop's habit: ``loss.backward()``."""

    def __init__(self) -> None:
        super().__init__(manual=True)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.loss(batch, batch_idx).backward()
        optimizer.step()


def test_loss_backward_called_directly_in_manual_optimization_is_named_once(caplog):
    callback = SafeLoopCallback(log_every=4, summary=False)
    module = _DirectBackward()
    with caplog.at_level(logging.WARNING, logger="safeloop"):
        trainer(callback, max_steps=8).fit(module, batches())
    [finding] = [f for f in callback.findings if f.code == "direct-backward"]
    assert (finding.severity, finding.step, finding.count) == ("warning", 1, 1)
    assert finding.message.startswith("step 1: gradients reached `opt.step()`, while no loss went through")
    assert "`training_step` called `loss.backward()` itself" in finding.message
    assert finding.suggestion.startswith("Replace `loss.backward()` with `self.manual_backward(loss)`")
    assert [r.getMessage().split("]")[0] for r in caplog.records] == ["safeloop [direct-backward"]
    assert callback.result.global_step == 8  # a warning: the fit goes on, and trains
    assert callback.result.history[-1]["grad_norm"] > 0


def test_under_fp16_torchs_unscale_error_after_loss_backward_is_named_by_its_cause():
    callback = SafeLoopCallback(summary=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    fitted = trainer(callback, max_steps=4, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    with pytest.raises(AssertionError, match="Attempted unscale_ but _scale is None"):  # torch's, unchanged
        fitted.fit(_DirectBackward(), batches())
    [finding] = [f for f in callback.findings if f.code == "direct-backward"]
    assert finding.step == 1 and "the fp16 loss scaler's `unscale_` found no scale" in finding.message
    assert callback.report().startswith("safeloop: stopped by AssertionError")
    assert "step" not in vars(fitted.optimizers[0]) and "clip_gradients" not in vars(fitted.precision_plugin)


class _ClippingManual(Classifier):
    """A healthy manual ``training_step`` that clips the way Lightning's checklist says."""

    def __init__(self) -> None:
        super().__init__(manual=True)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.loss(batch, batch_idx))
        self.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        optimizer.step()


def test_a_healthy_manual_run_that_clips_gives_neither_finding():
    callback = SafeLoopCallback(log_every=5, summary=False)
    fitted = trainer(callback, max_epochs=4)
    fitted.fit(_ClippingManual(), batches())
    assert [f for f in callback.findings if f.severity != "info"] == []
    assert callback._session.checks.clip_calls == 48  # every step's call was seen
    assert "clip_gradients" not in vars(fitted.precision_plugin)  # the plugin's own method is back


class _DeepLinear(pl.LightningModule):
    """``test_diagnostics.py``'s 10-layer linear net (SGD, MSE); ``clip`` > 0 clips each step."""

    def __init__(self, *, manual: bool, clip: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(10)])
        for layer in self.net:
            nn.init.orthogonal_(layer.weight)
        self.automatic_optimization = not manual
        self.clip = clip

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        optimizer.step()
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _ScaleWeights(pl.Callback):
    """Multiplies every weight by 1.6 before step 46 (~110x through 10 layers)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == 46:
            with torch.no_grad():
                for param in pl_module.parameters():
                    param.mul_(1.6)


def _exploding(module: pl.LightningModule, **trainer_kwargs) -> list:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 16, generator=gen), torch.randn(128, 16, generator=gen)
    callback = SafeLoopCallback(rollback=False, summary=False)
    fitted = trainer(callback, _ScaleWeights(), max_steps=50, max_epochs=-1, **trainer_kwargs)
    fitted.fit(module, DataLoader(TensorDataset(x, y), batch_size=128))
    return [f for f in callback.findings if f.code == "exploding-grad"]


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_exploding_gradients_with_nothing_clipping_name_the_lightning_way_to_clip(manual):
    [finding] = _exploding(_DeepLinear(manual=manual))
    assert finding.severity == "warning" and "at step 46" in finding.message  # SafeTrainer's finding
    assert "No gradient clipping was seen in this fit" in finding.message
    if manual:
        assert "called no `self.clip_gradients(...)`" in finding.message
        assert finding.suggestion.startswith(
            "Clip in `training_step`, between `self.manual_backward(loss)` and `opt.step()`: "
            '`self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")`'
        )
    else:
        assert finding.suggestion.startswith(
            "Clip gradients: `Trainer(gradient_clip_val=1.0)` or `SafeLoopCallback(clip_grad_norm=1.0)`"
        )
    assert finding.suggestion.endswith("or add normalisation layers / a smaller initialisation.")


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_a_loose_clipping_call_leaves_safetrainers_exploding_grad_text(manual):
    # a bound far above the norms clips nothing, so the gradients still explode; the advice is
    # then SafeTrainer's (a tighter bound, a lower learning rate), not "add a clipping call"
    module = _DeepLinear(manual=manual, clip=1e9)
    [finding] = _exploding(module, **({} if manual else {"gradient_clip_val": 1e9}))
    assert "No gradient clipping was seen" not in finding.message
    assert finding.suggestion.startswith("Clip gradients (clip_grad_norm=1.0), lower the learning rate")


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_under_fsdp1_the_way_to_clip_is_the_callbacks(manual):
    # Lightning refuses norm clipping under FSDPStrategy and FSDP1's own clip_grad_norm_ cannot
    # run inside training_step: the advice names the callback's clip alone (the strategy object
    # is real; FSDP1 itself needs several processes, tests/distributed/test_lightning_fsdp1.py)
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from safeloop.lightning.optimization_checks import OptimizationChecks
    from safeloop.results import Finding

    stand_in = SimpleNamespace(strategy=FSDPStrategy(), precision_plugin=object(), gradient_clip_val=None)
    checks = OptimizationChecks(stand_in, Classifier(manual=manual), callback_clips=False)
    exploding = Finding(
        code="exploding-grad", severity="warning", message="Gradients exploded.", suggestion="Or else."
    )
    finding = checks.explain(exploding)
    assert (
        finding.message
        == "Gradients exploded. No gradient clipping was seen in this fit (SafeLoopCallback clips nothing)."
    )
    assert finding.suggestion.startswith(
        "Clip gradients with `SafeLoopCallback(clip_grad_norm=1.0)`: under FSDPStrategy"
    )
    assert "gradient_clip_val" not in finding.suggestion and "self.clip_gradients" not in finding.suggestion
    assert finding.suggestion.endswith(" Or else.")
