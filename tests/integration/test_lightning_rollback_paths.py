"""Rollback under Lightning, the paths beside a divergence found at a batch's end.

``test_lightning_rollback.py`` covers a divergence found at ``on_train_batch_end``. Here:

- the fp16 ``GradScaler`` (Lightning's ``MixedPrecision`` plugin with a CPU scaler: the scaler
  the callback sees as ``processes.scaler`` and saves with each checkpoint): its scale and growth
  tracker after a rollback are the checkpoint's, whatever the skips or the growth since did to
  them, and the next step goes on from them (a run of skips, a loss spike, a rollback to the
  checkpoint written before the scaler ever scaled; automatic and manual optimization; AdamW and
  fused AdamW);
- a divergence found at the end of training (the last log step, run in ``on_train_end``): it
  still rolls back, and the module and optimizer the fit leaves are bitwise the checkpoint's;
- a divergence met inside a step (manual optimization, two ``opt.step()`` in one
  ``training_step``: the first step's boundary runs in the second one's
  ``on_before_optimizer_step``): the rollback waits for the batch's end, after the second update,
  and the parameters and optimizer state are then the checkpoint's.

Faults are placed by optimizer step (Lightning's ``global_step + 1``), which a rollback does not
rewind: each is met once, as a bad batch is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.plugins import MixedPrecision

from safeloop.checkpoint.state import SavedState, read_state
from safeloop.lightning import SafeLoopCallback
from tests.helpers.lightning_models import QUIET, Classifier, acted, batches, trainer

pytestmark = [pytest.mark.usefixtures("one_thread"), *(pytest.mark.filterwarnings(q) for q in QUIET)]

SETTINGS = {
    "log_every": 5,
    "spike_warmup": 10,
    "checkpoint_every": 10,
    "max_consecutive_skips": 2,
    "summary": False,
}
SGD = "sgd"
OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = {
    SGD: lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
}
INIT_SCALE, GROWTH_INTERVAL = 16.0, 3  # the scale doubles every 3 applied steps, halves at a skip


class _Faulty(Classifier):
    """A classifier whose loss goes wrong at given optimizer steps.

    Args:
        optimizer (`str`): a key of ``OPTIMIZERS``.
        nan (`Iterable[int]`): steps whose loss is NaN.
        times (`Iterable[int]`): steps whose loss is multiplied by 1000 (under SGD with momentum
            one such update throws the weights off, and the loss stays high).
        plus (`Iterable[int]`): steps whose loss is raised by 100 (a spike of the loss alone: the
            gradients are unchanged, so no fp16 overflow).
        manual (`bool`): manual optimization.
        two_steps (`bool`): manual optimization with two ``opt.step()`` per ``training_step``,
            one for each half of the batch.
    """

    def __init__(
        self,
        optimizer: str,
        *,
        nan: Iterable[int] = (),
        times: Iterable[int] = (),
        plus: Iterable[int] = (),
        manual: bool = False,
        two_steps: bool = False,
    ) -> None:
        super().__init__(OPTIMIZERS[optimizer], manual=manual or two_steps)
        self.nan, self.times, self.plus = set(nan), set(times), set(plus)
        self.two_steps = two_steps

    def faulty(self, loss: torch.Tensor) -> torch.Tensor:
        step = self.trainer.global_step + 1
        if step in self.nan:
            return loss * float("nan")
        if step in self.times:
            return loss * 1000.0
        return loss + 100.0 if step in self.plus else loss

    def loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.faulty(super().loss(batch, batch_idx))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if not self.two_steps:
            return super().training_step(batch, batch_idx)
        inputs, targets = batch
        optimizer = self.optimizers()
        for half in (slice(0, len(inputs) // 2), slice(len(inputs) // 2, None)):
            loss = self.faulty(nn.functional.cross_entropy(self(inputs[half]), targets[half]))
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()  # the first one's boundary runs inside the second one's hooks
        return None


def _scaler_state(trainer: pl.Trainer) -> tuple[float, int] | None:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return None if scaler is None else (scaler.get_scale(), scaler._get_growth_tracker())


def _same_as(saved: SavedState, module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> bool:
    """The module's state and the optimizer's are bitwise those of the checkpoint ``saved``."""
    model, state = module.state_dict(), optimizer.state_dict()["state"]
    kept = saved.parts["optimizer"]["state"]
    return (
        saved.model.keys() == model.keys()
        and all(torch.equal(saved.model[key], value) for key, value in model.items())
        and kept.keys() == state.keys()
        and all(
            torch.equal(kept[i][name], value) if isinstance(value, torch.Tensor) else kept[i][name] == value
            for i in state
            for name, value in state[i].items()
        )
    )


class _Scales(pl.Callback):
    """The fp16 scaler's (scale, growth tracker) at each batch's end, by Lightning's step."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[float, int] | None] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.at[trainer.global_step] = _scaler_state(trainer)


class _Watch(pl.Callback):
    """Placed after SafeLoopCallback: what each hook sees once the callback's own hook has run.

    Attributes:
        before_step (`dict`): by step about to be taken: the rollbacks made, the finding codes and
            the events so far, the module's state (the previous step's update made, not this one's).
        restored (`list`): for each rollback, the hook it was made in, Lightning's step, whether
            module and optimizer are then bitwise the checkpoint's, the scaler's state and the
            checkpoint's, and the checkpoint's model state.
    """

    def __init__(self, guard: SafeLoopCallback) -> None:
        self.guard = guard
        self.before_step: dict[int, dict[str, Any]] = {}
        self.restored: list[dict[str, Any]] = []

    def _rollbacks(self) -> list[Any]:
        return [event for event in self.guard.events if event.kind == "rollback"]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_step[trainer.global_step + 1] = {
            "rollbacks": len(self._rollbacks()),
            "codes": {finding.code for finding in self.guard.findings},
            "events": [(event.kind, event.step) for event in self.guard.events],
            "weights": {key: value.clone() for key, value in pl_module.state_dict().items()},
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._note("on_train_batch_end", trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._note("on_train_end", trainer, pl_module)

    def _note(self, hook: str, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        rollbacks = self._rollbacks()
        if len(rollbacks) <= len(self.restored):
            return
        saved = read_state(Path(rollbacks[-1].detail["path"]))  # read now: rotation may remove it
        scaler = saved.parts.get("scaler")
        self.restored.append(
            {
                "hook": hook,
                "step": trainer.global_step,
                "same": _same_as(saved, module, trainer.optimizers[0]),
                "scaler": _scaler_state(trainer),
                "saved_scaler": None if scaler is None else (scaler["scale"], scaler["_growth_tracker"]),
                "saved_model": saved.model,
            }
        )


def _fit(
    module: _Faulty, *, steps: int, fp16: bool = False, epochs: int = -1, n: int = 480, **guards: Any
) -> tuple[SafeLoopCallback, _Watch, _Scales, pl.Trainer]:
    """Fit ``module`` with the callback between a scale recorder (before it) and a watch (after it)."""
    callback = SafeLoopCallback(**{**SETTINGS, **guards})
    before, watch = _Scales(), _Watch(callback)
    plugins = []
    if fp16:
        scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    fitted = trainer(before, callback, watch, max_steps=steps, max_epochs=epochs, plugins=plugins)
    fitted.fit(module, batches(n=n))
    return callback, watch, before, fitted


def _next(scale: float, tracker: int) -> tuple[float, int]:
    """The scaler's state after one applied step from (``scale``, ``tracker``)."""
    return (scale * 2, 0) if tracker + 1 == GROWTH_INTERVAL else (scale, tracker + 1)


# -- the fp16 scaler ---------------------------------------------------------------------------

# fault, rollback target, detected at, the checkpoint's scaler state; under fp16 the scaler decides
# every step on the device (the guard's flag goes into its found_inf), so skips are learnt at log steps
SCALER_CASES = {
    # three NaN steps halve the scale three times; the checkpoint of step 10 is from before them
    "skips": ({"nan": {13, 14, 15}}, 10, 15, (128.0, 1)),
    # the loss alone spikes: no skip, the scale grew 8x since the checkpoint of step 20
    "spike": ({"plus": {25, 26, 27}}, 20, 30, (1024.0, 2)),
    # the checkpoint before step 1, written before the scaler ever scaled: its initial state
    "to-start": ({"nan": {2, 3, 4}}, 0, 5, (INIT_SCALE, 0)),
}


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-fused"])
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize("case", list(SCALER_CASES))
def test_a_rollback_restores_the_fp16_scale_and_growth_tracker_of_its_checkpoint(case, manual, optimizer):
    faults, target, detected, checkpointed = SCALER_CASES[case]
    module = _Faulty(optimizer, manual=manual, **faults)
    callback, watch, before, _ = _fit(module, steps=40, fp16=True)

    [rollback] = [e for e in acted(callback) if e.kind == "rollback"]
    assert (rollback.step, rollback.detail["detected_at"]) == (target, detected)
    [restored] = watch.restored
    assert (restored["hook"], restored["step"], restored["same"]) == ("on_train_batch_end", detected, True)
    assert restored["saved_scaler"] == checkpointed
    # the branch rolled back from had moved the scaler away from the checkpoint's state ...
    assert before.at[detected] != checkpointed
    # ... and the rollback put it back, into the tensors the scaler steps with: the next step goes on
    assert restored["scaler"] == checkpointed and before.at[detected + 1] == _next(*checkpointed)
    assert all(entry["overflow_skips"] == 0 for entry in callback.result.history)  # no fp16 overflow


# -- a divergence found at the end of training --------------------------------------------------

END_CASES = {
    # one x1000 update at step 31: steps 31-33 spike, confirmed by the last log step (33 of 33)
    "spike": (SGD, {"times": {31}}, {}),
    "spike-manual": (SGD, {"times": {31}, "manual": True}, {}),
    # skips decided on the device are learnt at the last log step only
    "skips-fused": ("adamw-fused", {"nan": {31, 32, 33}}, {}),
    "skips-fused-manual": ("adamw-fused", {"nan": {31, 32, 33}, "manual": True}, {}),
    # the fit ends when the data runs out (one epoch of 33 batches), not at max_steps
    "spike-epoch-end": (SGD, {"times": {31}}, {"steps": -1, "epochs": 1, "n": 264}),
    # the fp16 scaler decides on the device too; its state comes back with the weights
    "skips-fp16": ("adamw", {"nan": {31, 32, 33}}, {"fp16": True}),
}


@pytest.mark.parametrize("case", list(END_CASES))
def test_a_divergence_found_at_the_end_of_training_rolls_back_and_the_fit_leaves_the_checkpoint(
    tmp_path, case
):
    optimizer, faults, fit = END_CASES[case]
    module = _Faulty(optimizer, **faults)
    callback, watch, before, fitted = _fit(module, **{"steps": 33, **fit}, checkpoint_dir=tmp_path)

    [rollback] = [e for e in acted(callback) if e.kind == "rollback"]
    assert (rollback.step, rollback.detail["detected_at"]) == (30, 33)
    assert rollback.detail["reason"] == ("loss-spike" if case.startswith("spike") else "nonfinite")
    # not found at the last batch's end: at the last log step, in on_train_end, and rolled back there
    assert watch.before_step[33]["rollbacks"] == 0
    [restored] = watch.restored
    assert (restored["hook"], restored["step"], restored["same"]) == ("on_train_end", 33, True)
    # the module and optimizer the fit leaves: bitwise the checkpoint's files
    saved = load_file(tmp_path / "step-00000030" / "model.safetensors")
    assert saved.keys() == module.state_dict().keys()
    assert all(torch.equal(saved[key], value) for key, value in module.state_dict().items())
    assert _same_as(read_state(tmp_path / "step-00000030"), module, fitted.optimizers[0])
    lr = OPTIMIZERS[optimizer]([nn.Parameter(torch.zeros(1))]).param_groups[0]["lr"]
    assert fitted.optimizers[0].param_groups[0]["lr"] == lr / 2
    assert "step" not in vars(fitted.optimizers[0])  # the gate is off again after the rollback
    result = callback.result
    assert (result.global_step, fitted.global_step, result.rollbacks) == (33, 33, 1)
    assert sorted(p.name for p in tmp_path.glob("step-*"))[-1] == "step-00000030"
    if "fp16" in fit:
        assert restored["scaler"] == restored["saved_scaler"] != before.at[33]


# -- a divergence met inside a step: two opt.step() in one training_step ----------------------

# optimizer, faults, rollback target, detected at: an odd step is the first of its batch
STEP_CASES = {
    # steps 31-35 read at the log step of step 35, whose boundary runs inside step 36
    "spike": (SGD, {"times": {31}}, 30, 35),
    # a run of skips read on the host, learnt at step 13's boundary, inside step 14
    "skips-host-read": (SGD, {"nan": {11, 12, 13}}, 10, 13),
    # decided on the device: learnt at the log step of step 15, inside step 16
    "skips-fused": ("adamw-fused", {"nan": {11, 12, 13}}, 10, 15),
    # the fp16 scaler decides on the device; its state is the checkpoint's after the rollback
    "skips-fp16": ("adamw", {"nan": {11, 12, 13}}, 10, 15),
    # met at the second step's boundary, at the batch's end itself: rolled back there too (the
    # checkpoint of step 10 was written during the run of skips, so the target is the start)
    "skips-batch-end": ("adamw", {"nan": {10, 11, 12}}, 0, 12),
    # checkpoints every 5 steps: the target, step 25, was written at its boundary inside step 26
    "to-a-checkpoint-written-inside-a-step": (SGD, {"times": {27}}, 25, 30),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_a_divergence_met_inside_a_step_rolls_back_at_the_batch_end_to_the_checkpoint(case):
    optimizer, faults, target, detected = STEP_CASES[case]
    module = _Faulty(optimizer, two_steps=True, **faults)
    every = 5 if target % 2 else 10
    callback, watch, before, fitted = _fit(
        module, steps=50, fp16=case.endswith("fp16"), checkpoint_every=every
    )

    [rollback] = [e for e in acted(callback) if e.kind == "rollback"]
    assert (rollback.step, rollback.detail["detected_at"]) == (target, detected)
    end = detected + detected % 2  # Lightning's step at the end of the batch that found it
    [restored] = watch.restored
    assert (restored["hook"], restored["step"], restored["same"]) == ("on_train_batch_end", end, True)
    if detected % 2:  # found inside the batch's second step: the rollback waited for the batch end
        seen = watch.before_step[end]
        found = "loss-spike" in seen["codes"] if case == "spike" else ("skip", 13) in seen["events"]
        assert found and seen["rollbacks"] == 0
    assert watch.before_step[end + 1]["rollbacks"] == 1  # the next batch starts from the checkpoint
    if case.endswith("fp16"):
        assert restored["scaler"] == restored["saved_scaler"] != before.at[end]
    if target % 2:  # written inside step 26: step 25's weights, before step 26's update
        saved = restored["saved_model"]
        weights = watch.before_step[target + 1]["weights"]
        assert all(torch.equal(saved[key], value) for key, value in weights.items())
        assert not all(
            torch.equal(saved[key], value) for key, value in watch.before_step[target]["weights"].items()
        )
    assert (callback.result.global_step, fitted.global_step, callback.result.rollbacks) == (50, 50, 1)
    if case == "spike":  # rolled back at half the rate, the fit trains on
        assert (
            callback.result.history[-1]["loss"] < 1.0 < 100 < max(h["loss"] for h in callback.result.history)
        )
