"""All-zero weights: stuck ones are found and re-initialised, deliberate ones are left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from safeloop import SafeTrainer
from tests.conftest import _reset_accelerate
from tests.helpers.models import classification_data, loader


def zero_mlp() -> nn.Module:
    """An MLP whose first two Linear layers start at zero: they pass each other zero gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    for layer in (model[0], model[2]):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def _fit(model: nn.Module, **kwargs):
    kwargs.setdefault("max_epochs", 15)
    kwargs.setdefault("log_every", 12)
    return SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        loader(classification_data(n=96)),
        loss_fn=nn.CrossEntropyLoss(),
        progress_bar=False,
        **kwargs,
    ).fit()


def _hand_loop_losses(model: nn.Module, epochs: int) -> list[float]:
    accelerator = Accelerator()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt, dl = accelerator.prepare(model, opt, loader(classification_data(n=96)))
    losses = []
    for _ in range(epochs):
        total = 0.0
        for inputs, targets in dl:
            loss = nn.functional.cross_entropy(model(inputs), targets)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            total += loss.item()
        losses.append(total / len(dl))
    _reset_accelerate()
    return losses


def test_two_consecutive_zero_layers_stay_flat_by_hand_and_learn_after_reinit():
    hand = _hand_loop_losses(zero_mlp(), epochs=15)
    # by hand the loss only learns the class priors through the last bias, then stays flat
    assert hand[-1] > 0.9 and abs(hand[-1] - hand[5]) < 0.02

    result = _fit(zero_mlp())
    assert result.history[-1]["loss"] < 0.5, result.history
    reinit = [e for e in result.events if e.kind == "reinit"]
    assert [e.detail["param"] for e in reinit] == ["0.weight", "2.weight"]
    assert all(e.detail["method"] == "xavier" and e.step == 0 for e in reinit)
    findings = {f.params: f for f in result.findings if f.code == "zero-params"}
    assert findings[("0.weight",)].severity == "warning"
    assert "cannot learn" in findings[("0.weight",)].message
    assert "Re-initialised with Xavier uniform" in findings[("2.weight",)].message


class LoRALinear(nn.Module):
    """A LoRA-style adapter: frozen base, A random, B zero (B receives gradient)."""

    def __init__(self, features: int, out: int, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(features, out)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


class ZeroInitResidual(nn.Module):
    """x + W2 relu(W1 x) with W2 zero (zero-init residual), then a LayerNorm with zero bias."""

    def __init__(self, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.inner = nn.Linear(features, 16)
        self.out = nn.Linear(16, features)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.norm = nn.LayerNorm(features)
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x + self.out(torch.relu(self.inner(x)))))


def _zero_bias_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    nn.init.zeros_(model[0].bias)
    nn.init.zeros_(model[2].bias)
    return model


@pytest.mark.parametrize(
    ("build", "info_params"),
    [
        (_zero_bias_mlp, []),
        (lambda: (torch.manual_seed(0), LoRALinear(8, 3))[1], ["lora_B.weight"]),
        (lambda: (torch.manual_seed(0), ZeroInitResidual())[1], ["out.weight"]),
    ],
    ids=["zero-biases", "lora-adapter", "zero-init-residual-and-layernorm"],
)
def test_deliberate_zeros_are_left_alone_with_info_findings_only(build, info_params):
    model = build()
    before = copy.deepcopy(model.state_dict())
    result = SafeTrainer(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
        loader(classification_data(n=16)),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=1,
        progress_bar=False,
    ).fit()
    assert [e for e in result.events if e.kind == "reinit"] == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # lr 0: nothing moved
    zero = [f for f in result.findings if f.code == "zero-params"]
    assert all(f.severity == "info" for f in zero)
    assert sorted(p for f in zero for p in f.params) == info_params
    assert not any(f.severity in ("warning", "error") for f in result.findings)


def test_reinit_none_reports_the_stuck_weights_and_changes_nothing():
    model = zero_mlp()
    result = _fit(model, reinit_zero_params=None, max_epochs=1)
    assert [e for e in result.events if e.kind == "reinit"] == []
    warned = [f.params for f in result.findings if f.code == "zero-params" and f.severity == "warning"]
    assert warned == [("0.weight",), ("2.weight",)]
    assert "Not re-initialised" in result.findings[0].message
    assert not model[0].weight.any() and not model[2].weight.any()


def test_normal_reinit_uses_the_configured_std():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))
    for layer in (model[0], model[2]):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    captured = {}

    from safeloop import Callback

    class Capture(Callback):
        def on_before_optimizer_step(self, trainer, optimizer):
            captured.setdefault("w", trainer.model[2].weight.detach().clone())

    data = torch.utils.data.TensorDataset(torch.randn(16, 64), torch.randint(0, 3, (16,)))
    result = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        torch.utils.data.DataLoader(data, batch_size=16),
        loss_fn=nn.CrossEntropyLoss(),
        reinit_zero_params="normal",
        reinit_std=0.05,
        max_steps=1,
        callbacks=[Capture()],
        progress_bar=False,
    ).fit()
    weights = captured["w"]
    assert weights.std().item() == pytest.approx(0.05, rel=0.03)  # 65,536 samples
    assert abs(weights.mean().item()) < 0.002
    reinit = [e.detail for e in result.events if e.kind == "reinit"]
    assert reinit[1] == {"param": "2.weight", "shape": [256, 256], "method": "normal", "std": 0.05}


def test_scope_all_also_reinitialises_stuck_biases():
    result = _fit(zero_mlp(), reinit_scope="all", max_epochs=1)
    names = [e.detail["param"] for e in result.events if e.kind == "reinit"]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_weight_that_collapses_mid_run_is_reported_not_reinitialised():
    from safeloop import Callback

    class ZeroTheHead(Callback):
        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            if trainer.global_step == 7:
                with torch.no_grad():
                    trainer.model[2].weight.zero_()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    result = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),  # lr 0: the weight stays at zero
        loader(classification_data()),
        loss_fn=nn.CrossEntropyLoss(),
        log_every=5,
        callbacks=[ZeroTheHead()],
        progress_bar=False,
    ).fit()
    collapsed = [f for f in result.findings if f.code == "zero-params"]
    assert len(collapsed) == 1 and collapsed[0].params == ("2.weight",)
    assert collapsed[0].severity == "warning" and collapsed[0].step == 10
    assert "collapsed to all zeros" in collapsed[0].message
    assert [e for e in result.events if e.kind == "reinit"] == []
    assert not model[2].weight.any()


def test_rows_that_never_get_gradient_are_reported_as_dead_units():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        model[0].bias.fill_(-10.0)  # every pre-activation negative: the ReLU never fires
    result = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        loader(classification_data()),
        loss_fn=nn.CrossEntropyLoss(),
        max_epochs=2,
        log_every=4,
        progress_bar=False,
    ).fit()
    dead = [f for f in result.findings if f.code == "dead-units"]
    assert [f.params for f in dead] == [("0.weight",), ("2.weight",)]
    assert "32 of 32 rows (100%)" in dead[0].message and dead[0].step == 12
    assert "never activate" in dead[0].message
    assert "downstream of `0.weight`" in dead[1].message  # starved by the dead layer, not dead itself


def test_a_healthy_run_reports_no_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    result = _fit(model, max_epochs=10, log_every=4)
    assert [f for f in result.findings if f.severity != "info"] == []
    assert result.history[-1]["loss"] < result.history[0]["loss"]
