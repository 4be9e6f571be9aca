"""Exploding gradients are named first when they precede a non-finite step or a divergence.

A global gradient norm that grows by orders of magnitude over a few steps, then turns non-finite,
is reported as ``exploding-grad`` (fix: clip gradients) ahead of the ``nonfinite-*``,
``loss-spike`` and ``lr-too-high`` findings it explains, whose advice then points to clipping
rather than to ``sqrt`` at 0. A NaN that comes from the data, with flat norms before it, is not.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import Callback, DivergenceError, NonFiniteError, SafeTrainer
from safeloop.guards.divergence import NormTrail
from safeloop.results import Finding, FitResult
from safeloop.testing import PoisonedDataset
from tests.helpers.models import classification_data

EXPLAINED = ("nonfinite-loss", "nonfinite-grad", "loss-spike", "lr-too-high")
# "... rose from a median of 2.3 over steps 1-4 to 2.88e+11 at step 9, 1.25e+11x"
RISE = re.compile(r"rose from a median of (\S+) over steps? (\d+)(?:-(\d+))? to (\S+) at step (\d+), (\S+)x")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def _classes() -> TensorDataset:
    return classification_data(n=512, features=20, classes=5)


def _fit(model: nn.Module, optimizer: torch.optim.Optimizer, data, loss_fn: nn.Module, **kwargs) -> FitResult:
    kwargs.setdefault("max_consecutive_skips", 100)  # refused steps stay skips: nothing escalates
    kwargs.setdefault("rollback", False)
    return SafeTrainer(
        model,
        optimizer,
        DataLoader(data, batch_size=32, shuffle=kwargs.pop("shuffle", True)),
        loss_fn=loss_fn,
        seed=1,
        progress_bar=False,
        **kwargs,
    ).fit()


def _rise(finding: Finding) -> tuple[float, int, float, int, float]:
    """(baseline median, its last step, peak, peak step, ratio) quoted by an exploding-grad message."""
    match = RISE.search(finding.message)
    assert match, finding.message
    median, _, last, peak, at, ratio = match.groups()
    return float(median), int(last or match.group(2)), float(peak), int(at), float(ratio)


def _exploding_first(findings: list[Finding]) -> Finding:
    """The first exploding-grad finding, checked to come before every finding it explains."""
    codes = [f.code for f in findings]
    assert "exploding-grad" in codes, codes
    first = codes.index("exploding-grad")
    assert all(codes.index(code) > first for code in EXPLAINED if code in codes), codes
    finding = findings[first]
    assert finding.severity == "warning"
    assert "clip_grad_norm=1.0" in finding.suggestion and "recurrent" in finding.suggestion
    return finding


def _nonfinite_points_to_clipping(result: FitResult) -> None:
    bad = [f for f in result.findings if f.code in ("nonfinite-grad", "nonfinite-loss")]
    assert bad, [f.code for f in result.findings]
    for finding in bad:
        assert "exploding gradients" in finding.message and "exploding gradients" in finding.suggestion
        assert "clip_grad_norm=1.0" in finding.suggestion and "sqrt" not in finding.suggestion
    report = result.report()
    assert report.index("exploding-grad") < report.index(bad[0].code)


def test_sgd_at_lr_10_on_a_five_class_mlp_reports_exploding_gradients_before_nonfinite_grad():
    # the user's report: norms 0.44, 2.3, 5.8, 2.4, 22, 109, 1.7e4, 5.2e5, 2.9e11, then inf at step 10
    model = _mlp()
    result = _fit(
        model, torch.optim.SGD(model.parameters(), lr=10.0), _classes(), nn.CrossEntropyLoss(), max_steps=12
    )
    finding = _exploding_first(result.findings)
    median, last, peak, at, ratio = _rise(finding)
    assert "the non-finite gradients of step 10" in finding.message
    assert last == 4 and at == 9 and ratio > 1e6 and peak / median == pytest.approx(ratio, rel=1e-2)
    # step 10 is refused at the step, before its log check: that check adds the layers' names
    assert finding.params and all(f"`{name}`" in finding.message for name in finding.params)
    _nonfinite_points_to_clipping(result)
    skip = next(e for e in result.events if e.kind == "skip")
    assert skip.step == 10 and skip.detail["exploding"]["ratio"] > 10


def test_nan_guard_raise_names_exploding_gradients_first_in_its_error():
    # "raise" learns of the step before its row is buffered: the norms read are those of steps 1-9
    model = _mlp()
    with pytest.raises(NonFiniteError) as excinfo:
        _fit(
            model, torch.optim.SGD(model.parameters(), lr=10.0), _classes(), nn.CrossEntropyLoss(),
            max_steps=12, nan_guard="raise",
        )  # fmt: skip
    assert [f.code for f in excinfo.value.findings] == ["exploding-grad", "nonfinite-grad"]
    assert "Exploding gradients before the non-finite gradients of step 10" in str(excinfo.value)
    _, last, _, at, ratio = _rise(excinfo.value.findings[0])
    assert (last, at) == (4, 9) and ratio > 1e6


class _Recurrent(nn.Module):
    """A tanh RNN over 60 steps, regressing from its last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(4, 32, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def test_an_rnn_on_long_sequences_at_a_high_lr_reports_exploding_gradients_first():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 60, 4, generator=gen)
    y = x[:, :, 0].sum(1, keepdim=True) / 8
    model = _Recurrent()
    result = _fit(
        model, torch.optim.SGD(model.parameters(), lr=0.5), TensorDataset(x, y), nn.MSELoss(),
        max_steps=30, shuffle=False,
    )  # fmt: skip
    finding = _exploding_first(result.findings)
    median, _, peak, at, ratio = _rise(finding)
    first_skip = next(e for e in result.events if e.kind == "skip")
    assert at < first_skip.step and ratio > 10 and peak > 10 * median
    assert f"non-finite gradients of step {first_skip.step}" in finding.message
    # the norms rose across a log check: the recurrent layer's, measured per parameter, are named
    assert "rose most" in finding.message and any(name.startswith("rnn.") for name in finding.params)
    _nonfinite_points_to_clipping(result)
    # one blow-up, one finding, however many steps it refuses afterwards
    assert len([f for f in result.findings if f.code == "exploding-grad"]) == 1


class _GrowWeights(Callback):
    """Multiplies every weight by ``factor`` before each step from ``start`` on (a runaway callback)."""

    def __init__(self, start: int, factor: float) -> None:
        self.start, self.factor = start, factor

    def on_train_batch_start(self, trainer, batch, batch_idx) -> None:
        if trainer.global_step + 1 >= self.start:
            with torch.no_grad():
                for param in trainer.model.parameters():
                    param.mul_(self.factor)


def test_weights_scaled_up_by_a_callback_under_fused_adamw_report_exploding_gradients_first():
    # fused AdamW skips on the device: the non-finite steps are learnt at the log step of step 30
    model = _mlp()
    result = _fit(
        model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), _classes(), nn.CrossEntropyLoss(),
        max_steps=30, callbacks=[_GrowWeights(start=13, factor=10.0)],
    )  # fmt: skip
    finding = _exploding_first(result.findings)
    median, last, _, at, ratio = _rise(finding)
    first_skip = next(e for e in result.events if e.kind == "skip")
    assert 13 <= at < first_skip.step and ratio > 1e6
    # the baseline's last steps already grew: its median stays at the healthy level
    assert last == first_skip.step - 6 and median < 1
    assert "rose most" in finding.message and finding.params
    _nonfinite_points_to_clipping(result)


def test_a_divergence_out_of_rollbacks_ranks_exploding_gradients_first():
    model = _mlp()
    with pytest.raises(DivergenceError) as excinfo:
        _fit(
            model, torch.optim.SGD(model.parameters(), lr=10.0), _classes(), nn.CrossEntropyLoss(),
            max_steps=40, rollback=True, max_rollbacks=0, max_consecutive_skips=2,
        )  # fmt: skip
    message = str(excinfo.value)
    causes = message.split("Most likely causes:\n", 1)[1].splitlines()
    assert causes[0].startswith("  1. [exploding-grad] the gradients exploded before 1 of the 1 divergences")
    assert "[lr-too-high]" in causes[1]
    assert [f.code for f in excinfo.value.findings][:2] == ["exploding-grad", "lr-too-high"]
    _, _, _, at, ratio = _rise(excinfo.value.findings[0])
    assert at == 9 and ratio > 1e6


def test_a_divergence_rolled_back_records_the_rise_and_lists_exploding_gradients_first():
    model = _mlp()
    result = _fit(
        model, torch.optim.SGD(model.parameters(), lr=10.0), _classes(), nn.CrossEntropyLoss(),
        max_steps=20, rollback=True, max_consecutive_skips=2, log_every=5,
    )  # fmt: skip
    rollback = next(e for e in result.events if e.kind == "rollback")
    assert rollback.detail["reason"] == "nonfinite" and rollback.detail["grad_norm_ratio"] > 10
    assert rollback.detail["exploding"]["peak_step"] < rollback.detail["anomaly_start"]
    finding = _exploding_first(result.findings)
    # learnt at step 10, named at the log check of step 10, whose interval holds the peak (step 9)
    assert "rose most from the log check of step 5 to step 10" in finding.message


def test_a_nan_batch_after_flat_norms_reports_no_exploding_gradients():
    data = PoisonedDataset(_classes(), indices=range(192, 224), value=math.nan)  # all of batch 7
    model = _mlp()
    result = _fit(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        data,
        nn.CrossEntropyLoss(),
        max_steps=16,
        shuffle=False,
    )
    codes = [f.code for f in result.findings]
    assert "nonfinite-input" in codes and "exploding-grad" not in codes
    skip = next(e for e in result.events if e.kind == "skip")
    assert skip.step == 7 and "exploding" not in skip.detail
    norms = [h["grad_norm"] for h in result.history]
    assert max(norms) < 10 * min(norms)  # flat before (and after) the poisoned batch


def test_the_trail_takes_its_first_norms_as_baseline_and_reports_one_blow_up_once():
    trail = NormTrail()
    trail.observe(5, [0.5, 0.6, 0.55, 30.0, 900.0])  # a blow-up within the first steps
    explosion = trail.explosion(6)
    assert explosion is not None and (explosion.base_from, explosion.base_to) == (1, 3)
    assert explosion.peak_step == 5 and explosion.ratio == pytest.approx(900 / 0.55)
    assert trail.report(explosion, "the non-finite loss of step 6") is not None
    trail.observe(7, [math.inf, 5e4])
    again = trail.explosion(8)
    assert again is not None and trail.report(again, "the non-finite loss of step 8") is None
    flat = NormTrail()
    flat.observe(20, [1.0 + 0.1 * (i % 3) for i in range(20)])
    assert flat.explosion(21) is None
