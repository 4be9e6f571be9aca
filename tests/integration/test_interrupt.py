"""Ctrl-C (SIGINT): the step finishes, a checkpoint is written, then KeyboardInterrupt; how a run ended."""

from __future__ import annotations

import os
import random
import signal
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from safeloop import Callback, SafeTrainer
from safeloop.checkpoint.store import latest_valid
from tests.helpers.models import classification_data, loader, mlp
from tests.integration.test_sigkill import _start, _wait_for_saves

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _model_tensors(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


@pytest.mark.slow
def test_ctrl_c_at_a_random_step_saves_raises_keyboard_interrupt_and_resumes_bit_exactly(tmp_path):
    rng = random.Random(7)
    proc = _start(tmp_path / "run", steps=10_000)
    period = _wait_for_saves(proc, 3)
    time.sleep(rng.uniform(0.0, period))  # anywhere in a step, a save included
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, "an uncaught KeyboardInterrupt ends Python by SIGINT"
    end = next(line for line in out.splitlines() if line.startswith("END"))
    _, status, step = end.split()
    assert status == "interrupted"
    latest, warnings = latest_valid(tmp_path / "run")
    assert warnings == [] and latest is not None and latest.name == f"step-{int(step):08d}"

    steps = int(step) + 2
    resumed = _start(tmp_path / "run", steps=steps)
    straight = _start(tmp_path / "straight", steps=steps)
    for other in (resumed, straight):
        other.communicate(timeout=180)
        assert other.returncode == 0
    a, b = (_model_tensors(latest_valid(tmp_path / name)[0]) for name in ("run", "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _SignalAt(Callback):
    """Sends itself SIGINT while the given step is taken, ``times`` times in a row."""

    def __init__(self, step: int, times: int = 1) -> None:
        self.step, self.times = step, times
        self.result = None

    def on_before_optimizer_step(self, trainer, optimizer):
        if trainer.global_step == self.step - 1 and self.times:
            for _ in range(self.times):
                self.times -= 1
                os.kill(os.getpid(), signal.SIGINT)

    def on_fit_end(self, trainer, result):
        self.result = result


def _trainer(tmp_path, callback: Callback, **kwargs) -> SafeTrainer:
    model = mlp(seed=0)
    return SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader(classification_data(n=64), batch_size=8),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=10,
        checkpoint_dir=str(tmp_path),
        callbacks=[callback],
        progress_bar=False,
        **kwargs,
    )


def test_one_ctrl_c_ends_the_step_saves_and_reports_interrupted(tmp_path, capsys):
    probe = _SignalAt(step=3)
    trainer = _trainer(tmp_path, probe)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    result = probe.result
    assert result is not None and result.status == "interrupted" and result.global_step == 3
    assert [e.kind for e in result.events].count("interrupt") == 1
    assert latest_valid(tmp_path)[0].name == "step-00000003"
    assert result.report().startswith("safeloop: interrupted, 3 steps")
    captured = capsys.readouterr()
    assert "Ctrl-C: finishing this step and saving a checkpoint" in captured.err
    assert "safeloop: interrupted (Ctrl-C) at step 3" in captured.out
    assert 'to go on: the same script with `fit(resume_from="latest")`' in captured.out
    # the handlers are the caller's again: Python's own
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path):
    probe = _SignalAt(step=3, times=2)
    trainer = _trainer(tmp_path, probe, checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert probe.result is None  # stopped inside step 3: no end of fit
    assert latest_valid(tmp_path)[0].name == "step-00000000"  # only the state before the first step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_run_that_reaches_its_end_is_completed_and_says_so_on_stdout(tmp_path, capsys):
    trainer = _trainer(tmp_path, Callback())
    result = trainer.fit()
    assert result.status == "completed" and result.report().startswith("safeloop: completed, 10 steps")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("safeloop: finished at step 10 (10 steps in ")
    first, last = result.history[0], result.history[-1]
    assert lines[1].startswith(
        f"  train loss {first['loss']:.4g} (step {first['step']}) -> {last['loss']:.4g} (step {last['step']})"
    )
    assert f"a constant prediction scores {result.baseline_loss:.4g}" in lines[1]
    assert lines[2].startswith("  0 skipped steps, 0 rollbacks;")
    assert f"checkpoints in {tmp_path} (latest step-00000010)" in out
    quiet = _trainer(tmp_path / "quiet", Callback(), summary=False).fit()
    assert quiet.status == "completed" and "safeloop: finished" not in capsys.readouterr().out
