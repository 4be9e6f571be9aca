"""SIGTERM / SIGUSR1: checkpoint at the next step boundary, return cleanly, resume from there."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch
from torch import nn

from safeloop import Callback, SafeTrainer
from safeloop.checkpoint.store import latest_valid
from tests.integration.test_sigkill import _start, _wait_for_saves

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_preemption_signal_saves_and_exits_cleanly_then_resume_goes_on(tmp_path, signum):
    proc = _start(tmp_path, steps=10_000)
    _wait_for_saves(proc, 3)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "fit must return normally after a preemption signal"
    done = next(line for line in out.splitlines() if line.startswith("DONE"))
    _, step, name, path = done.split()
    assert name == signal.Signals(signum).name
    latest, _ = latest_valid(tmp_path)
    assert latest is not None and str(latest) == path and latest.name == f"step-{int(step):08d}"

    again = _start(tmp_path, steps=int(step) + 1)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0
    assert f"SAVED {int(step) + 1}" in out and f"DONE {int(step) + 1} None None" in out


def test_fit_after_a_preempted_fit_goes_on_to_max_steps(tmp_path):
    from tests.helpers.models import classification_data, loader, mlp

    class SignalAtStep(Callback):
        def on_before_optimizer_step(self, trainer, optimizer):
            if trainer.global_step == 2 and not sent:  # step 3 is being taken
                sent.append(True)
                os.kill(os.getpid(), signal.SIGUSR1)

    sent: list[bool] = []
    model = mlp(seed=0)
    trainer = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader(classification_data(n=64), batch_size=8),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=10,
        checkpoint_dir=str(tmp_path),
        callbacks=[SignalAtStep()],
        progress_bar=False,
    )
    first = trainer.fit()
    assert first.global_step == 3 and [e.kind for e in first.events].count("preempt") == 1
    assert first.status == "preempted" and first.report().startswith("safeloop: preempted, 3 steps")
    second = trainer.fit()  # the same trainer, in the same process: it continues
    assert second.global_step == 10 and second.status == "completed"


def test_a_preemption_between_log_steps_logs_the_partial_interval_before_its_checkpoint(tmp_path):
    from tests.conftest import _reset_accelerate
    from tests.helpers.models import classification_data, loader, mlp

    class SignalAtStep(Callback):
        def on_before_optimizer_step(self, trainer, optimizer):
            if trainer.global_step == 2 and not sent:  # step 3, not a log step, is being taken
                sent.append(True)
                os.kill(os.getpid(), signal.SIGUSR1)

    def trainer_for(callbacks):
        model = mlp(seed=0)
        return SafeTrainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader(classification_data(n=64), batch_size=8),
            loss_fn=nn.CrossEntropyLoss(),
            max_steps=6,
            log_every=2,
            checkpoint_dir=str(tmp_path),
            callbacks=callbacks,
            progress_bar=False,
        )

    sent: list[bool] = []
    first = trainer_for([SignalAtStep()]).fit()
    assert first.global_step == 3 and [h["step"] for h in first.history] == [2, 3]
    _reset_accelerate()
    resumed = trainer_for([]).fit(resume_from="latest")
    # the checkpoint of step 3 holds the entry of step 3: the resumed history lacks nothing
    assert [h["step"] for h in resumed.history] == [2, 3, 4, 6]
    assert resumed.history[1] == first.history[1]
