"""``SafeTrainer.find_lr``: the range test restores everything, suggests a rate, refuses bad input.

The restore is checked the strict way: a ``fit()`` after ``find_lr()`` must give weights bitwise
equal to a ``fit()`` alone, with shuffling, dropout, gradient accumulation, a scheduler and no seed
(so the RNG the sweep consumed must be put back, not re-seeded). The 2-process version of the same
claim rides on the DDP parity test (``tests/distributed/test_parity_ranks.py``).
"""

from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import GradientState
from torch import nn

from safeloop import Callback, ConfigError, LRFinderResult, SafeTrainer
from tests.helpers.models import classification_data, loader, mlp


def _dropout_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))


def _trainer(model: nn.Module, optimizer=None, batch_size: int = 8, **options) -> SafeTrainer:
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    options.setdefault("progress_bar", False)
    options.setdefault("summary", False)
    return SafeTrainer(
        model,
        optimizer,
        loader(classification_data(n=96), batch_size=batch_size),
        loss_fn=nn.CrossEntropyLoss(),
        **options,
    )


def _state(trainer: SafeTrainer) -> dict[str, torch.Tensor]:
    """Weights, buffers and every optimizer tensor, copied."""
    out = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    for i, state in enumerate(trainer.optimizer.state.values()):
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{i}.{name}"] = value.detach().clone()
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fit_weights(find_first: bool, **find_options) -> tuple[dict[str, torch.Tensor], LRFinderResult | None]:
    GradientState._reset_state()
    torch.manual_seed(123)  # the shuffle and dropout draw from here: no `seed=` re-seeds fit
    model = _dropout_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    trainer = _trainer(
        model, optimizer, gradient_accumulation_steps=2, lr_scheduler=scheduler, max_steps=9, log_every=3
    )
    found = trainer.find_lr(num_steps=30, **find_options) if find_first else None
    trainer.fit()
    return _state(trainer), found


@pytest.mark.parametrize("snapshot", ["memory", "disk"])
def test_fit_after_find_lr_equals_fit_alone_bitwise(snapshot):
    alone, _ = _fit_weights(find_first=False)
    after, found = _fit_weights(find_first=True, snapshot=snapshot)
    assert found is not None and found.steps >= 10 and found.snapshot == snapshot
    assert found.loader_passes > 1  # 6 windows of 2 micro-batches per pass, 30 steps: cycled
    assert _equal(alone, after)


def test_find_lr_between_fits_puts_back_weights_optimizer_scheduler_rng_and_counters():
    torch.manual_seed(5)
    model = _dropout_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    trainer = _trainer(model, optimizer, lr_scheduler=scheduler, max_steps=5, gradient_accumulation_steps=2)
    trainer.fit()
    before = _state(trainer)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    scheduler_state, groups = scheduler.state_dict(), [dict(g) for g in optimizer.param_groups]
    counters = (trainer.accelerator.step, trainer.global_step, trainer.epoch)
    model.eval()  # a mode the sweep must put back (it trains in train mode)
    modes = [m.training for m in model.modules()]

    result = trainer.find_lr(num_steps=20)

    assert result.steps >= 10 and len(result.lrs) >= 10  # the sweep did train
    assert result.lrs[-1] > result.lrs[0] * 1e3  # through rates a thousand times its first one
    assert _equal(before, _state(trainer))
    assert torch.equal(rng[0], torch.get_rng_state()) and rng[1] == random.getstate()
    assert np.array_equal(rng[2], np.random.get_state()[1])
    assert scheduler.state_dict() == scheduler_state
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in groups
    ]
    assert (trainer.accelerator.step, trainer.global_step, trainer.epoch) == counters
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def test_the_fp16_loss_scale_is_put_back():
    model = mlp()
    accelerator = Accelerator()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    accelerator.native_amp = True
    accelerator.state._mixed_precision = "fp16"
    trainer = _trainer(model, accelerator=accelerator, max_steps=3)
    trainer.fit()
    scale, tracker = accelerator.scaler._scale.clone(), accelerator.scaler._growth_tracker.clone()
    result = trainer.find_lr(num_steps=20, max_lr=1e3)
    assert result.steps > 0
    assert torch.equal(accelerator.scaler._scale, scale)
    assert torch.equal(accelerator.scaler._growth_tracker, tracker)


def test_a_learnable_problem_gets_a_suggestion_inside_the_swept_range():
    torch.manual_seed(0)
    model = mlp(hidden=32)
    result = _trainer(model, batch_size=16).find_lr()
    assert result.verdict is None and result.suggestion is not None
    assert result.rule == "minimum"
    assert 1e-7 <= result.suggestion <= 1.0
    assert result.stop_reason in ("diverged", "nonfinite")  # AdamW at lr 10 blows up before the end
    assert len(result.lrs) == len(result.losses) == len(result.smoothed_losses)
    assert result.lrs[0] == 1e-7
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)  # evenly spaced in log
    assert result.baseline_loss == pytest.approx(math.log(3), rel=0.1)
    assert f"{result.suggestion:.3g}" in result.message and "minimum" in result.message


class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x).detach()  # a head cut from the graph


class _NoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        with torch.no_grad():  # an evaluation wrapper left around the training forward
            return self.net(x)


def _all_zero() -> nn.Module:
    model = mlp()
    for layer in (model[0], model[2]):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def _frozen() -> nn.Module:
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    "build", [_Detached, _NoGrad, _all_zero], ids=["detached", "no-grad", "zero-weights"]
)
def test_a_model_that_cannot_learn_gets_the_does_not_respond_verdict_not_a_number(build):
    model = build()
    result = _trainer(model).find_lr(num_steps=40)
    assert result.suggestion is None
    assert result.verdict == "no-response"
    assert "does not respond to the learning rate" in result.message


def test_frozen_weights_get_the_verdict_too():
    model = _frozen()
    # an optimizer over no trainable weight: SafeTrainer checks the optimizer, so give it one
    extra = nn.Parameter(torch.zeros(1))
    result = _trainer(model, torch.optim.SGD([extra], lr=0.1)).find_lr(num_steps=10)
    assert result.verdict == "no-response" and result.stop_reason == "no-grad"


def test_a_blow_up_at_a_high_rate_ends_the_sweep_not_the_run():
    torch.manual_seed(0)
    model = mlp()
    trainer = _trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), max_steps=4)
    result = trainer.find_lr(min_lr=1e-3, max_lr=1e12, num_steps=60, stop_factor=1e300)
    assert result.stop_reason == "nonfinite" and result.nonfinite_steps == 3
    assert all(math.isfinite(v) for v in result.losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fitted = trainer.fit()
    assert fitted.global_step == 4 and fitted.skipped_steps == 0


def test_callbacks_and_trackers_see_nothing_of_the_sweep():
    seen: list[str] = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, batch, batch_idx):
            seen.append("batch")

        def on_before_optimizer_step(self, trainer, optimizer):
            seen.append("step")

    _trainer(mlp(), callbacks=[Spy()]).find_lr(num_steps=10)
    assert seen == []


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"min_lr": 1.0, "max_lr": 1.0}, "`min_lr` (1.0) must be below `max_lr` (1.0)"),
        ({"min_lr": 0.1, "max_lr": 1e-3}, "must be below `max_lr`"),
        ({"min_lr": 0.0}, "`min_lr` must be > 0"),
        ({"max_lr": -1.0}, "`max_lr` must be > 0"),
        ({"min_lr": float("nan")}, "`min_lr` must be a finite number"),
        ({"num_steps": 5}, "`num_steps` must be at least 10"),
        ({"num_steps": 20.0}, "`num_steps` must be an int"),
        ({"stop_factor": 1.0}, "`stop_factor` must be > 1"),
        ({"smoothing": 1.0}, "`smoothing` must be in [0, 1)"),
        ({"rule": "fastest"}, "`rule` must be one of 'minimum', 'steepest', 'valley'"),
        ({"snapshot": "gpu"}, "`snapshot` must be one of 'auto', 'memory', 'disk'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(arguments, expected):
    model = mlp()
    trainer = _trainer(model)
    before = _state(trainer)
    with pytest.raises(ConfigError, match="find_lr") as error:
        trainer.find_lr(**arguments)
    assert expected in str(error.value)
    assert _equal(before, _state(trainer))


def test_find_lr_during_fit_is_refused():
    errors: list[str] = []

    class Tuner(Callback):
        def on_train_batch_end(self, trainer, loss, batch, batch_idx):
            if not errors:
                try:
                    trainer.find_lr()
                except ConfigError as error:
                    errors.append(str(error))

    _trainer(mlp(), callbacks=[Tuner()], max_steps=2).fit()
    assert errors and "while fit() runs" in errors[0]


def test_plot_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    result = _trainer(mlp()).find_lr(num_steps=20)
    path = tmp_path / "lr.png"
    figure = result.plot(path)
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    assert figure.axes[0].get_xscale() == "log"


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    result = LRFinderResult(
        lrs=[1e-3], losses=[1.0], smoothed_losses=[1.0], suggestion=None, rule="minimum", suggestions={},
        verdict="no-descent", message="", stop_reason="diverged", steps=1,
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "safeloop\[report\]"'):
        result.plot()
