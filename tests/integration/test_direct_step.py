"""The optimizer stepped and zeroed directly where Accelerate's wrapper would only forward the call.

``AcceleratedOptimizer.step`` looks ``lomo_optim`` up with ``importlib.util.find_spec`` twice per
step and ``zero_grad`` builds ``inspect.signature`` every step; ``GatedStep`` calls the user's
optimizer itself where the wrapper adds nothing else (``stepping.forwards_only``). The updates
stay bitwise those of the hand-written Accelerate loop (``test_parity.py``); here: the wrapper's
per-step work is gone, and the cases where the wrapper does more keep it.
"""

from __future__ import annotations

import sys
import types

import accelerate.optimizer
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from safeloop import SafeTrainer
from safeloop.stepping import GatedStep, forwards_only
from tests.helpers.models import classification_data, loader, mlp


def _trainer(optimizer_factory, steps: int = 6) -> SafeTrainer:
    model = mlp(seed=0)
    return SafeTrainer(
        model,
        optimizer_factory(model.parameters()),
        loader(classification_data(n=64), batch_size=8),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=steps,
        rollback=False,
        progress_bar=False,
        summary=False,
    )


def test_the_trainer_skips_accelerates_per_step_package_lookup_and_signature(monkeypatch):
    lookups: list[int] = []
    real = accelerate.optimizer.is_lomo_available
    monkeypatch.setattr(accelerate.optimizer, "is_lomo_available", lambda: lookups.append(1) or real())
    trainer = _trainer(lambda params: torch.optim.AdamW(params, lr=1e-2))
    stepped = []
    inner = trainer.optimizer.optimizer
    original_step = inner.step
    inner.step = lambda *a, **k: stepped.append(1) or original_step(*a, **k)  # type: ignore[method-assign]
    result = trainer.fit()
    assert result.global_step == 6 and len(stepped) == 6  # the user's optimizer stepped each time
    assert lookups == []  # the wrapper's step, and its find_spec("lomo_optim"), never ran
    assert all(p.grad is None for p in trainer.model.parameters())  # zeroed (set_to_none) after the last


def test_the_direct_step_is_bitwise_the_wrappers_step():
    def train(direct: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = mlp(seed=0)
        accelerator = Accelerator(cpu=True)
        optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        gate = GatedStep(optimizer, None)
        if not direct:
            gate._stepped = optimizer  # the wrapper's path
        x, y = classification_data(n=32).tensors
        for _ in range(4):
            nn.functional.cross_entropy(model(x), y).backward()
            gate.step(torch.ones(()))
            gate.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(True), train(False), strict=True))


def test_the_wrapper_is_kept_where_it_does_more_than_forward():
    Accelerator(cpu=True)  # the wrapper reads Accelerate's state
    params = [nn.Parameter(torch.zeros(3))]
    inner = torch.optim.SGD(params, lr=0.1)
    plain = AcceleratedOptimizer(inner, device_placement=False)
    assert forwards_only(plain, inner)

    class Custom(AcceleratedOptimizer):  # a subclass may add to step: its step is called
        pass

    assert not forwards_only(Custom(inner, device_placement=False), inner)
    scaled = AcceleratedOptimizer(inner, device_placement=False, scaler=torch.amp.GradScaler("cpu"))
    assert not forwards_only(scaled, inner)  # fp16: the scaler's step, unscale and update


def test_a_lomo_optimizer_keeps_the_wrapper_which_makes_its_step_a_no_op(monkeypatch):
    # LOMO updates inside backward; Accelerate's wrapper turns `step` into a no-op for it
    lomo = types.ModuleType("lomo_optim")

    class Lomo(torch.optim.SGD):
        pass

    lomo.Lomo, lomo.AdaLomo = Lomo, type("AdaLomo", (torch.optim.SGD,), {})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lomo_optim", lomo)
    Accelerator(cpu=True)
    params = [nn.Parameter(torch.zeros(3))]
    inner = Lomo(params, lr=0.1)
    assert not forwards_only(AcceleratedOptimizer(inner, device_placement=False), inner)
    other = torch.optim.SGD(params, lr=0.1)
    assert forwards_only(AcceleratedOptimizer(other, device_placement=False), other)
