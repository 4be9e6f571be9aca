"""SIGTERM / SIGUSR1: checkpoint at the next step boundary, return cleanly, resume from there."""

from __future__ import annotations

import signal
import sys

import pytest

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
