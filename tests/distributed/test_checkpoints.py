"""Checkpoints with two CPU processes (gloo): save, stop, resume, equal to the straight run."""

from __future__ import annotations

import json

import pytest

from safeloop.checkpoint.manifest import verify_checkpoint
from tests.distributed.test_launch import BIN, _free_port, _launch, _results

pytestmark = pytest.mark.slow


def _torchrun() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", _free_port()]


@pytest.mark.parametrize("async_save", ["0", "1"])
def test_two_processes_save_resume_mid_epoch_and_end_equal_to_the_straight_run(tmp_path, async_save):
    straight = _results(_launch(_torchrun(), tmp_path / "a", DROPOUT="1"))
    ckpt = tmp_path / "ckpt"
    first = _results(
        _launch(
            _torchrun(), tmp_path / "b", DROPOUT="1", CKPT_DIR=str(ckpt), MAX_STEPS="11", ASYNC=async_save
        )
    )
    assert [r["steps"] for r in first] == [11, 11]
    assert first[0]["checkpoints"] == [0, 3, 6, 9, 11]  # 8 steps per epoch: 11 is mid second epoch
    if async_save == "0":
        assert first[1]["checkpoints"] == [0, 3, 6, 9, 11]  # every rank waits for a complete checkpoint
    manifest = json.loads((ckpt / "step-00000011" / "manifest.json").read_text())
    assert {"rank-00000.safetensors", "rank-00001.safetensors"} <= set(manifest["files"])
    assert manifest["meta"]["world_size"] == 2 and verify_checkpoint(ckpt / "step-00000011").ok
    resumed = _results(_launch(_torchrun(), tmp_path / "c", DROPOUT="1", CKPT_DIR=str(ckpt), RESUME="1"))
    assert [r["resumed"] for r in resumed] == [[11], [11]]
    assert [r["steps"] for r in resumed] == [16, 16]
    assert resumed[0]["final"] == resumed[1]["final"], "ranks hold different parameters after resuming"
    assert resumed[0]["final"] == straight[0]["final"], "the resumed run differs from the straight one"
    assert straight[0]["final"] != straight[0]["initial"]
    # the run's record: written by the main process only (each log step once), continued by the resume
    lines = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert all(line["v"] == 1 for line in lines)
    assert [line["type"] for line in lines].count("fit") == 2  # the first fit, then the resumed one
    logged = [line["step"] for line in lines if line["type"] == "log"]
    assert logged == sorted(set(logged)) and logged[-1] == 16, logged


def test_a_spike_on_rank_one_only_rolls_both_ranks_back_to_the_same_step(tmp_path):
    ckpt = tmp_path / "ckpt"
    results = _results(
        _launch(_torchrun(), tmp_path / "run", EPOCHS="5", SPIKE_ON_RANK1_AT_STEP="25", CKPT_DIR=str(ckpt))
    )
    assert results[0]["rollbacks"] == results[1]["rollbacks"] == [[24, 28]]  # read at log step 28
    assert results[0]["lr"] == results[1]["lr"] == 0.5e-2
    assert results[0]["final"] == results[1]["final"], "ranks hold different parameters after the rollback"
