"""Runs whose loss stays high end with a named cause: no-learning, the label mix, an oscillating
learning rate; and the baseline loss each run reports. Data is synthetic and made here."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import SafeTrainer
from safeloop.results import FitResult

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fit(
    model: nn.Module, optimizer, train: TensorDataset, *, eval_set=None, batch_size=32, **kwargs
) -> FitResult:
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=_gen(0))
    evaluation = None if eval_set is None else DataLoader(eval_set, batch_size=64)
    trainer = SafeTrainer(
        model,
        optimizer,
        loader,
        eval_dataloader=evaluation,
        seed=0,
        progress_bar=False,
        log_every=10,
        **kwargs,
    )
    return trainer.fit()


def _codes(result: FitResult) -> list[str]:
    return [f.code for f in result.findings if f.severity != "info"]


def _one(result: FitResult, code: str):
    found = [f for f in result.findings if f.code == code]
    assert found, f"no {code}: {[(f.code, f.message[:120]) for f in result.findings]}"
    return found[0]


def _linear_classes(n: int, features: int, classes: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, features, generator=_gen(1))
    return x, (x @ torch.randn(features, classes, generator=_gen(seed))).argmax(1)


# -- no-learning: the loss never leaves the constant-prediction level -------------------------


def test_regression_targets_unrelated_to_the_inputs():
    torch.manual_seed(0)
    x = torch.randn(512, 6, generator=_gen(1))
    y = torch.randn(512, 2, generator=_gen(4)) * 3 + 1  # drawn apart from x
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 2))
    result = _fit(
        model,
        torch.optim.SGD(model.parameters(), 0.01, momentum=0.9),
        TensorDataset(x, y),
        loss_fn=nn.L1Loss(),
        max_steps=300,
    )
    finding = _one(result, "no-learning")
    expected = float((y[:256] - y[:256].median(0).values).abs().mean())  # roughly: another 256 are sampled
    assert result.baseline_loss == pytest.approx(expected, rel=0.1)
    assert f"of the baseline loss {result.baseline_loss:.4g}" in finding.message
    assert "the mean L1Loss of each output's median" in finding.message
    assert "do not predict the targets" in finding.message
    level = float(finding.message.split("the train loss averaged ")[1].split(" ")[0])
    assert level >= 0.95 * result.baseline_loss


def test_labels_shuffled_apart_from_the_inputs_with_an_eval_set():
    x, y = _linear_classes(1400, 12, 5)
    shuffled = y[:1000][torch.randperm(1000, generator=_gen(9))]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 128), nn.ReLU(), nn.Linear(128, 5))
    result = _fit(
        model,
        torch.optim.Adam(model.parameters(), 3e-3),
        TensorDataset(x[:1000], shuffled),
        eval_set=TensorDataset(x[1000:], y[1000:]),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=300,
    )
    finding = _one(result, "no-learning")
    assert "the eval loss stayed at" in finding.message and "does not carry over" in finding.message
    assert result.baseline_loss == pytest.approx(math.log(5), abs=0.05)
    best = float(finding.message.split("the eval loss stayed at ")[1].split(" ")[0])
    assert best >= 0.95 * result.baseline_loss


def test_a_broadcasting_mse_ranks_the_broadcast_first():
    x = torch.randn(512, 6, generator=_gen(1))
    y = x @ torch.randn(6, generator=_gen(3)) + 0.1 * torch.randn(512, generator=_gen(4))  # (N,)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 1))  # (N, 1)
    result = _fit(
        model,
        torch.optim.AdamW(model.parameters(), 3e-3),
        TensorDataset(x, y),
        loss_fn=nn.MSELoss(),
        max_steps=300,
    )
    assert _codes(result)[:2] == ["loss-broadcast", "no-learning"]
    finding = _one(result, "no-learning")
    assert "Measured causes, most likely first: 1) loss-broadcast" in finding.message
    assert "squeeze(-1)" in finding.suggestion
    assert result.baseline_loss == pytest.approx(float(y[:256].var(correction=0)), rel=0.3)


def test_a_collapsed_network_at_a_high_learning_rate():
    x = torch.randn(4096, 16, generator=_gen(1))
    logits = torch.tanh(x @ torch.randn(16, 6, generator=_gen(7))) + 0.3 * torch.randn(
        4096, 6, generator=_gen(2)
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 6))
    result = _fit(
        model,
        torch.optim.Adam(model.parameters(), 0.1),
        TensorDataset(x, logits.argmax(1)),
        batch_size=64,
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=240,
    )
    finding = _one(result, "no-learning")
    assert "Measured causes, most likely first: 1) dead-units" in finding.message
    assert "(the entropy of the class frequencies (6 of 6 classes seen)" in finding.message


# -- the label mix -----------------------------------------------------------------------------


def test_every_training_label_in_one_class():
    x, y = _linear_classes(600, 12, 5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))
    result = _fit(
        model,
        torch.optim.Adam(model.parameters(), 1e-3),
        TensorDataset(x[:400], torch.zeros(400, dtype=torch.long)),
        eval_set=TensorDataset(x[400:], y[400:]),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=200,
    )
    assert _codes(result)[0] == "label-distribution"
    assert (
        "All 256 training targets in the first 8 batches are class 0 (of 5 classes"
        in result.findings[0].message
    )
    assert result.baseline_loss == 0.0
    gap = _one(result, "train-eval-gap")
    train = float(gap.message.split("the train loss is ")[1].split(" ")[0])
    evaluation = float(gap.message.split("the eval loss ")[1].split(",")[0])
    assert evaluation > 2 * train and "at or above the baseline" in gap.message
    assert result.eval_loss is not None and result.eval_loss > 2 * result.history[-1]["loss"]


def test_a_split_made_on_data_sorted_by_class():
    x, y = _linear_classes(1200, 12, 4)
    order = torch.argsort(y, stable=True)
    x, y = x[order], y[order]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    result = _fit(
        model,
        torch.optim.SGD(model.parameters(), 0.1, momentum=0.9),
        TensorDataset(x[:900], y[:900]),
        eval_set=TensorDataset(x[900:], y[900:]),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=120,
    )
    finding = _one(result, "label-distribution")
    distance = float(finding.message.split("batches are ")[1].split("%")[0])
    assert distance >= 40 and "eval class 3" in finding.message
    assert finding.params == ("train labels", "eval labels")


# -- too high a learning rate that does not blow up ----------------------------------------------


def test_adam_on_a_small_transformer_oscillates_at_a_high_learning_rate():
    from tests.integration.test_false_alarms import TinyLM, _token_loss, _token_sequences

    seqs = _token_sequences(1024, 32, 16, seed=300)
    torch.manual_seed(0)
    model = TinyLM(32, 32, 16, tied=False)
    result = _fit(
        model,
        torch.optim.Adam(model.parameters(), lr=0.1),
        TensorDataset(seqs[:, :-1], seqs[:, 1:]),
        loss_fn=_token_loss,
        max_steps=200,
    )
    finding = _one(result, "lr-too-high")
    above = float(finding.message.split("log checks, ")[1].split("%")[0])
    ratio = float(finding.message.split("||dw||/||w|| is ")[1].split(" ")[0])
    assert above > 15 and ratio >= 0.01 and "at lr 0.1" in finding.message
    assert "between 0.01 and 0.033" in finding.suggestion
    assert not any(f.code.startswith("nonfinite") for f in result.findings)


# -- the baseline itself ------------------------------------------------------------------------


def test_the_baseline_is_reported_in_the_result_and_the_report(caplog):
    caplog.set_level(logging.INFO, logger="safeloop")
    x, y = _linear_classes(512, 8, 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    result = _fit(
        model,
        torch.optim.Adam(model.parameters(), 1e-2),
        TensorDataset(x, y),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=20,
    )
    assert result.baseline_loss is not None and 0 < result.baseline_loss <= math.log(4) + 1e-9
    assert f"baseline loss {result.baseline_loss:.4g} (a constant prediction)" in result.report()
    custom = _fit(
        model,
        torch.optim.Adam(model.parameters(), 1e-2),
        TensorDataset(x, y),
        training_step=lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
        max_steps=20,
    )
    assert custom.baseline_loss is None and "baseline" not in custom.report()
    said = [r.getMessage() for r in caplog.records if "no baseline loss" in r.getMessage()]
    assert len(said) == 1 and "the loss comes from `training_step`" in said[0]
    assert all(r.levelname == "INFO" for r in caplog.records if "no baseline loss" in r.getMessage())


# -- after a rollback: the rules start from the restored state; advice checked against the run ---


def test_rules_restart_from_the_restored_state_after_a_rollback():
    # SGD at lr 10 on a 5-class MLP: rollbacks to lr 5 then 2.5, after which the loss learns a
    # little and then bounces around 1.4 (chance is ln 5 = 1.61)
    x, y = _linear_classes(2000, 10, 5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    result = _fit(
        model,
        torch.optim.SGD(model.parameters(), 10.0),
        TensorDataset(x, y),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=400,
    )
    assert result.rollbacks >= 1
    lr_scales = [e.detail["lr_after"][0] for e in result.events if e.kind == "lr_scale"]
    plateau = _one(result, "loss-plateau")
    start = float(plateau.message.split(" before, ")[1].split(" at the start")[0])
    assert start < 2.0  # the restored state's first loss, not the 1e18 of the abandoned branch
    oscillating = [f for f in result.findings if f.code == "lr-too-high" and "above its best" in f.message]
    assert oscillating and f"at lr {lr_scales[-1]:.3g}" in oscillating[0].message
    assert not any(f.code == "no-learning" for f in result.findings)  # it learned, then lost it


def test_a_network_killed_by_a_huge_adam_learning_rate():
    x = torch.randn(1024, 3, 8, 8, generator=_gen(1))
    y = (x.mean((2, 3)) @ torch.randn(3, 4, generator=_gen(2))).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip
    result = _fit(
        model,
        torch.optim.Adam(model.parameters(), 3.0),
        TensorDataset(x, y),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=260,
    )
    finding = _one(result, "no-learning")
    level = float(finding.message.split("the train loss averaged ")[1].split(" ")[0])
    assert level == pytest.approx(result.baseline_loss, rel=0.1)
    assert "1) no-gradient" in finding.message and "dead-units" in finding.message


def test_lr_advice_never_goes_below_a_rate_the_run_trained_at():
    x = torch.randn(512, 8, generator=_gen(1)) * 2
    y = x @ torch.randn(8, 1, generator=_gen(2)) + 0.1 * torch.randn(512, 1, generator=_gen(3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    result = _fit(
        model,
        torch.optim.SGD(model.parameters(), 0.2),
        TensorDataset(x, y),
        loss_fn=nn.MSELoss(),
        max_steps=200,
    )
    assert result.rollbacks == 1 and result.history[-1]["loss"] < 1.0  # lr 0.1 after the rollback trains
    high = _one(result, "lr-too-high")
    assert high.suggestion.startswith("Use a learning rate between 0.1 and 0.2: this run trained at 0.1")
    assert "Multiply the learning rate" not in high.suggestion
