"""The README's main job runs as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_example_trains_and_prints_a_summary():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(
        line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line and not line.startswith(" ")
    )
    assert lines["processes"] == "1"
    assert lines["steps"].startswith("300 (skipped 0, rollbacks 0)")
    start, end = (float(part.split()[0]) for part in lines["train loss"].split(" -> "))
    assert end < start
    assert float(lines["eval loss"]) < 1.0
