"""Rollback under Lightning: a divergence restores safeloop's checkpoint in place and the fit goes on.

A poisoned step (its loss multiplied by 1000 under SGD with momentum: one update throws the
weights far off, and the loss stays high) must be rolled back to the newest healthy checkpoint at
the batch's end: the parameters and the optimizer state bitwise those of the checkpoint's
safetensors files, the learning rate cut, Lightning's counters and data going on (no batch
drawn twice), and the fit ending far below the same run without rollback. A run of skipped steps
past ``max_consecutive_skips`` rolls back too; past ``max_rollbacks`` the fit stops with
``DivergenceError``. Automatic and manual optimization alike; DDP in
``tests/distributed/test_lightning_ddp.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("lightning")

import lightning.pytorch as pl

from safeloop import ConfigError, DivergenceError
from safeloop.checkpoint.state import read_state
from safeloop.lightning import SafeLoopCallback
from safeloop.lightning.rollback import NOT_REPLAYED
from tests.helpers.lightning_models import QUIET, Classifier, acted, batches, trainer
from tests.integration.test_nan_guard import OPTIMIZERS

pytestmark = [pytest.mark.usefixtures("one_thread"), *(pytest.mark.filterwarnings(q) for q in QUIET)]

LR = 0.05
# spikes are confirmed after 3 spiking steps and read at the next log step; checkpoints every 10
SETTINGS = {"log_every": 5, "spike_warmup": 10, "checkpoint_every": 10, "summary": False}


class _Poisoned(Classifier):
    """SGD with momentum; the loss of each optimizer step in ``poison_at`` is multiplied by 1000.

    The step is Lightning's ``global_step + 1``, which a rollback does not rewind: a poisoned step
    is met once, as a bad batch is.
    """

    def __init__(self, poison_at: set[int], *, manual: bool = False, scheduler: bool = False) -> None:
        super().__init__(lambda params: torch.optim.SGD(params, lr=LR, momentum=0.9), manual=manual)
        self.poison_at = poison_at
        self.with_steplr = scheduler

    def loss(self, batch, batch_idx):
        loss = super().loss(batch, batch_idx)
        return loss * 1000.0 if self.trainer.global_step + 1 in self.poison_at else loss

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.parameters())
        if not self.with_steplr:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _Watch(pl.Callback):
    """After SafeLoopCallback: the batches drawn; the state and the checkpoint right after each rollback."""

    def __init__(self, guard: SafeLoopCallback) -> None:
        self.guard = guard
        self.drawn: list[tuple[int, int]] = []
        self.after: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.drawn.append((trainer.current_epoch, batch_idx))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rollbacks = [e for e in self.guard.events if e.kind == "rollback"]
        if len(rollbacks) > len(self.after):
            optimizer = trainer.optimizers[0]
            schedulers = trainer.lr_scheduler_configs
            self.after.append(
                {
                    "step": trainer.global_step,
                    "model": {k: v.clone() for k, v in pl_module.state_dict().items()},
                    "state": copy.deepcopy(optimizer.state_dict()["state"]),
                    "lr": optimizer.param_groups[0]["lr"],
                    "scheduler": schedulers[0].scheduler.last_epoch if schedulers else None,
                    # read now: rotation may remove it before the fit ends
                    "saved": read_state(Path(rollbacks[-1].detail["path"])),
                }
            )


def _fit(
    module: pl.LightningModule, steps: int = 60, **guards
) -> tuple[SafeLoopCallback, _Watch, pl.Trainer]:
    callback = SafeLoopCallback(**{**SETTINGS, **guards})
    watch = _Watch(callback)
    fitted = trainer(callback, watch, max_steps=steps, max_epochs=-1)
    fitted.fit(module, batches(n=480))  # 60 batches of 8: one epoch
    return callback, watch, fitted


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_a_poisoned_step_rolls_back_in_place_to_the_last_healthy_checkpoint_and_trains_on(tmp_path, manual):
    diverged, _, _ = _fit(_Poisoned({25}, manual=manual), rollback=False)
    callback, watch, fitted = _fit(_Poisoned({25}, manual=manual), checkpoint_dir=tmp_path)

    rollback, scale = [e for e in acted(callback)]
    # the spike of steps 25-27 is read at the log step of step 30; step 20 is the newest healthy one
    assert (rollback.kind, rollback.step, rollback.detail["reason"]) == ("rollback", 20, "loss-spike")
    assert rollback.detail["detected_at"] == 30 and rollback.detail["anomaly_start"] == 25
    assert rollback.detail["skipped_batches"] == 10 and rollback.detail["data"] == NOT_REPLAYED
    assert (
        scale.kind == "lr_scale"
        and scale.detail["lr_before"] == [LR]
        and scale.detail["lr_after"] == [LR / 2]
    )
    # in place at the batch's end: bitwise the checkpoint's weights and momentum buffers
    [after] = watch.after
    saved = after["saved"]
    assert Path(rollback.detail["path"]) == tmp_path / "step-00000020" and after["step"] == 30
    assert saved.model.keys() == after["model"].keys()
    assert all(torch.equal(saved.model[k], after["model"][k]) for k in saved.model)
    buffers = saved.parts["optimizer"]["state"]
    assert buffers.keys() == after["state"].keys() and all(
        torch.equal(buffers[i]["momentum_buffer"], after["state"][i]["momentum_buffer"]) for i in buffers
    )
    assert after["lr"] == LR / 2 and fitted.optimizers[0].param_groups[0]["lr"] == LR / 2
    # Lightning's counters and data went on: every batch drawn once, 60 steps in all
    assert watch.drawn == [(0, i) for i in range(60)]
    assert fitted.global_step == callback.result.global_step == 60 and callback.result.rollbacks == 1
    ours, theirs = callback.result.history[-1]["loss"], diverged.result.history[-1]["loss"]
    assert ours < 0.5 < 100 < theirs, (ours, theirs)
    assert [
        f.message.endswith("Nothing was restored.") for f in diverged.findings if f.code == "loss-spike"
    ] == [True]
    assert acted(diverged) == [] and diverged.result.rollbacks == 0


def test_the_lr_scheduler_is_restored_with_the_weights_and_scaled():
    callback, watch, fitted = _fit(_Poisoned({25}, scheduler=True))
    [after] = watch.after
    # the schedule is the checkpoint's (20 steps: two decays), Lightning's step count is not
    assert after["scheduler"] == 20 and after["step"] == 30
    assert after["lr"] == pytest.approx(LR * 0.8**2 * 0.5, rel=1e-12)
    scheduler = fitted.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [LR * 0.5] and scheduler.last_epoch == 20 + 30
    assert fitted.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.5 * 0.8**5, rel=1e-12)
    folder = Path(next(e for e in callback.events if e.kind == "rollback").detail["path"]).parent
    assert not folder.exists()  # the temporary folder is removed at the end of the fit


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_fused"], ids=["host-read", "on-device"])
def test_a_run_of_skips_past_the_limit_rolls_back_instead_of_raising(name):
    module = Classifier(OPTIMIZERS[name], nan_at={2, 3, 4})
    initial = copy.deepcopy(module.state_dict())
    callback = SafeLoopCallback(max_consecutive_skips=2, log_every=4, summary=False)
    watch = _Watch(callback)
    fitted = trainer(callback, watch)
    fitted.fit(module, batches())
    kinds = [(e.kind, e.step) for e in acted(callback)]
    # a skip read on the host is learnt at its step (5); one decided on the device at the log step (8)
    detected = 5 if name == "sgd_momentum" else 8
    assert kinds == [("skip", 3), ("skip", 4), ("skip", 5), ("rollback", 0), ("lr_scale", 0)]
    rollback = acted(callback)[3].detail
    assert (rollback["reason"], rollback["detected_at"], rollback["skipped_batches"]) == (
        "nonfinite",
        detected,
        detected,
    )
    [after] = watch.after  # the state before the first step, bitwise
    assert all(torch.equal(initial[k], after["model"][k]) for k in initial) and after["state"] == {}
    assert fitted.global_step == 12 and callback.result.skipped_steps == 3


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_past_max_rollbacks_the_fit_stops_with_divergence_error_ranking_the_causes(manual):
    callback = SafeLoopCallback(max_rollbacks=1, **SETTINGS)  # no checkpoint_dir: a temporary folder
    with pytest.raises(DivergenceError) as caught:
        trainer(callback, max_steps=60, max_epochs=-1).fit(_Poisoned({25, 45}, manual=manual), batches(n=480))
    message = str(caught.value)
    assert "training diverged 2 time(s) and 1 rollbacks were already made (max_rollbacks)" in message
    assert "step 30: loss-spike" in message and "step 50: loss-spike" in message
    assert f"Learning rates tried: {LR:.3g}, {LR / 2:.3g}." in message
    causes = message.split("Most likely causes:\n")[1].splitlines()
    assert causes[0].startswith("  1. [exploding-grad]") and causes[1].startswith("  2. [lr-too-high]")
    assert {f.code for f in caught.value.findings} >= {"exploding-grad", "lr-too-high", "loss-spike"}
    # the step-40 checkpoint was written after the first rollback, on the healthy branch
    assert message.endswith(
        "The newest healthy checkpoint before it (step 40) was in a temporary folder, removed now: "
        "pass `SafeLoopCallback(checkpoint_dir=...)` to keep the checkpoints."
    )
    assert callback.report().startswith("safeloop: stopped by DivergenceError, 50 steps")
    assert callback.result is None and [e.kind for e in acted(callback)] == ["rollback", "lr_scale"]
    folder = Path(acted(callback)[0].detail["path"]).parent
    assert not folder.exists()  # the temporary checkpoints are removed after the error too


def test_checkpoint_dir_without_rollback_and_several_schedulers_with_it_are_refused(tmp_path):
    with pytest.raises(
        ConfigError, match=r"with `rollback=False`: under Lightning the callback's checkpoints"
    ):
        SafeLoopCallback(checkpoint_dir=tmp_path, rollback=False)

    class TwoSchedulers(Classifier):
        def configure_optimizers(self):
            optimizer = self.make_optimizer(self.parameters())
            schedulers = [
                torch.optim.lr_scheduler.StepLR(optimizer, 3),
                torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9),
            ]
            return [optimizer], schedulers

    module = TwoSchedulers()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(
        ConfigError, match=r"returned 2 LR schedulers \(StepLR, ExponentialLR\) and `rollback=True`"
    ):
        trainer(SafeLoopCallback(summary=False)).fit(module, batches())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())
    trainer(SafeLoopCallback(rollback=False, summary=False), max_steps=2).fit(TwoSchedulers(), batches())


def test_a_healthy_fit_writes_its_start_checkpoint_to_a_temporary_folder_and_removes_it():
    module = Classifier()
    callback = SafeLoopCallback(summary=False)
    trainer(callback).fit(module, batches())
    [checkpoint] = callback.events
    assert (checkpoint.kind, checkpoint.step) == ("checkpoint", 0) and callback.result.rollbacks == 0
    assert not Path(checkpoint.detail["path"]).parent.exists()


def test_with_checkpoint_dir_divergence_error_names_the_checkpoint_to_start_again_from(tmp_path):
    callback = SafeLoopCallback(max_rollbacks=0, checkpoint_dir=tmp_path, **SETTINGS)
    module = _Poisoned({25})
    with pytest.raises(DivergenceError) as caught:
        trainer(callback, max_steps=60, max_epochs=-1).fit(module, batches(n=480))
    path = tmp_path / "step-00000020"
    assert str(caught.value).endswith(
        f"The newest healthy checkpoint before it is {path} (step 20): its model.safetensors holds the "
        "module's state_dict; start a new fit from it, at a lower learning rate: "
        "`module.load_state_dict(safetensors.torch.load_file(...))`."
    )
    assert "0 rollbacks were already made (max_rollbacks)" in str(caught.value)
    saved = load_file(path / "model.safetensors")  # what the message says to do
    fresh = _Poisoned(set())
    fresh.load_state_dict(saved)
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())


def test_the_rollbacks_made_go_into_lightnings_checkpoint_and_a_resumed_fit_keeps_the_budget():
    callback, _, _ = _fit(_Poisoned({25}), max_rollbacks=1)
    state = callback.state_dict()
    assert (state["rollbacks"], state["lr_scale"]) == (1, 0.5)
    resumed = SafeLoopCallback(max_rollbacks=1, **SETTINGS)
    resumed.load_state_dict(state)  # what Lightning does when it restores a checkpoint
    with pytest.raises(DivergenceError, match=r"and 1 rollbacks were already made \(max_rollbacks\)"):
        trainer(resumed, max_steps=60, max_epochs=-1).fit(_Poisoned({25}), batches(n=480))
