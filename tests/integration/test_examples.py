"""The examples run as written and print what they promise."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_example(name: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=cwd,
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


@pytest.mark.slow
def test_find_lr_example_suggests_a_rate_and_trains_with_it(tmp_path):
    proc = _run_example("find_lr.py", cwd=tmp_path)  # the plot goes to the working directory
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"find_lr: suggested learning rate (\S+) \(minimum", proc.stdout)
    assert found is not None, proc.stdout[-2000:]
    lr = float(found.group(1))
    assert 1e-4 < lr < 0.1  # the optimizer was built at 1e-6: the suggestion replaced it
    assert f"learning rate: {lr:.3g}" in proc.stdout
    assert float(re.search(r"eval loss: (\S+)", proc.stdout).group(1)) < 1.0


@pytest.mark.slow
def test_lightning_quickstart_skips_the_nan_steps_names_the_unused_head_and_trains():
    pytest.importorskip("lightning")
    proc = _run_example("lightning_quickstart.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(
        line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line and not line.startswith(" ")
    )
    assert lines["steps"] == "189 (skipped 3)"  # 63 batches an epoch, the NaN in one of each
    assert lines["events"].count("('skip', ") == 3
    assert lines["findings"] == "['nonfinite-loss', 'unused-params']"
    start, end = (float(part.split()[0]) for part in lines["train loss"].split(" -> "))
    assert end < 0.8 * start
