"""Two CPU processes (gloo) through the launch commands users type."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "train_two_ranks.py"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _free_port() -> str:
    # explicit free ports: the launchers' default 29500 collides with any concurrent run
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _launch(cmd: list[str], out_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cmd, str(SCRIPT), str(out_dir)],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )


def _results(proc: subprocess.CompletedProcess[str]) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line[len("RESULT ") :] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return sorted((json.loads(line) for line in lines), key=lambda r: r["rank"])


def _assert_two_ranks_trained_together(proc: subprocess.CompletedProcess[str], out_dir: Path) -> None:
    results = _results(proc)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 for r in results)
    # 128 samples, batch 8, two ranks: 8 batches per rank per epoch, 2 epochs
    assert all(r["steps"] == 16 for r in results)
    assert results[0]["final"] == results[1]["final"], "ranks ended with different parameters"
    assert results[0]["final"] != results[0]["initial"], "parameters did not change"
    # the bar is drawn by rank 0 only; tqdm writes it to stderr
    assert proc.stderr.count("16/16") >= 1
    finished_bars = [line for line in proc.stderr.replace("\r", "\n").splitlines() if "16/16" in line]
    assert len({line.split("16/16")[0] for line in finished_bars}) == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["metrics-rank0.jsonl"]


def test_accelerate_launch_multi_gpu_cpu_runs_two_ranks_in_step(tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--main_process_port", _free_port()]
    proc = _launch(cmd, tmp_path, ACCELERATE_USE_CPU="1")
    _assert_two_ranks_trained_together(proc, tmp_path)


def test_plain_accelerate_launch_two_processes_starts_the_missing_rank(tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--num_processes", "2"]
    proc = _launch(cmd, tmp_path)
    _assert_two_ranks_trained_together(proc, tmp_path)
    assert "started the other 1 (CPU, gloo)" in proc.stderr


def test_plain_torchrun_two_processes_joins_them_over_gloo(tmp_path):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", _free_port()]
    proc = _launch(cmd, tmp_path)
    _assert_two_ranks_trained_together(proc, tmp_path)


def test_spawn_disabled_gives_an_error_with_the_working_command(tmp_path):
    cmd = [str(BIN / "accelerate"), "launch", "--num_processes", "2"]
    proc = _launch(cmd, tmp_path, SAFELOOP_SPAWN="0")
    assert proc.returncode != 0
    assert "ConfigError" in proc.stderr
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in proc.stderr


def test_nan_on_rank_one_only_makes_both_ranks_skip_the_same_step(tmp_path):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", _free_port()]
    proc = _launch(cmd, tmp_path, NAN_ON_RANK1_AT_STEP="6")
    results = _results(proc)
    assert [r["skipped"] for r in results] == [1, 1]
    assert [r["skip_steps"] for r in results] == [[6], [6]]
    assert results[0]["final"] == results[1]["final"], "ranks diverged after the skip"
    assert results[0]["final"] != results[0]["initial"]


def test_reinitialised_weights_are_identical_on_both_ranks(tmp_path):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", _free_port()]
    proc = _launch(cmd, tmp_path, ZERO_INIT="1")
    results = _results(proc)
    assert [r["reinit"] for r in results] == [["0.weight", "2.weight"]] * 2
    assert results[0]["final"] == results[1]["final"], "ranks hold different weights"
    assert results[0]["final"] != results[0]["initial"]


def test_findings_are_identical_on_both_ranks_and_logged_once(tmp_path):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", _free_port()]
    proc = _launch(cmd, tmp_path, DIAG="1")
    results = _results(proc)
    assert results[0]["findings"] == results[1]["findings"], "the ranks hold different findings"
    codes = {f[0]: f for f in results[0]["findings"]}
    # only rank 1's first batch holds the NaN sample: rank 0 learns of it through the agreement
    assert codes["nonfinite-input"][1] == "error" and "batch[0]" in codes["nonfinite-input"][4]
    assert results[0]["skipped"] == results[1]["skipped"] == 2  # the NaN batch, once per epoch, by both
    assert results[0]["final"] == results[1]["final"]
    # the main process logs each finding once; the other process logs none
    for code in codes:
        assert proc.stderr.count(f"safeloop [{code}]") == sum(f[0] == code for f in results[0]["findings"])


def test_a_layer_unused_under_ddp_stops_both_ranks_at_the_first_step_with_the_fix(tmp_path):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", _free_port()]
    proc = _launch(cmd, tmp_path, UNUSED="1")
    assert proc.returncode != 0
    assert proc.stderr.count("ConfigError: Under DistributedDataParallel") == 2  # both ranks, same error
    assert "`aux`" in proc.stderr and "find_unused_parameters=True" in proc.stderr
    assert "Expected to have finished reduction" not in proc.stderr  # DDP's own error never came
