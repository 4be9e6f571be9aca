"""Each finding code of docs/diagnostics.md, produced by a realistic mistake run through ``SafeTrainer``.

One test per code: the mistake a user makes (softmax before ``CrossEntropyLoss``, labels 1..C, a
head created after the optimizer, a learning rate far off, ...), a real ``fit``, and the finding
it must give: its code, its severity and the names it must carry. The codes that are
"raised" stop ``fit`` with a ``ConfigError`` holding the finding, before any weight changed.
Then the plumbing around findings: ``diagnostics=False``, ``findings.json``, the report, counted
repeats and ``on_finding``.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import Callback, ConfigError, DivergenceError, SafeTrainer
from safeloop.results import Finding, FitResult
from safeloop.testing import NonFiniteGradient, nonfinite_loss, spiking_loss
from tests.conftest import _reset_accelerate
from tests.helpers.models import classification_data, mlp, state_equal

pytestmark = pytest.mark.usefixtures("one_thread")

# the codes of the checks that ``diagnostics=False`` turns off: the first-batch, training
# and data codes, and targets.py's activation-loss-mismatch (zero-params, nonfinite-* and
# loss-spike come from the guards, which stay on)
DIAGNOSTIC_CODES = {
    "no-trainable-params",
    "optimizer-missing-params",
    "optimizer-foreign-params",
    "loss-not-differentiable",
    "loss-not-scalar",
    "double-backward",
    "unused-params",
    "detached-params",
    "nonfinite-input",
    "target-out-of-range",
    "no-target-tokens",
    "initial-loss-high",
    "target-scale",
    "activation-loss-mismatch",
    "exploding-grad",
    "vanishing-grad",
    "dead-units",
    "lr-too-high",
    "lr-too-low",
    "loss-plateau",
    "eval-train-overlap",
    "normalization-mismatch",
    "loss-broadcast",
    "no-learning",
    "label-distribution",
    "train-eval-gap",
    "batch-size",
}


# -- helpers ----------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loader(*tensors: torch.Tensor, batch_size: int = 16, shuffle: bool = True) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=_gen(0))


def _classes(n: int = 128, features: int = 8, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return classification_data(n=n, features=features, classes=classes, seed=seed).tensors


def _fit(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer | None = None, **kwargs
) -> FitResult:
    """``fit`` with the defaults (diagnostics, rollback) on: cross-entropy, Adam, 4 steps, seed 0."""
    kwargs.setdefault("loss_fn", nn.CrossEntropyLoss())
    kwargs.setdefault("max_steps", 4)
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=1e-3)
    return SafeTrainer(model, optimizer, loader, seed=0, progress_bar=False, **kwargs).fit()


def _only(result: FitResult, code: str) -> Finding:
    """The one finding of ``code`` in the run (a finding is kept once per code and place)."""
    found = [f for f in result.findings if f.code == code]
    assert len(found) == 1, _listing(result.findings)
    return found[0]


def _all(result: FitResult, code: str) -> list[Finding]:
    found = [f for f in result.findings if f.code == code]
    assert found, f"no {code} finding; the run found:\n{_listing(result.findings)}"
    return found


def _listing(findings) -> str:
    return "\n".join(f"[{f.severity}] {f.code} {f.params} (step {f.step}) {f.message}" for f in findings)


def _raised(model: nn.Module, loader: DataLoader, code: str, **kwargs) -> Finding:
    """Fit must stop with a ConfigError carrying ``code``, before any weight changed."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError) as caught:
        _fit(model, loader, **kwargs)
    assert state_equal(before, model.state_dict()), "a weight changed before the error"
    found = [f for f in caught.value.findings if f.code == code]
    assert len(found) == 1, _listing(caught.value.findings)
    assert found[0].severity == "error" and found[0].message in str(caught.value)
    return found[0]


# -- before the first optimizer step: raised --------------------------------------------------


def test_a_fully_frozen_model_stops_fit_with_no_trainable_params():
    model = mlp()
    model.requires_grad_(False)  # e.g. a backbone frozen with the head inside it
    finding = _raised(model, _loader(*_classes()), "no-trainable-params")
    assert "all 4 parameter tensors of `Sequential`" in finding.message
    assert "`0.weight`" in finding.message and "requires_grad_(True)" in finding.suggestion


def test_an_optimizer_built_from_another_model_instance_stops_fit_with_foreign_params():
    model = mlp(seed=0)
    other = mlp(seed=0)  # the same architecture, built twice: equal values, other tensors
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    finding = _raised(model, _loader(*_classes()), "optimizer-foreign-params", optimizer=optimizer)
    assert state_equal(other.state_dict(), mlp(seed=0).state_dict())  # the other one was not updated
    assert finding.params == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert "another instance of the model" in finding.message


def test_a_training_step_under_no_grad_stops_fit_with_loss_not_differentiable():
    def training_step(model, batch):
        inputs, targets = batch
        with torch.no_grad():  # copied from the evaluation code
            outputs = model(inputs)
        return nn.functional.cross_entropy(outputs, targets)

    finding = _raised(mlp(), _loader(*_classes()), "loss-not-differentiable", training_step=training_step)
    assert "ran with gradients disabled" in finding.message and "`torch.no_grad()`" in finding.message
    assert finding.params == ("Sequential",)  # the whole model ran so
    assert "Remove `torch.no_grad()`" in finding.suggestion


@pytest.mark.parametrize("cut", ["argmax", "compare", "int-cast"])
def test_a_loss_through_an_op_with_no_gradient_names_the_op(cut):
    def training_step(model, batch):
        inputs, targets = batch
        outputs = model(inputs)
        if cut == "argmax":
            predicted = outputs.argmax(1).float()
        elif cut == "compare":
            predicted = (outputs[:, 0] > 0).float()
        else:
            predicted = outputs[:, 0].long().float()
        return nn.functional.mse_loss(predicted, targets.float())

    finding = _raised(mlp(), _loader(*_classes()), "loss-not-differentiable", training_step=training_step)
    assert "graph was cut between the model output" in finding.message
    assert "`argmax`, `round`, a comparison" in finding.message
    assert "not from `argmax` or rounded predictions" in finding.suggestion


@pytest.mark.parametrize("op", ["round", "floor", "sign"])
def test_a_loss_through_an_op_whose_derivative_is_zero_is_named_at_step_0_and_not_as_dead_units(op):
    def training_step(model, batch):
        inputs, targets = batch
        predicted = getattr(torch, op)(model(inputs)[:, 0])  # a grad_fn, but a zero derivative
        return nn.functional.mse_loss(predicted, targets.float())

    result = _fit(mlp(), _loader(*_classes()), training_step=training_step, max_steps=40, log_every=10)
    [zero] = [f for f in result.findings if f.code == "detached-params"]
    assert zero.step == 0 and zero.severity == "warning" and "got exactly zero" in zero.message
    assert set(zero.params) == {name for name, _ in mlp().named_parameters()}
    assert "continuous outputs" in zero.suggestion
    assert not [f for f in result.findings if f.code == "dead-units"]  # its effect, not dead ReLUs


def test_dead_relus_are_not_taken_for_a_zero_derivative_loss():
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every hidden unit dead: the last layer's bias still learns
    result = _fit(model, _loader(*_classes()), max_steps=40, log_every=10)
    assert not [f for f in result.findings if f.code == "detached-params"]


def test_a_training_step_returning_the_loss_with_the_outputs_is_told_to_return_the_loss_alone():
    def training_step(model, batch):
        outputs = model(batch[0])
        return nn.functional.cross_entropy(outputs, batch[1]), outputs

    model = mlp()
    trainer = SafeTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), _loader(*_classes()),
                          training_step=training_step, max_steps=1, progress_bar=False)  # fmt: skip
    with pytest.raises(ConfigError, match="holds no loss") as info:
        trainer.fit()
    assert "Item 0 is a one-element tensor" in str(info.value) and "`return loss`" in str(info.value)


def test_a_loss_with_reduction_none_stops_fit_with_loss_not_scalar():
    finding = _raised(
        mlp(), _loader(*_classes()), "loss-not-scalar", loss_fn=nn.CrossEntropyLoss(reduction="none")
    )
    assert finding.severity == "error"
    assert "shape (16,)" in finding.message and 'reduction="mean"' in finding.suggestion


def test_a_training_step_that_calls_backward_itself_stops_fit_with_double_backward():
    def training_step(model, batch):
        inputs, targets = batch
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()  # a hand-written loop's habit
        return loss

    finding = _raised(mlp(), _loader(*_classes()), "double-backward", training_step=training_step)
    assert finding.params == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert "called `backward()` itself" in finding.message


def test_labels_numbered_from_one_stop_fit_with_target_out_of_range():
    x, y = _classes()
    finding = _raised(mlp(), _loader(x, y + 1, batch_size=32), "target-out-of-range")
    assert "`CrossEntropyLoss` got class targets from 1 to 3" in finding.message
    assert "numbered 1..3 instead of 0..2" in finding.message and "targets - 1" in finding.suggestion


# -- before the first optimizer step: reported, training goes on -----------------------------


def test_softmax_before_cross_entropy_is_an_activation_loss_mismatch():
    model = nn.Sequential(mlp(), nn.Softmax(dim=1))  # the loss applies log_softmax again
    result = _fit(model, _loader(*_classes()))
    finding = _only(result, "activation-loss-mismatch")
    assert finding.severity == "warning" and finding.step == 0
    assert "`CrossEntropyLoss`" in finding.message and "already applies softmax" in finding.message
    assert "return the logits" in finding.suggestion


def test_logits_scaled_up_at_init_report_initial_loss_high():
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(100.0)  # e.g. a temperature applied the wrong way round
        model[2].bias.mul_(100.0)
    result = _fit(model, _loader(*_classes()))
    finding = _only(result, "initial-loss-high")
    assert finding.severity == "warning" and finding.step == 0
    assert "`CrossEntropyLoss` on the first batch" in finding.message and "ln(3)" in finding.message


def test_house_prices_regressed_with_mse_report_target_scale():
    gen = _gen(0)
    x = torch.randn(128, 6, generator=gen)
    price = 3e5 + 8e4 * (x @ torch.randn(6, 1, generator=gen)) / 3  # dollars, not standardised
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    result = _fit(model, _loader(x, price), loss_fn=nn.MSELoss(), max_steps=2, rollback=False)
    finding = _only(result, "target-scale")
    assert finding.severity == "warning" and finding.step == 0
    assert "`MSELoss` targets" in finding.message and "(y - mean) / std" in finding.suggestion


def test_a_head_added_after_the_optimizer_reports_optimizer_missing_params():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(8, 16), nn.ReLU()))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.add_module("head", nn.Linear(16, 3))  # built after the optimizer: never updated
    head = copy.deepcopy(model.head.state_dict())
    result = _fit(model, _loader(*_classes()), optimizer=optimizer)
    finding = _only(result, "optimizer-missing-params")
    assert finding.severity == "warning" and finding.params == ("head.weight", "head.bias")
    assert "`head` (weight, bias)" in finding.message
    assert state_equal(head, model.head.state_dict())  # indeed never updated


class _AuxModel(nn.Module):
    """A classifier with an auxiliary head defined in ``__init__`` and forgotten in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_a_module_never_called_in_forward_reports_unused_params():
    result = _fit(_AuxModel(), _loader(*_classes()))
    finding = _only(result, "unused-params")
    assert finding.severity == "warning" and finding.params == ("aux.weight", "aux.bias")
    assert "never ran in the forward: `aux` (weight, bias)" in finding.message
    assert "detached-params" not in {f.code for f in result.findings}


class _DetachedBody(nn.Module):
    """A classifier whose ``forward`` detaches the features: only the head can learn."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).detach())  # e.g. left over from a feature-extraction notebook


def test_a_detach_in_forward_reports_detached_params_naming_the_cut_off_layers():
    model = _DetachedBody()
    body = copy.deepcopy(model.body.state_dict())
    result = _fit(model, _loader(*_classes()))
    finding = _only(result, "detached-params")
    assert finding.severity == "warning" and finding.params == ("body.0.weight", "body.0.bias")
    assert "`body.0` (weight, bias)" in finding.message and "`.detach()`" in finding.message
    assert "unused-params" not in {f.code for f in result.findings}
    assert state_equal(body, model.body.state_dict())  # they did not train


def test_nan_in_the_first_batch_reports_nonfinite_input_naming_the_tensor():
    x, y = _classes()
    x = x.clone()
    x[3, 5] = math.nan  # a missing value in the source data
    result = _fit(mlp(), _loader(x, y, shuffle=False))
    finding = _only(result, "nonfinite-input")  # the first-batch check and the skip replay agree
    assert finding.severity == "error" and finding.params == ("batch[0]",) and finding.step == 0
    assert finding.count == 1  # one bad batch, seen by the first-batch check and by the replay
    assert "holds 1 non-finite values" in finding.message and "1 NaN" in finding.message
    assert result.skipped_steps == 1 and result.global_step == 4  # skipped, then trained on


def test_zero_initialised_layers_report_zero_params_and_are_reinitialised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    for layer in (model[0], model[2]):  # zeros_ where the init helper meant normal_
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    result = _fit(model, _loader(*_classes()))
    found = {f.params[0]: f for f in _all(result, "zero-params")}
    assert {name for name, f in found.items() if f.severity == "warning"} == {"0.weight", "2.weight"}
    assert "stuck" not in found["0.weight"].message and "Re-initialised" in found["0.weight"].message
    assert {name for name, f in found.items() if f.severity == "info"} == {"0.bias", "2.bias"}  # 1-D
    assert [e.detail["param"] for e in result.events if e.kind == "reinit"] == ["0.weight", "2.weight"]


# -- during training ---------------------------------------------------------------------------


def test_a_tiny_adam_learning_rate_reports_lr_too_low_and_a_plateau_ranking_it_first():
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-8)  # 1e-3 meant, a typo in the exponent
    result = _fit(model, _loader(*_classes(n=64), batch_size=64), optimizer, max_steps=120, log_every=10)
    low = _only(result, "lr-too-low")
    assert low.severity == "warning" and set(low.params) == {"0.weight", "2.weight"}
    assert "lr 1e-08" in low.message and "1e+04" in low.suggestion
    # the fix names the range test to run around the rate the run used: one decade below, four above
    assert "`trainer.find_lr(min_lr=1e-09, max_lr=1e-04)`" in low.suggestion
    plateau = _only(result, "loss-plateau")
    assert plateau.severity == "warning" and plateau.step > low.step
    assert "Measured causes, most likely first: 1) lr-too-low" in plateau.message
    assert set(plateau.params) == {"0.weight", "2.weight"}


def test_a_deep_sigmoid_mlp_reports_vanishing_gradients_in_the_first_layers():
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.Sigmoid()]
    for _ in range(18):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(16, 3))  # 20 Linear layers, sigmoids between them
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = _fit(model, _loader(*_classes()), optimizer, max_steps=20, log_every=5)
    finding = _only(result, "vanishing-grad")
    assert finding.severity == "warning" and finding.params[:3] == ("0.weight", "2.weight", "4.weight")
    assert not {"36.weight", "38.weight"} & set(finding.params)  # the last layers are fed fine
    assert "`0.weight`" in finding.message and "sigmoid" in finding.message


class _ScaleWeights(Callback):
    """Multiplies every weight by ``factor`` before step ``step`` (a buggy weight-loading callback)."""

    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor = step, factor

    def on_train_batch_start(self, trainer, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            with torch.no_grad():
                for param in trainer.model.parameters():
                    param.mul_(self.factor)


def test_weights_scaled_up_in_a_deep_linear_net_report_exploding_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(10)])
    for layer in model:
        nn.init.orthogonal_(layer.weight)
    gen = _gen(1)
    x, y = torch.randn(128, 16, generator=gen), torch.randn(128, 16, generator=gen)
    result = _fit(
        model,
        _loader(x, y, batch_size=128),
        torch.optim.SGD(model.parameters(), lr=1e-3),
        loss_fn=nn.MSELoss(),
        max_steps=50,
        callbacks=[_ScaleWeights(step=46, factor=1.6)],  # 1.6 per layer: ~110x through 10 layers
        rollback=False,
    )
    finding = _only(result, "exploding-grad")
    assert finding.severity == "warning" and finding.step == 50 and "at step 46" in finding.message
    assert len(finding.params) == 3 and "running median" in finding.message


def test_a_very_negative_bias_before_relu_reports_dead_units():
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(-10.0)  # every hidden unit is below zero for every input
    result = _fit(model, _loader(*_classes()), max_steps=15, log_every=5)
    dead = _all(result, "dead-units")
    assert dead[0].severity == "warning" and dead[0].params == ("0.weight",)
    assert "16 of 16 rows (100%)" in dead[0].message and "dead ReLU" in dead[0].message
    assert [f.params for f in dead[1:]] == [("2.weight",)]
    assert "downstream of `0.weight`" in dead[1].message


def test_sgd_with_a_learning_rate_far_too_high_reports_lr_too_high():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    try:
        result = _fit(model, _loader(*_classes()), optimizer, max_steps=30, log_every=10)
        findings = result.findings
    except DivergenceError as error:  # rollbacks at ever lower learning rates did not help
        findings = list(error.findings)
    high = [f for f in findings if f.code == "lr-too-high"]
    assert high, _listing(findings)
    assert high[0].severity == "warning" and "lr 10" in high[0].message


def test_a_nan_loss_mid_run_reports_nonfinite_loss_at_its_step():
    loss_fn = nonfinite_loss(nn.CrossEntropyLoss(), at_calls={5})  # e.g. a log of a zero
    result = _fit(mlp(), _loader(*_classes()), loss_fn=loss_fn, max_steps=8)
    finding = _only(result, "nonfinite-loss")
    assert finding.severity == "warning" and finding.step == 5 and finding.params == ()
    assert finding.message.startswith("step 5: the loss was nan; the step was skipped.")
    assert result.skipped_steps == 1


class _Log(nn.Module):
    """A log-transform of positive count features, done inside the model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def test_a_log_of_a_zero_feature_mid_run_reports_nonfinite_loss_naming_the_module():
    x, y = _classes()
    x = x.abs() + 0.5  # counts, all positive ...
    x[70, 2] = 0.0  # ... but one: log(0) = -inf on step 5, inside the model
    torch.manual_seed(0)
    model = nn.Sequential(_Log(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    result = _fit(model, _loader(x, y, shuffle=False), max_steps=8)
    finding = _only(result, "nonfinite-loss")
    assert finding.severity == "warning" and finding.step == 5 and finding.params == ("0",)
    assert "the first module whose output went non-finite is `0`" in finding.message
    assert "nonfinite-input" not in {f.code for f in result.findings}  # the data itself is finite


def test_an_inf_gradient_reports_nonfinite_grad_naming_the_parameter():
    result = _fit(mlp(), _loader(*_classes()), max_steps=6, callbacks=[NonFiniteGradient("2.weight", step=3)])
    finding = _only(result, "nonfinite-grad")
    assert finding.severity == "warning" and finding.step == 3 and finding.params == ("2.weight",)
    assert "`2.weight`" in finding.message and result.skipped_steps == 1


def test_a_finite_loss_spike_reports_loss_spike_and_rolls_back():
    gen = _gen(0)
    x = torch.randn(512, 16, generator=gen)
    y = x @ torch.randn(16, 1, generator=gen) + 0.1 * torch.randn(512, 1, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    loss_fn = spiking_loss(nn.MSELoss(), at_calls=range(40, 46), factor=30.0)  # a run of bad batches
    result = _fit(
        model,
        _loader(x, y, batch_size=32),
        torch.optim.SGD(model.parameters(), lr=0.002),
        loss_fn=loss_fn,
        max_steps=60,
    )
    finding = _only(result, "loss-spike")
    assert finding.severity == "warning" and finding.step == 40
    assert "Rolling back" in finding.message and result.rollbacks == 1


# -- data ----------------------------------------------------------------------------------------


def test_an_eval_set_left_unnormalised_reports_normalization_mismatch():
    gen = _gen(0)
    raw = 50.0 + 20.0 * torch.randn(192, 8, generator=gen)  # e.g. sensor readings
    y = (raw[:, 0] > 50).long() + (raw[:, 1] > 50).long()
    mean, std = raw[:128].mean(0), raw[:128].std(0)
    train_x = (raw[:128] - mean) / std  # the scaler is applied to the train split only
    result = _fit(
        mlp(),
        _loader(train_x, y[:128]),
        eval_dataloader=_loader(raw[128:], y[128:], shuffle=False),
        max_steps=8,
    )
    finding = _only(result, "normalization-mismatch")
    assert finding.severity == "warning" and len(finding.params) == 3
    assert all(name.startswith("inputs[:, ") for name in finding.params)
    assert "8 of 8 features are off" in finding.message and "fit the scaler on train" in finding.suggestion


def test_eval_rows_copied_from_the_train_set_report_eval_train_overlap():
    x, y = _classes(n=160)
    # the eval rows are drawn from all the data, not from the 64 held-out rows; the train set is
    # smaller than the profile's 8 batches, so its second epoch starts while it is profiled
    picked = torch.randperm(160, generator=_gen(1))[:64]
    result = _fit(
        mlp(),
        _loader(x[:96], y[:96]),
        eval_dataloader=_loader(x[picked], y[picked], shuffle=False),
        max_steps=12,
    )
    finding = _only(result, "eval-train-overlap")
    assert finding.severity == "warning" and finding.params == ()
    copied = int((picked < 96).sum())
    assert f"{copied} of the first 64 eval samples" in finding.message and "data leakage" in finding.message
    assert "among the first 96 train samples" in finding.message and "twin" not in finding.message


# -- findings around the run ------------------------------------------------------------------


def test_diagnostics_off_reports_no_diagnostic_code_and_the_run_still_trains():
    model = _DetachedBody()
    head = copy.deepcopy(model.head.state_dict())
    result = _fit(model, _loader(*_classes()), diagnostics=False, max_steps=20)
    assert not DIAGNOSTIC_CODES & {f.code for f in result.findings}, _listing(result.findings)
    assert result.global_step == 20 and not state_equal(head, model.head.state_dict())
    assert result.baseline_loss is None
    _reset_accelerate()
    on = _fit(_DetachedBody(), _loader(*_classes()), max_steps=20)  # the same run, diagnosed
    assert "detached-params" in {f.code for f in on.findings}


def test_findings_json_is_written_to_checkpoint_dir_and_matches_the_result(tmp_path):
    run = tmp_path / "run"
    result = _fit(_AuxModel(), _loader(*_classes()), checkpoint_dir=str(run), max_steps=6)
    written = json.loads((run / "findings.json").read_text())
    assert written == [f.to_dict() for f in result.findings]
    assert "unused-params" in [entry["code"] for entry in written]


def test_the_report_lists_errors_first_each_with_its_fix():
    x, y = _classes()
    x = x.clone()
    x[0, 0] = math.inf
    result = _fit(_DetachedBody(), _loader(x, y, shuffle=False))
    lines = result.report().splitlines()
    error = next(i for i, line in enumerate(lines) if line.startswith("  [error] nonfinite-input"))
    warning = next(i for i, line in enumerate(lines) if line.startswith("  [warning] detached-params"))
    assert error < warning
    assert all("[error]" not in line for line in lines[warning:])
    assert lines[error + 1].startswith("      fix: Clean the data")
    assert lines[warning + 1].startswith("      fix: Remove the cut")


def test_a_repeated_finding_is_counted_and_listed_once():
    loss_fn = nonfinite_loss(nn.CrossEntropyLoss(), at_calls={3, 6})
    result = _fit(mlp(), _loader(*_classes()), loss_fn=loss_fn, max_steps=8)
    finding = _only(result, "nonfinite-loss")
    assert finding.count == 2 and finding.step == 3  # the first step is kept
    assert result.skipped_steps == 2 and " x2: " in result.report()


def test_on_finding_fires_once_per_new_finding():
    seen: list[Finding] = []

    class Record(Callback):
        def on_finding(self, trainer, finding):
            seen.append(finding)

    loss_fn = nonfinite_loss(nn.CrossEntropyLoss(), at_calls={3, 6})
    result = _fit(_AuxModel(), _loader(*_classes()), loss_fn=loss_fn, max_steps=8, callbacks=[Record()])
    assert [(f.code, f.params) for f in seen] == [(f.code, f.params) for f in result.findings]
    assert {"unused-params", "nonfinite-loss"} <= {f.code for f in seen}
    assert [f.count for f in seen if f.code == "nonfinite-loss"] == [1]  # fired when new, not on repeat
