"""SIGKILL of both processes at random moments during sharded saves: a complete checkpoint remains."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from safeloop.checkpoint.consolidate import consolidate
from safeloop.checkpoint.state import read_state
from safeloop.checkpoint.store import latest_valid, list_checkpoints
from tests.distributed.test_fsdp import TORCHRUN, _free_port, _run

SCRIPT = Path(__file__).parent / "scripts" / "train_sharded_checkpoints.py"
TRIALS = 10
pytestmark = pytest.mark.slow


def _start(out_dir: Path, checkpoint_dir: Path, mode: str, **extra: str) -> subprocess.Popen[str]:
    """Two FSDP or DeepSpeed processes saving after every step (about 400k parameters), own session."""
    out_dir.mkdir(parents=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE"))}
    env = {
        **clean, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MAX_STEPS": "100000", "WIDTH": "512",
        "CKPT_EVERY": "1", "KEEP": "2", "CKPT_DIR": str(checkpoint_dir), "SAY_SAVES": "1", "MODE": mode,
        **extra,
    }  # fmt: skip
    return subprocess.Popen(
        [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", _free_port(), str(SCRIPT), str(out_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # the launcher's own group: nothing of it outlives the test
    )


def _wait_for_saves(proc: subprocess.Popen[str], count: int) -> tuple[float, list[int]]:
    """Read until ``count`` SAVED lines were seen: the mean time between saves, the processes' PIDs."""
    stamps, pids = [], []
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("PID "):
            pids.append(int(line.split()[1]))
        if line.startswith("SAVED"):
            stamps.append(time.perf_counter())
            if len(stamps) == count:
                break
    assert len(stamps) == count and len(pids) == 2, "the run ended before its saves"
    return (stamps[-1] - stamps[0]) / (count - 1), pids


def _wait_for_a_write(checkpoint_dir: Path) -> None:
    """Return as soon as a checkpoint's hidden temporary folder exists."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(p.name.startswith(".step-") for p in checkpoint_dir.iterdir()):
            return
        time.sleep(0.001)
    raise AssertionError(f"no checkpoint write began in {checkpoint_dir} within 30 s")


def _kill(proc: subprocess.Popen[str], pids: list[int]) -> None:
    """SIGKILL both training processes and their launcher (torchrun starts each in its own session)."""
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    for pid in pids:  # gone, not still writing or rotating checkpoints while they are checked
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"process {pid} survived SIGKILL for 30 s")


def test_sigkill_during_fsdp_saves_always_leaves_a_complete_checkpoint_to_resume(tmp_path):
    # FSDP2 and FSDP1 differ in how their state dict is taken, before anything is written; the
    # writes (DCP's safetensors writer, the manifest last) are the same: 10 trials in all
    _kill_trials(tmp_path, ["fsdp2", "fsdp1"] * (TRIALS // 2))


def test_sigkill_during_deepspeed_saves_always_leaves_a_complete_checkpoint_to_resume(tmp_path):
    # ZeRO-2 and ZeRO-3 differ in how the whole tensors are gathered, before anything is written;
    # the writes (one safetensors file per process, the manifest last) are the same: 10 trials in all
    pytest.importorskip("deepspeed", reason="needs deepspeed (the `test` extra)")
    _kill_trials(tmp_path, ["zero2", "zero3"] * (TRIALS // 2))


def test_sigkill_during_asynchronous_fsdp_saves_always_leaves_a_complete_checkpoint_to_resume(tmp_path):
    # every process writes its shards in a background thread while the next steps run, and the
    # main process the manifest once all are durable: a save is nearly always in flight (4 trials)
    _kill_trials(tmp_path, ["fsdp2"] * 4, ASYNC="1")


def _kill_trials(tmp_path: Path, modes: list[str], **extra: str) -> None:
    """SIGKILL one 2-process run per entry of ``modes`` (``extra``: more of its environment), then
    resume the last one's leftovers."""
    rng = random.Random(2026)
    mid_write = 0
    for trial, mode in enumerate(modes):
        checkpoint_dir = tmp_path / f"trial{trial}" / "ckpt"
        proc = _start(tmp_path / f"trial{trial}" / "out", checkpoint_dir, mode, **extra)
        period, pids = _wait_for_saves(proc, 3)
        if trial % 2:  # a random moment of a write: once the next one has begun (its hidden folder)
            _wait_for_a_write(checkpoint_dir)
            time.sleep(rng.uniform(0.0, 0.05 * period))
        else:  # a random moment of the save period: between saves or in one
            time.sleep(rng.uniform(0.0, period))
        _kill(proc, pids)
        path, warnings = latest_valid(checkpoint_dir)
        assert path is not None, f"trial {trial}: no valid checkpoint after 3 complete saves"
        assert warnings == [], f"trial {trial}: a complete-looking checkpoint failed to verify: {warnings}"
        state = read_state(path)  # every shard checked to be plain safetensors
        assert state.trainer["global_step"] == int(path.name.split("-")[1])
        # every shard present and whole: the pieces tile every weight (consolidation checks it)
        consolidate(path, tmp_path / f"trial{trial}" / "whole")
        leftovers = {p.name for p in checkpoint_dir.iterdir()} - {
            p.name for _, p in list_checkpoints(checkpoint_dir)
        }
        assert all(
            name.startswith(".step-") or name in ("findings.json", "metrics.jsonl") for name in leftovers
        ), leftovers
        mid_write += any(name.startswith(".step-") for name in leftovers)
    print(f"{sorted(set(modes))} {extra}: {mid_write} of {len(modes)} kills hit a write")
    aimed = len(modes) // 2  # a margin for a write that ends between the aim and the kill
    assert mid_write >= aimed - 1, (
        f"only {mid_write} of {len(modes)} kills hit a write ({aimed} aimed at one)"
    )

    # one real resume from the last trial's leftovers, on 2 processes
    step = int(path.name.split("-")[1])
    resumed = _run(
        tmp_path / "resumed", SCRIPT, MAX_STEPS=str(step + 2), WIDTH="512", CKPT_EVERY="1", KEEP="2",
        CKPT_DIR=str(checkpoint_dir), RESUME="1", MODE=mode, **extra,
    )  # fmt: skip
    assert [e[:2] for e in resumed[0]["events"] if e[0] == "resume"] == [["resume", step]]
    assert [r["steps"] for r in resumed] == [step + 2, step + 2]
