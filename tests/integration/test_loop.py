"""The loop's order of hooks, its host reads, its history, evaluation and trackers."""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from safeloop import Callback, FitResult, SafeTrainer
from tests.helpers.models import classification_data, loader, mlp
from tests.helpers.recording import HookRecorder, JsonLinesTracker


def _trainer(**kwargs) -> SafeTrainer:
    model = kwargs.pop("model", None) or mlp()
    data = kwargs.pop("data", None) or classification_data()
    kwargs.setdefault("progress_bar", False)
    kwargs.setdefault("loss_fn", nn.CrossEntropyLoss())
    return SafeTrainer(
        model,
        kwargs.pop("optimizer", None) or torch.optim.AdamW(model.parameters(), lr=1e-2),
        kwargs.pop("train_dataloader", None) or loader(data, batch_size=kwargs.pop("batch_size", 8)),
        **kwargs,
    )


def test_hooks_fire_in_the_documented_order_under_accumulation():
    recorder = HookRecorder()
    data = classification_data(n=40)  # 5 batches of 8: windows of 2, 2 and a partial 1
    trainer = _trainer(
        data=data,
        gradient_accumulation_steps=2,
        eval_dataloader=loader(classification_data(n=16, seed=1), shuffle=False),
        callbacks=[recorder],
        log_every=1,
    )
    trainer.fit()
    micro = ["on_train_batch_start", "on_after_backward"]
    stepping = [*micro, "on_before_optimizer_step", "on_train_batch_end"]
    plain = [*micro, "on_train_batch_end"]
    expected = [
        "on_fit_start",
        *plain,
        *stepping,
        *plain,
        *stepping,
        *stepping,
        "on_validation_end",
        "on_fit_end",
    ]
    assert recorder.names() == expected
    # batch_idx counts micro-batches in the epoch; global_step moves before on_train_batch_end
    ends = [(step, idx) for name, step, idx in recorder.calls if name == "on_train_batch_end"]
    assert ends == [(0, 0), (1, 1), (1, 2), (2, 3), (3, 4)]
    # on_before_optimizer_step sees the gradients in place
    assert all(extra for name, _, extra in recorder.calls if name == "on_before_optimizer_step")


def test_fit_result_counts_steps_and_history_holds_the_documented_keys():
    result = _trainer(max_epochs=2, log_every=5).fit()  # 12 batches per epoch -> 24 steps
    assert isinstance(result, FitResult)
    assert result.global_step == 24
    assert [entry["step"] for entry in result.history] == [5, 10, 15, 20, 24]
    for entry in result.history:
        assert {"step", "loss", "lr", "grad_norm", "epoch"} <= entry.keys()
        assert math.isfinite(entry["loss"]) and entry["grad_norm"] > 0
    assert result.history[-1]["epoch"] == 1
    assert result.skipped_steps == 0 and result.rollbacks == 0 and result.eval_loss is None


def test_logged_loss_is_the_mean_of_the_steps_since_the_last_log():
    losses: list[float] = []

    class LossProbe(Callback):
        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            losses.append(outputs.item())

    result = _trainer(log_every=4, callbacks=[LossProbe()], max_steps=8).fit()
    assert result.history[0]["loss"] == pytest.approx(sum(losses[:4]) / 4, rel=1e-6)
    assert result.history[1]["loss"] == pytest.approx(sum(losses[4:8]) / 4, rel=1e-6)


def test_training_loss_decreases_on_a_learnable_problem():
    result = _trainer(max_epochs=8, log_every=12).fit()
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]


class _HostReadCounter(TorchDispatchMode):
    """Counts host reads of tensors (`aten._local_scalar_dense`, `Tensor.tolist`).

    Reads made while loading data (the sampler's seed, index lists) happen on host tensors in
    any loop, so reads whose stack passes through `torch/utils/data` are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    @staticmethod
    def _from_data_loading() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if "torch/utils/data" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    def count(self) -> None:
        if not self._from_data_loading():
            self.reads += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count()
        return func(*args, **(kwargs or {}))


def _reads_per_step(monkeypatch, **trainer_kwargs) -> list[int]:
    """Run a short fit and return the host reads made during each step (batch start to batch start).

    `Tensor.tolist` bypasses the dispatcher, so it is counted by hand next to the dispatch mode.
    """
    counter = _HostReadCounter()
    original_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        counter.count()
        return original_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    marks: list[int] = []

    class Mark(Callback):
        def on_train_batch_start(self, trainer, batch, batch_idx):
            marks.append(counter.reads)

    trainer = _trainer(callbacks=[Mark()], **trainer_kwargs)
    with counter:
        trainer.fit()
    marks.append(counter.reads)
    return [b - a for a, b in itertools.pairwise(marks)]


@pytest.mark.parametrize("diagnostics", [False, True])
def test_host_reads_happen_once_per_log_step_and_never_on_other_steps(monkeypatch, diagnostics):
    model = mlp()
    # fused AdamW keeps its step counters as tensors it never reads; the for-loop variant
    # calls `.item()` on them (host tensors, yet counted by the dispatcher).
    reads = _reads_per_step(
        monkeypatch,
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
        log_every=5,
        max_steps=20,
        clip_grad_norm=1.0,
        diagnostics=diagnostics,
    )
    # the first step's extra reads: the preflight (zero-weight check), and with diagnostics the
    # first-batch checks (inputs finite, every target masked?, target range, initial loss, every
    # first gradient exactly zero?: 8 reads here); once per fit.
    # Diagnostics add nothing to other steps: their log-step values travel in the metrics' read;
    # the first log step after 8 micro-batches also reads the baseline loss's statistics (two
    # reads, once per fit).
    baseline = 3 if diagnostics else 1
    assert reads == [9 if diagnostics else 1, 0, 0, 0, 1] + [0, 0, 0, 0, baseline] + [0, 0, 0, 0, 1] * 2


@pytest.mark.parametrize(("accumulation", "mode"), [(2, "auto"), (1, "split")])
def test_the_gradient_noise_scale_adds_no_host_read(monkeypatch, accumulation, mode):
    # its per-step sums stay on the device and travel in the log step's one read
    def reads(setting: str) -> list[int]:
        model = mlp()
        return _reads_per_step(
            monkeypatch,
            model=model,
            optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
            log_every=5,
            max_steps=30,
            gradient_accumulation_steps=accumulation,
            gradient_noise_scale=setting,
        )

    measured = reads(mode)
    assert measured == reads("off")
    assert sum(measured[accumulation * 10 :]) == 4  # steps 11-30: the 4 log steps' reads only


def test_optimizers_without_found_inf_read_the_guard_flag_once_per_step(monkeypatch):
    model = mlp()
    reads = _reads_per_step(
        monkeypatch,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        log_every=5,
        max_steps=10,
    )
    # the flag each step, the metrics on log steps (the one after 8 micro-batches also the
    # baseline loss's two), and the first step's checks once
    assert reads[1:] == [1, 1, 1, 2, 1, 1, 1, 1, 4] and reads[0] == 10


def test_guard_off_reads_nothing_outside_log_steps_with_any_optimizer(monkeypatch):
    model = mlp()
    reads = _reads_per_step(
        monkeypatch,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        nan_guard="off",
        log_every=5,
        max_steps=10,
    )
    # the first step's checks, the metrics on the log steps (the one after 8 micro-batches also
    # the baseline loss's two); nothing else
    assert reads[1:] == [0, 0, 0, 1, 0, 0, 0, 0, 3] and reads[0] == 9


def test_eval_loss_is_the_sample_weighted_mean_and_model_is_back_in_train_mode():
    eval_data = classification_data(n=20, seed=5)  # batches of 8, 8, 4: weighting matters
    modes: list[bool] = []

    class ModeProbe(Callback):
        def on_validation_end(self, trainer, eval_loss):
            modes.append(trainer.model.training)

    trainer = _trainer(eval_dataloader=loader(eval_data, shuffle=False), callbacks=[ModeProbe()])
    result = trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        x, y = eval_data.tensors
        model.eval()
        expected = nn.functional.cross_entropy(model(x), y).item()
    assert result.eval_loss == pytest.approx(expected, rel=1e-5)
    assert modes == [True]


def test_eval_uses_eval_mode_so_dropout_is_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.9), nn.Linear(32, 3))
    eval_loader = loader(classification_data(n=16, seed=2), shuffle=False)
    trainer = _trainer(model=model, eval_dataloader=eval_loader, max_steps=1)
    first = trainer.fit().eval_loss
    # with dropout active two evaluations would differ; in eval mode they agree exactly
    from safeloop.evaluation import evaluate

    def loss_of(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    second = evaluate(trainer.accelerator, trainer.model, trainer.eval_dataloader, loss_of)
    again = evaluate(trainer.accelerator, trainer.model, trainer.eval_dataloader, loss_of)
    assert first == second == again


def test_evaluation_runs_at_the_end_of_every_epoch():
    seen: list[int] = []

    class EvalProbe(Callback):
        def on_validation_end(self, trainer, eval_loss):
            seen.append(trainer.global_step)

    _trainer(
        max_epochs=3,
        eval_dataloader=loader(classification_data(n=16, seed=1)),
        callbacks=[EvalProbe()],
    ).fit()
    assert seen == [12, 24, 36]


def test_metrics_reach_accelerate_trackers(tmp_path):
    tracker = JsonLinesTracker(str(tmp_path / "log.jsonl"))
    result = _trainer(
        log_with=[tracker],
        project_dir=str(tmp_path),
        log_every=4,
        max_steps=8,
        eval_dataloader=loader(classification_data(n=16, seed=1)),
    ).fit()
    train_logs = [(step, values) for step, values in tracker.logged if "train/loss" in values]
    assert [step for step, _ in train_logs] == [4, 8]
    assert train_logs[0][1]["train/loss"] == pytest.approx(result.history[0]["loss"])
    assert {"train/lr", "train/grad_norm"} <= train_logs[0][1].keys()
    assert any("eval/loss" in values for _, values in tracker.logged)
    assert tracker.config["max_steps"] == 8
    # once, at the first log step after the 8 micro-batches it is measured on
    baseline = [
        (step, values["baseline_loss"]) for step, values in tracker.logged if "baseline_loss" in values
    ]
    assert result.baseline_loss is not None and baseline == [(8, pytest.approx(result.baseline_loss))]


def test_clip_grad_value_clamps_every_gradient_element():
    seen: list[float] = []

    class GradProbe(Callback):
        def on_before_optimizer_step(self, trainer, optimizer):
            seen.append(max(p.grad.abs().max().item() for p in trainer.model.parameters()))

    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
    result = _trainer(model=model, clip_grad_value=0.01, callbacks=[GradProbe()], log_every=1).fit()
    assert max(seen) <= 0.01
    # the logged norm is measured before clamping, so it is larger than any clamped norm
    assert max(entry["grad_norm"] for entry in result.history) > 0.01


def test_bf16_mixed_precision_trains_on_cpu():
    result = _trainer(mixed_precision="bf16", max_epochs=3, log_every=12).fit()
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_bring_your_own_accelerator_is_used_and_left_open():
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=3)
    trainer = _trainer(accelerator=accelerator, max_steps=4)
    assert trainer.accelerator is accelerator
    assert trainer.config.gradient_accumulation_steps == 3
    assert trainer.fit().global_step == 4


def test_seed_makes_two_runs_identical_including_shuffling():
    def run() -> dict[str, torch.Tensor]:
        from tests.conftest import _reset_accelerate

        model = mlp()
        _trainer(model=model, seed=7, max_epochs=2).fit()
        _reset_accelerate()
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)
