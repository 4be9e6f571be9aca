"""The examples run as written and print what they promise."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_example(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_quickstart_example_trains_and_prints_a_summary():
    proc = _run_example("quickstart.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(
        line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line and not line.startswith(" ")
    )
    assert lines["processes"] == "1"
    assert lines["steps"].startswith("300 (skipped 0, rollbacks 0)")
    start, end = (float(part.split()[0]) for part in lines["train loss"].split(" -> "))
    assert end < start
    assert float(lines["eval loss"]) < 1.0


@pytest.mark.slow
def test_divergence_example_blows_up_by_hand_and_recovers_with_one_rollback():
    proc = _run_example("divergence.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    hand, safe = out.split("2. SafeTrainer")
    assert "after 80 steps it is nan" in hand and "4 of 4 parameter tensors hold NaN or inf" in hand
    assert "! loss spike from step 21" in safe
    assert "rolled back to step 0 (the state before the first step)" in safe
    assert "! learning rate 0.3 -> 0.15" in safe
    assert "rollbacks: 1, skipped steps: 0" in safe
    final = float(re.search(r"final loss: (\S+)", safe).group(1))
    assert math.isfinite(final) and final < 0.5  # 0.18 measured; 12 at the first step
    assert "rolled back to step 0" in proc.stderr, "the rollback warning was not logged"
