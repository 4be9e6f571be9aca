"""Findings under Lightning: the same mistakes give ``SafeTrainer``'s codes, healthy runs give none.

Each mistake is written once, as a LightningModule, and run twice: by ``trainer.fit`` with
``SafeLoopCallback``, and by ``SafeTrainer`` with ``training_step=lambda model, batch:
model.training_step(batch, 0)`` (a LightningModule is an ``nn.Module``). The findings must
agree in code, severity and the parameters named. Healthy runs (a classifier in automatic and
manual optimization, and four kinds of ``test_false_alarms.py``: BatchNorm convnet, tiny
transformer LM, LoRA, zero-init residual blocks) give no warning. Then where findings go
(Lightning's loggers, the Python log, ``report()``) and what the callback costs in host reads.
"""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")

import lightning.pytorch as pl
from torch.utils._python_dispatch import TorchDispatchMode

from safeloop import ConfigError, SafeTrainer
from safeloop.lightning import SafeLoopCallback
from safeloop.results import Finding
from tests.helpers.lightning_models import QUIET, Classifier, RecordingLogger, acted, batches, trainer
from tests.helpers.models import classification_data

pytestmark = [pytest.mark.usefixtures("one_thread"), *(pytest.mark.filterwarnings(q) for q in QUIET)]


def _lightning(module: pl.LightningModule, loader: DataLoader, steps: int, log_every: int) -> list[Finding]:
    callback = SafeLoopCallback(log_every=log_every, summary=False)
    trainer(callback, max_steps=steps, max_epochs=-1).fit(module, loader)
    return callback.findings


def _safetrainer(module: pl.LightningModule, loader: DataLoader, steps: int, log_every: int) -> list[Finding]:
    trainer = SafeTrainer(
        module, module.configure_optimizers(), loader,
        training_step=lambda model, batch: model.training_step(batch, 0),
        max_steps=steps, log_every=log_every, rollback=False, seed=0, progress_bar=False, summary=False,
    )  # fmt: skip
    return trainer.fit().findings


def _run(fit, module, loader, steps, log_every) -> list[Finding]:
    """The findings of a run, or of the ConfigError that stopped it."""
    try:
        return fit(module, loader, steps, log_every)
    except ConfigError as error:
        return list(error.findings)


def _keyed(findings: list[Finding]) -> set[tuple[str, str, tuple[str, ...]]]:
    return {(f.code, f.severity, f.params) for f in findings}


def _listing(findings: list[Finding]) -> str:
    return "\n".join(f"[{f.severity}] {f.code} {f.params} {f.message[:120]}" for f in findings)


# -- the mistakes ---------------------------------------------------------------------------------


class _Unused(Classifier):
    """An auxiliary head defined in ``__init__`` and forgotten in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(16, 3)


class _Detached(Classifier):
    """``forward`` detaches the hidden features: only the last layer can learn."""

    def forward(self, x):
        return self.net[2](self.net[1](self.net[0](x)).detach())


class _Frozen(Classifier):
    """Every parameter frozen (a backbone frozen together with the head inside it)."""

    def __init__(self) -> None:
        super().__init__()
        self.requires_grad_(False)


class _NoGradStep(Classifier):
    """A ``training_step`` whose forward was copied from the evaluation code."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            logits = self(x)
        return nn.functional.cross_entropy(logits, y)


class _LossPerSample(Classifier):
    """``reduction="none"``: a loss per sample reaches backward."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, reduction="none")


class _BackwardInStep(Classifier):
    """A hand-written loop's habit: ``loss.backward()`` inside ``training_step``."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        loss.backward()
        return loss


class _HeadNotOptimized(Classifier):
    """``configure_optimizers`` was written when the model was only its body."""

    def configure_optimizers(self):
        return torch.optim.Adam(self.net[0].parameters(), lr=1e-2)


class _ZeroLayer(Classifier):
    """The first layer initialised with ``zeros_`` where ``normal_`` was meant."""

    def __init__(self) -> None:
        super().__init__()
        nn.init.zeros_(self.net[0].weight)
        nn.init.zeros_(self.net[0].bias)


class _DeadReLU(Classifier):
    """A very negative bias before the ReLU: every hidden unit is off for every input."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.net[0].bias.fill_(-10.0)


class _DeepSigmoid(Classifier):
    """20 Linear layers with sigmoids between them, trained with SGD."""

    def __init__(self) -> None:
        super().__init__(lambda params: torch.optim.SGD(params, lr=0.1))
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(8, 16), nn.Sigmoid()]
        for _ in range(18):
            layers += [nn.Linear(16, 16), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(16, 3))


class _ZeroDerivative(Classifier):
    """A loss through ``round`` or ``sign`` of the outputs: a ``grad_fn``, but a zero derivative."""

    op = "round"

    def training_step(self, batch, batch_idx):
        x, y = batch
        predicted = getattr(torch, self.op)(self(x)[:, 0])
        return nn.functional.mse_loss(predicted, y.float())


class _SignedLoss(_ZeroDerivative):
    op = "sign"


class _Regression(pl.LightningModule):
    """A regressor whose (B, 1) output meets (B,) targets in ``mse_loss``: it broadcasts to (B, B)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _with_nan_input() -> DataLoader:
    x, y = classification_data().tensors
    x = x.clone()
    x[3, 5] = math.nan  # a missing value in the source data, in the first batch
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _regression_data() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=gen)
    return DataLoader(TensorDataset(x, x[:, 0] - x[:, 1]), batch_size=8, shuffle=False)


# (module, data, steps, log_every, the codes both must report)
MISTAKES = {
    "unused-params": (_Unused, batches, 4, 10, {"unused-params"}),
    "detached-params": (_Detached, batches, 4, 10, {"detached-params"}),
    "no-trainable-params": (_Frozen, batches, 4, 10, {"no-trainable-params", "loss-not-differentiable"}),
    "loss-not-differentiable": (_NoGradStep, batches, 4, 10, {"loss-not-differentiable"}),
    "loss-not-scalar": (_LossPerSample, batches, 4, 10, {"loss-not-scalar"}),
    "double-backward": (_BackwardInStep, batches, 4, 10, {"double-backward"}),
    "optimizer-missing-params": (_HeadNotOptimized, batches, 4, 10, {"optimizer-missing-params"}),
    "zero-params": (_ZeroLayer, batches, 4, 10, {"zero-params"}),
    "loss-broadcast": (_Regression, _regression_data, 4, 10, {"loss-broadcast"}),
    "dead-units": (_DeadReLU, batches, 15, 5, {"dead-units"}),
    # every first gradient exactly zero: named at step 0, and its rows not taken for dead units
    "zero-derivative-round": (_ZeroDerivative, batches, 40, 10, {"detached-params"}),
    "zero-derivative-sign": (_SignedLoss, batches, 40, 10, {"detached-params"}),
    "vanishing-grad": (_DeepSigmoid, batches, 20, 5, {"vanishing-grad"}),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_in_a_lightning_module_gives_the_findings_safetrainer_gives(mistake):
    build, data, steps, log_every, codes = MISTAKES[mistake]
    ours = _run(_lightning, build(), data(), steps, log_every)
    theirs = _run(_safetrainer, build(), data(), steps, log_every)
    assert codes <= {f.code for f in ours}, _listing(ours)
    assert _keyed(ours) == _keyed(theirs), f"Lightning:\n{_listing(ours)}\nSafeTrainer:\n{_listing(theirs)}"


class _Softmaxed(Classifier):
    """Probabilities returned from ``forward``: ``cross_entropy`` applies softmax again."""

    def forward(self, x):
        return self.net(x).softmax(dim=1)


class _HotLogits(Classifier):
    """The head's weights scaled up at init (a temperature applied the wrong way round)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.net[2].weight.mul_(100.0)
            self.net[2].bias.mul_(100.0)


def _labels_from_one() -> DataLoader:
    x, y = classification_data().tensors
    return DataLoader(TensorDataset(x, y + 1), batch_size=32, shuffle=False)  # classes 1..3, not 0..2


def _safetrainer_loss_fn(module, loader, steps, log_every) -> list[Finding]:
    """SafeTrainer given the loss as ``loss_fn``: the form whose targets it checks."""
    trainer = SafeTrainer(
        module, module.configure_optimizers(), loader, loss_fn=nn.CrossEntropyLoss(),
        max_steps=steps, log_every=log_every, rollback=False, seed=0, progress_bar=False, summary=False,
    )  # fmt: skip
    return trainer.fit().findings


# the losses a training_step calls are checked as SafeTrainer checks its `loss_fn`
LOSS_MISTAKES = {
    "target-out-of-range": (Classifier, _labels_from_one, "numbered 1..3 instead of 0..2"),
    "activation-loss-mismatch": (_Softmaxed, batches, "already applies softmax"),
    "initial-loss-high": (_HotLogits, batches, "ln(3)"),
}


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize("mistake", list(LOSS_MISTAKES))
def test_a_loss_called_in_training_step_is_checked_as_safetrainer_checks_its_loss_fn(mistake, manual):
    build, data, words = LOSS_MISTAKES[mistake]
    module = build()
    module.automatic_optimization = not manual
    ours = _run(_lightning, module, data(), 2, 10)
    theirs = _run(_safetrainer_loss_fn, build(), data(), 2, 10)
    [mine] = [f for f in ours if f.code == mistake]
    assert words in mine.message and "`F.cross_entropy`" in mine.message, _listing(ours)
    assert _keyed(ours) == _keyed(theirs), f"Lightning:\n{_listing(ours)}\nSafeTrainer:\n{_listing(theirs)}"


def test_a_nan_in_the_first_batch_is_named_as_safetrainer_names_it_and_the_step_is_skipped():
    ours = _run(_lightning, Classifier(), _with_nan_input(), 4, 10)
    theirs = _run(_safetrainer, Classifier(), _with_nan_input(), 4, 10)
    [mine] = [f for f in ours if f.code == "nonfinite-input"]
    [reference] = [f for f in theirs if f.code == "nonfinite-input"]
    assert (
        (mine.severity, mine.params, mine.step)
        == (reference.severity, reference.params, 0)
        == ("error", ("batch[0]",), 0)
    )
    # SafeTrainer replays the skipped batch and folds the skip into this finding; the callback
    # cannot call a training_step itself, so its skip stays a finding of its own
    assert {f.code for f in ours} == {"nonfinite-input", "nonfinite-loss"}


def test_a_raised_mistake_stops_manual_optimization_too_before_torchs_error():
    class ManualNoGrad(_NoGradStep):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            self.manual_backward(super().training_step(batch, batch_idx))  # torch would say "element 0 ..."

    with pytest.raises(ConfigError, match=r"\[loss-not-differentiable\] .* ran with gradients disabled"):
        trainer(SafeLoopCallback(summary=False), max_steps=2).fit(ManualNoGrad(), batches())


# -- healthy runs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manual", "accumulate", "scheduler"),
    [(False, 1, False), (False, 2, True), (True, 1, False)],
    ids=["automatic", "accumulation-scheduler", "manual"],
)
def test_a_healthy_lightning_module_gives_no_warning(caplog, manual, accumulate, scheduler):
    callback = SafeLoopCallback(log_every=5, summary=False)
    module = Classifier(manual=manual, scheduler=scheduler)
    with caplog.at_level(logging.WARNING, logger="safeloop"):
        trainer(callback, max_epochs=4, accumulate_grad_batches=accumulate).fit(module, batches())
    assert [f for f in callback.findings if f.severity != "info"] == [], _listing(callback.findings)
    assert not caplog.records
    result = callback.result
    assert result.global_step == 48 // accumulate and result.skipped_steps == 0 and acted(callback) == []
    assert result.history[-1]["loss"] < result.history[0]["loss"]  # it did train


class _Wrapped(pl.LightningModule):
    """A LightningModule around a model of the false-alarm suite: its loss, its optimizer."""

    def __init__(self, model: nn.Module, optimizer, loss=None, step=None) -> None:
        super().__init__()
        self.model, self.make_optimizer, self.loss, self.step = model, optimizer, loss, step

    def training_step(self, batch, batch_idx):
        if self.step is not None:
            return self.step(self.model, batch)
        inputs, targets = batch
        return self.loss(self.model(inputs), targets)

    def configure_optimizers(self):
        return self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])


def _suite(kind: str) -> tuple[_Wrapped, DataLoader, float]:
    """One healthy kind of training of ``test_false_alarms.py``: module, data, learned factor."""
    import tests.integration.test_false_alarms as suite

    torch.manual_seed(0)
    adamw = lambda lr: lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01)  # noqa: E731
    if kind == "convnet-batchnorm":
        x, y = suite._images(1024, seed=200)
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(16, 4),
        )  # fmt: skip
        return _Wrapped(model, adamw(3e-3), loss=F.cross_entropy), suite._loader(x, y, batch_size=32), 0.5
    if kind == "transformer-lm":
        seqs = suite._token_sequences(1024, 32, 16, seed=300)
        torch.manual_seed(0)

        def step(model, batch):
            (tokens,) = batch
            return suite._token_loss(model(tokens[:, :-1]), tokens[:, 1:])

        module = _Wrapped(suite.TinyLM(32, 32, 16, tied=True), adamw(3e-3), step=step)
        return module, suite._loader(seqs, batch_size=32), 0.5
    if kind == "lora":
        gen = torch.Generator().manual_seed(500)
        base = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
        x = torch.randn(2048, 16, generator=gen)
        with torch.no_grad():
            delta = torch.randn(32, 2, generator=gen) @ torch.randn(2, 16, generator=gen) / 4
            y = base[2](F.gelu(base[0](x) + x @ delta.T))
        model = nn.Sequential(suite.LoRALinear(base[0], rank=4), nn.GELU(), base[2].requires_grad_(False))
        return _Wrapped(model, adamw(1e-2), loss=F.mse_loss), suite._loader(x, y, batch_size=64), 0.3
    # zero-init residual blocks with LayerNorm
    gen = torch.Generator().manual_seed(600)
    x = torch.randn(2048, 16, generator=gen)
    y = (torch.sin(x[:, :4]) @ torch.randn(4, 6, generator=gen) + x[:, 4:10] ** 2).argmax(dim=1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32),
        suite.ResidualBlock(32),
        suite.ResidualBlock(32),
        nn.LayerNorm(32),
        nn.Linear(32, 6),
    )
    return _Wrapped(model, adamw(2e-3), loss=F.cross_entropy), suite._loader(x, y, batch_size=64), 0.5


@pytest.mark.parametrize("kind", ["convnet-batchnorm", "transformer-lm", "lora", "zero-init-residual"])
def test_the_false_alarm_suites_healthy_runs_give_no_warning_under_lightning(kind):
    from tests.integration.test_false_alarms import LOG_EVERY, assert_healthy

    module, loader, learned = _suite(kind)
    callback = SafeLoopCallback(log_every=LOG_EVERY, summary=False)
    trainer(callback, max_steps=200, max_epochs=-1).fit(module, loader)
    assert_healthy(callback.result, steps=200, learned=learned)
    assert not [e for e in callback.events if e.kind == "reinit"]  # LoRA's B, zero-init branches: on purpose


# -- where findings go ----------------------------------------------------------------------------


def test_findings_reach_lightnings_loggers_the_python_log_and_the_report(caplog, capsys):
    logger = RecordingLogger()
    callback = SafeLoopCallback(log_every=2)  # summary on: printed at the end of the fit
    with caplog.at_level(logging.INFO, logger="safeloop"):
        trainer(callback, max_steps=4, logger=logger).fit(_Unused(), batches())
    assert {
        "safeloop/findings/unused-params",
        "safeloop/train/loss",
        "safeloop/train/grad_norm",
    } <= logger.logged_keys()
    assert {"safeloop/grad_norm/net.0.weight", "safeloop/update_ratio/net.0.weight"} <= logger.logged_keys()
    assert not {key for key in logger.logged_keys() if not key.startswith("safeloop/")}
    assert [step for step, metrics in logger.logged if "safeloop/train/loss" in metrics] == [2, 4]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split("]")[0] for r in warned] == ["safeloop [unused-params"]
    text = callback.report()
    assert text.startswith("safeloop: completed, 4 steps, 0 skipped") and "[warning] unused-params" in text
    assert "fix: Call these modules in `forward`" in text
    assert "safeloop: finished at step 4" in capsys.readouterr().out  # the summary, main process
    assert [h["step"] for h in callback.result.history] == [2, 4]


# -- what it costs --------------------------------------------------------------------------------


class _HostReads(TorchDispatchMode):
    """Counts host reads of tensor values (``aten._local_scalar_dense``; ``tolist`` is counted apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _reads_per_step(monkeypatch, make_optimizer, *callbacks: pl.Callback) -> list[int]:
    counter = _HostReads()
    original_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        counter.reads += 1
        return original_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    marks: list[int] = []

    class Mark(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            marks.append(counter.reads)

    with counter:
        trainer(Mark(), *callbacks, max_steps=12).fit(Classifier(make_optimizer), batches())
    marks.append(counter.reads)
    return [b - a for a, b in itertools.pairwise(marks)]


@pytest.mark.parametrize("diagnostics", [False, True], ids=["guard", "guard+diagnostics"])
@pytest.mark.parametrize(
    ("name", "per_step"),
    [("fused", 0), ("plain", 1)],
    ids=["fused-adamw-no-read", "adamw-one-read"],
)
def test_the_guard_reads_the_host_once_per_step_only_where_the_optimizer_needs_it(
    monkeypatch, name, per_step, diagnostics
):
    def make(params):
        return torch.optim.AdamW(params, lr=1e-2, fused=name == "fused")

    plain = _reads_per_step(monkeypatch, make)
    callback = SafeLoopCallback(log_every=4, diagnostics=diagnostics, summary=False)
    guarded = _reads_per_step(monkeypatch, make, callback)
    added = [g - p for g, p in zip(guarded, plain, strict=True)]
    # steps 4, 8, 12: the log step's one read (the diagnostics' values travel in it); step 1: the
    # all-zero weight check, and with diagnostics the first-batch checks (inputs finite, the
    # cross_entropy call's target range, the initial loss: 7 reads; every first gradient exactly
    # zero: 1 read), as SafeTrainer's first step
    first = 9 if diagnostics else 1
    expected = [per_step + (step % 4 == 0) for step in range(1, 13)]
    expected[0] += first
    expected[-1] += diagnostics  # the end of the fit: the baseline's bounds (one read, once per fit)
    assert added == expected
