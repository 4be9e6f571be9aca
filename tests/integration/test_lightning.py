"""``safeloop.lightning.SafeLoopCallback``: the package, its keywords, and the guards under Lightning.

The exact skip is checked the way ``test_nan_guard.py`` checks SafeTrainer's: a run whose step K
goes non-finite must end bitwise equal (parameters and optimizer state) to a plain Lightning run
that skipped step K by hand, in automatic and in manual optimization, for optimizers whose skip
is decided on the host and on the device. The diagnostics' parity with SafeTrainer is in
``test_lightning_diagnostics.py``.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

import lightning
import lightning.pytorch as pl
from lightning.pytorch.plugins import MixedPrecision

from safeloop import ConfigError, NonFiniteError, SafeTrainer
from safeloop.lightning import SafeLoopCallback
from tests.helpers.lightning_models import (
    QUIET,
    Classifier,
    acted,
    batches,
    optimizer_tensors,
    same_tensors,
    trainer,
)
from tests.integration.test_nan_guard import OPTIMIZERS, SignMomentum

pytestmark = [pytest.mark.usefixtures("one_thread"), *(pytest.mark.filterwarnings(q) for q in QUIET)]

K = 4  # the batch (0-based) whose loss goes non-finite: optimizer step K + 1


class _SignMomentumWithClosure(SignMomentum):
    """test_nan_guard's custom optimizer, calling the closure as Lightning requires of an optimizer."""

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        super().step()
        return loss


OPTIMIZERS = {**OPTIMIZERS, "custom": lambda params: _SignMomentumWithClosure(params, lr=1e-2)}


def _fit(module: pl.LightningModule, *callbacks: pl.Callback, **kwargs) -> pl.Trainer:
    fitted = trainer(*callbacks, **kwargs)
    fitted.fit(module, batches())
    return fitted


def _guarded(module: pl.LightningModule, **guards) -> tuple[SafeLoopCallback, pl.Trainer]:
    guards.setdefault("summary", False)
    callback = SafeLoopCallback(**guards)
    return callback, _fit(module, callback)


# -- the package ------------------------------------------------------------------------------


def test_no_module_of_safeloop_but_the_callbacks_own_imports_lightning():
    # every module, the trainer's and the other lightning ones included, in a fresh interpreter
    code = (
        "import importlib, pkgutil, sys, safeloop\n"
        "names = [m.name for m in pkgutil.walk_packages(safeloop.__path__, 'safeloop.')]\n"
        "for name in names:\n"
        "    if name != 'safeloop.lightning.callback':\n"
        "        importlib.import_module(name)\n"
        "safeloop.SafeTrainer\n"
        "roots = ('lightning', 'pytorch_lightning')\n"
        "print(len(names), sorted(m for m in sys.modules if m.split('.')[0] in roots))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    count, imported = out.stdout.split(" ", 1)
    assert int(count) > 100 and imported.strip() == "[]"


def test_without_lightning_the_import_names_the_extra_that_installs_it(monkeypatch):
    for name in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)  # what an environment without it gives
    with pytest.raises(ImportError) as caught:
        from safeloop.lightning import SafeLoopCallback as _  # noqa: F401
    message = str(caught.value)
    assert 'pip install "safeloop[lightning]"' in message and "lightning>=2.4,<3" in message


@pytest.mark.parametrize("version", ["2.3.3", "3.0.0", "dev"])
def test_an_unsupported_lightning_version_is_refused_at_construction(monkeypatch, version):
    monkeypatch.setattr(lightning, "__version__", version)
    with pytest.raises(ImportError) as caught:
        SafeLoopCallback()
    message = str(caught.value)
    assert f"the installed lightning is {version} (at " in message
    assert "supports lightning>=2.4,<3" in message and 'pip install "safeloop[lightning]"' in message


def test_the_keywords_are_safetrainers_with_the_same_defaults():
    ours = inspect.signature(SafeLoopCallback.__init__).parameters
    theirs = inspect.signature(SafeTrainer.__init__).parameters
    keywords = [name for name in ours if name != "self"]
    assert len(keywords) == 21
    assert {name: ours[name].default for name in keywords} == {
        name: theirs[name].default for name in keywords
    }
    documented = (SafeLoopCallback.__doc__ or "").split("Args:")[1].split("Raises:")[0]
    assert all(f"    {name} (`" in documented for name in keywords)


# -- bad inputs ---------------------------------------------------------------------------------


def test_a_bad_value_is_refused_with_safetrainers_words_under_the_callbacks_name():
    with pytest.raises(ConfigError) as ours:
        SafeLoopCallback(nan_guard="sometimes", log_every=0)
    with pytest.raises(ConfigError) as theirs:
        SafeTrainer(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), batches(),
                    nan_guard="sometimes", log_every=0)  # fmt: skip
    assert str(ours.value).startswith("SafeLoopCallback got 2 invalid arguments:")
    problems = [line for line in str(theirs.value).splitlines() if line.startswith("  - ")]
    assert problems and [line for line in str(ours.value).splitlines() if line.startswith("  - ")] == problems


def test_an_unknown_keyword_names_the_closest_and_a_safetrainer_keyword_its_lightning_setting():
    with pytest.raises(TypeError, match="did you mean `nan_guard`"):
        SafeLoopCallback(nan_gaurd="skip")
    with pytest.raises(TypeError) as caught:
        SafeLoopCallback(gradient_accumulation_steps=4, rollback_skip_batches=8)
    message = str(caught.value)
    assert "Trainer(accumulate_grad_batches=...)" in message
    assert "Lightning's loop owns the data iterator, so a rollback cannot move it" in message


def test_clipping_asked_of_both_the_callback_and_the_trainer_is_refused_before_any_update():
    module = Classifier()
    before = copy.deepcopy(module.state_dict())
    callback = SafeLoopCallback(clip_grad_norm=1.0)
    with pytest.raises(ConfigError) as caught:
        _fit(module, callback, gradient_clip_val=0.5)
    message = str(caught.value)
    assert "`SafeLoopCallback(clip_grad_norm=1.0)` and `Trainer(gradient_clip_val=0.5)` both clip" in message
    assert "remove `gradient_clip_val` from the Trainer" in message
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


class _TwoOptimizers(Classifier):
    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD(self.net[2].parameters(), lr=0.1),
        ]


def test_several_optimizers_are_refused_naming_them():
    with pytest.raises(ConfigError, match=r"returned 2 optimizers \(SGD, SGD\)"):
        _fit(_TwoOptimizers(manual=True), SafeLoopCallback())


class _SparseEmbedding(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.unused_lookup = nn.EmbeddingBag(10, 4, sparse=True)


def test_a_module_with_sparse_gradients_is_refused_naming_it_before_any_update():
    module = _SparseEmbedding()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ConfigError) as caught:
        _fit(module, SafeLoopCallback())
    message = str(caught.value)
    assert "`unused_lookup` (EmbeddingBag) has `sparse=True`" in message
    assert "Fix: `sparse=False`" in message and "or remove SafeLoopCallback for this run" in message
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("strategy", "options", "guards", "says"),
    [
        # FSDP1 with FlatParameters (the run with the module's own parameters is supported:
        # tests/distributed/test_lightning_fsdp1.py)
        ("FSDPStrategy", {"use_orig_params": False}, {}, ["FSDPStrategy with `use_orig_params=False`"]),
        # DeepSpeed clips inside its engine (guarded without the callback's clipping:
        # tests/distributed/test_lightning_deepspeed.py)
        (
            "DeepSpeedStrategy",
            {},
            {"clip_grad_value": 0.5},
            [
                "`SafeLoopCallback(clip_grad_value=0.5)` under DeepSpeedStrategy",
                "Fix: `Trainer(gradient_clip_val=...)`",
            ],
        ),
    ],
)
def test_a_strategy_whose_gradients_the_callback_cannot_reach_is_refused_naming_it(
    strategy, options, guards, says
):
    # both need a GPU to run under Lightning: the check is given the real strategy object
    from lightning.pytorch import strategies

    from safeloop.lightning.compat import check_trainer_setup

    trainer = SimpleNamespace(
        strategy=getattr(strategies, strategy)(**options),
        gradient_clip_val=None,
        precision_plugin=object(),
        lightning_module=Classifier(),
    )
    optimizers = [torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)]
    with pytest.raises(ConfigError, match="SafeLoopCallback cannot guard this Trainer") as error:
        check_trainer_setup(trainer, SafeLoopCallback(**guards).config, optimizers)
    for words in says:
        assert words in str(error.value)
    # FSDP1 (set up: its units are read) in tests/distributed/test_lightning_fsdp1.py
    for supported in (strategies.DDPStrategy(), strategies.DeepSpeedStrategy()):
        trainer.strategy = supported
        check_trainer_setup(trainer, SafeLoopCallback().config, optimizers)


@pytest.mark.parametrize("managed", [True, False])
def test_deepspeed_without_managed_gradient_accumulation_is_refused(managed):
    # unmanaged, DeepSpeed reduces inside its step, after the hook: nothing to measure or gate there
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from safeloop.lightning.compat import check_trainer_setup

    strategy = DeepSpeedStrategy()
    strategy.model = SimpleNamespace(managed_gradient_accumulation=lambda: managed)  # the engine's answer
    trainer = SimpleNamespace(
        strategy=strategy, gradient_clip_val=None, precision_plugin=object(), lightning_module=Classifier()
    )
    optimizers = [torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)]
    if managed:
        check_trainer_setup(trainer, SafeLoopCallback().config, optimizers)
        return
    with pytest.raises(ConfigError, match="`managed_gradient_accumulation: false`") as error:
        check_trainer_setup(trainer, SafeLoopCallback().config, optimizers)
    assert "Fix: leave `managed_gradient_accumulation` at its default (true)" in str(error.value)


# -- the exact skip -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_a_nan_step_ends_bitwise_equal_to_a_run_that_skipped_it_by_hand(name, manual):
    make = OPTIMIZERS[name]
    reference = Classifier(make, manual=manual, skip_at={K})
    plain = _fit(reference)
    module = Classifier(make, manual=manual, nan_at={K})
    callback, guarded = _guarded(module, log_every=5)

    assert callback.result is not None and callback.result.skipped_steps == 1
    assert [(e.kind, e.step, e.detail["cause"]) for e in acted(callback)] == [("skip", K + 1, "loss")]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, module.state_dict()[key]), (
            f"{name}: {key} differs from the hand-skipped run"
        )
    ours, theirs = optimizer_tensors(guarded.optimizers[0]), optimizer_tensors(plain.optimizers[0])
    assert ours and same_tensors(ours, theirs), f"{name}: optimizer state differs"
    assert guarded.global_step == callback.result.global_step == 12  # the skipped step counts
    assert "step" not in vars(guarded.optimizers[0])  # the optimizer's own step is back


def test_a_skipped_first_step_keeps_the_schedule_and_gives_no_scheduler_warning():
    reference = Classifier(scheduler=True, skip_at={0})
    plain = _fit(reference)
    module = Classifier(scheduler=True, nan_at={0})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")  # "called before optimizer.step()"
        callback, guarded = _guarded(module)
    assert callback.result.skipped_steps == 1
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in reference.state_dict().items())
    assert (
        guarded.optimizers[0].param_groups[0]["lr"]
        == plain.optimizers[0].param_groups[0]["lr"]
        == 1e-2 * 0.5**4
    )


class _Snapshots(pl.Callback):
    """Keeps the parameters and optimizer state before and after each optimizer step."""

    def __init__(self) -> None:
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def _state(self, trainer: pl.Trainer, module: pl.LightningModule) -> list[torch.Tensor]:
        params = [p.detach().clone() for p in module.parameters()]
        return params + [t.clone() for t in optimizer_tensors(trainer.optimizers[0])]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before[trainer.global_step + 1] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in self.before:
            self.after[trainer.global_step] = self._state(trainer, pl_module)


def test_one_nan_micro_batch_skips_the_whole_accumulated_step_and_changes_nothing():
    snapshots = _Snapshots()
    module = Classifier(nan_at={5})  # the second micro-batch of the third window of 2
    callback = SafeLoopCallback(summary=False)
    _fit(module, callback, snapshots, accumulate_grad_batches=2)
    assert [(e.kind, e.step) for e in acted(callback)] == [("skip", 3)]
    assert same_tensors(snapshots.before[3], snapshots.after[3])  # parameters and Adam state as before
    assert not same_tensors(snapshots.before[4], snapshots.after[4])  # the next step trains


class _InfGradient(Classifier):
    """Step ``at`` gets an infinite gradient in one element of ``net.2.weight`` (the loss is finite)."""

    def on_after_backward(self) -> None:
        if self.trainer.global_step + 1 == 3:
            self.net[2].weight.grad[0, 0] = float("inf")


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_fused"])
def test_an_inf_gradient_skips_the_step_and_names_the_parameter(name):
    callback, _ = _guarded(_InfGradient(OPTIMIZERS[name]), log_every=4)
    grad = [f for f in callback.findings if f.code == "nonfinite-grad"]
    assert len(grad) == 1 and grad[0].params == ("net.2.weight",) and grad[0].step == 3
    assert [(e.step, e.detail["cause"]) for e in acted(callback)] == [(3, "gradients")]


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw_fused"], ids=["host-read", "on-device"])
def test_more_skips_in_a_row_than_allowed_raise_nonfinite_error_after_changing_nothing(name):
    snapshots = _Snapshots()
    module = Classifier(OPTIMIZERS[name], nan_at={2, 3, 4})
    callback = SafeLoopCallback(max_consecutive_skips=2, log_every=4, rollback=False, summary=False)
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        _fit(module, callback, snapshots)
    assert all(same_tensors(snapshots.before[s], snapshots.after[s]) for s in (3, 4))
    assert [e.step for e in acted(callback)] == [3, 4, 5] and callback.result is None  # fit raised
    # a skip read on the host is learnt at its step; one decided on the device at the log step (8)
    steps = 5 if name == "sgd_momentum" else 8
    assert callback.report().startswith(f"safeloop: stopped by NonFiniteError, {steps} steps, 3 skipped")
    assert "step" not in vars(module.trainer.optimizers[0])  # unpatched after the error too


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_the_raise_policy_stops_at_the_first_nan_step_before_its_update(manual):
    snapshots = _Snapshots()
    module = Classifier(manual=manual, nan_at={K})
    with pytest.raises(NonFiniteError, match=r'step 5: the loss went non-finite .* `nan_guard="raise"`'):
        _fit(module, snapshots, SafeLoopCallback(nan_guard="raise", summary=False))
    assert 5 in snapshots.before and 5 not in snapshots.after  # stopped inside the step
    assert same_tensors(snapshots.before[5][:4], [p.detach() for p in module.parameters()])


def test_the_guard_off_lets_the_nan_reach_the_parameters():
    module = Classifier(nan_at={K})
    callback, _ = _guarded(module, nan_guard="off")
    assert acted(callback) == [] and any(torch.isnan(p).any() for p in module.parameters())


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "adamw-fused"])
def test_under_an_fp16_scaler_the_nan_step_is_skipped_and_counted_as_the_guards(fused):
    snapshots = _Snapshots()
    module = Classifier(lambda params: torch.optim.AdamW(params, lr=1e-2, fused=fused), nan_at={K})
    callback = SafeLoopCallback(log_every=4, summary=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    _fit(module, callback, snapshots, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    result = callback.result
    assert result.skipped_steps == 1 and [e.step for e in acted(callback)] == [K + 1]
    assert all(h["overflow_skips"] == 0 for h in result.history)  # the guard's skip, not an overflow
    assert same_tensors(snapshots.before[K + 1][:4], snapshots.after[K + 1][:4])  # parameters unchanged
    # the history's loss and gradient norm are unscaled (the loss scale is 256, then 128)
    assert 0.5 < result.history[0]["loss"] < 2.0 and result.history[0]["grad_norm"] < 5.0


def test_a_zero_initialised_layer_is_reinitialised_at_the_first_step_and_learns():
    module = Classifier()
    nn.init.zeros_(module.net[0].weight)  # a layer left at zeros: it and the next get no gradient
    nn.init.zeros_(module.net[0].bias)
    callback, _ = _guarded(module)
    assert [(e.kind, e.step, e.detail["param"]) for e in acted(callback)] == [("reinit", 0, "net.0.weight")]
    zero = {f.params[0]: f.severity for f in callback.findings if f.code == "zero-params"}
    assert zero == {"net.0.weight": "warning", "net.0.bias": "info"}
    assert module.net[0].weight.abs().sum() > 0 and module.net[0].bias.abs().sum() > 0  # both trained


class _ZeroInitB(Classifier):
    """A LoRA-style adapter whose ``B`` starts at zero on purpose and receives gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_a = nn.Linear(8, 2, bias=False)
        self.lora_b = nn.Linear(2, 3, bias=False)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x):
        return self.net(x) + self.lora_b(self.lora_a(x))


def test_a_deliberate_zero_init_that_receives_gradient_is_left_alone_and_only_noted():
    module = _ZeroInitB()
    callback = SafeLoopCallback(summary=False)
    _fit(module, callback, max_steps=1)
    assert acted(callback) == []
    zero = [f for f in callback.findings if f.code == "zero-params"]
    assert [(f.params, f.severity) for f in zero] == [(("lora_b.weight",), "info")]
    assert "deliberate zero init" in zero[0].message


def test_the_callbacks_state_goes_into_lightnings_checkpoint_and_a_resumed_fit_keeps_it():
    callback, _ = _guarded(Classifier(nan_at={10, 11}))
    state = callback.state_dict()
    # plain values: no tensor, no object
    assert state == {"preflight_done": True, "consecutive_skips": 2, "rollbacks": 0, "lr_scale": 1.0}
    resumed = SafeLoopCallback(summary=False)
    resumed.load_state_dict(state)  # what Lightning does when it restores a checkpoint
    module = Classifier(nan_at={0})
    nn.init.zeros_(module.net[0].weight)
    _fit(module, resumed, max_steps=1)
    assert [e.kind for e in acted(resumed)] == ["skip"]  # no re-initialisation: its check had run
    assert acted(resumed)[0].detail["consecutive"] == 3  # the run of skips goes on
