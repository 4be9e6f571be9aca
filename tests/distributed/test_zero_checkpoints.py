"""DeepSpeed ZeRO-2 and ZeRO-3 checkpoints on two CPU processes (gloo): resume, rollback, resharding.

Every process gathers whole tensors (fp32 weights, Adam moments) through DeepSpeed's public
``safe_get_full_*`` functions and writes its share to its own ``shards/whole-0000R-of-00002``
safetensors file; the manifest lists and hashes every process's files. Skipped without DeepSpeed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from safeloop.checkpoint.manifest import verify_checkpoint
from safeloop.cli import main
from tests.distributed.scripts.train_sharded_checkpoints import whole
from tests.distributed.test_fsdp import _run
from tests.distributed.test_sharded_checkpoints import SCRIPT, _alone

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed", reason="the DeepSpeed checkpoint tests need deepspeed (the `test` extra)")
SPIKE = {
    "MAX_STEPS": "24",
    "SPIKE_ON_RANK1_AT_STEP": "10",
    "POISON": "1",
    "SPIKE_WARMUP": "4",
    "LOG_EVERY": "1",
}


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def stopped(request, tmp_path_factory) -> tuple[str, list[dict], Path]:
    """A run stopped at step 7 (mid second epoch): its mode, its results, the checkpoint folder.

    ZeRO-3 saves asynchronously (each process writes its share in the background), ZeRO-2 at
    the step boundary: the resume test below holds both to the same straight run."""
    mode = request.param
    base = tmp_path_factory.mktemp(mode)
    saving = {"ASYNC": "1"} if mode == "zero3" else {}
    first = _run(base / "first", SCRIPT, MODE=mode, MAX_STEPS="7", CKPT_DIR=str(base / "ckpt"), **saving)
    return mode, first, base / "ckpt" / "step-00000007"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[dict]:
    """The run that goes straight to step 12 under ZeRO-2: the reference of ZeRO-3 too, whose
    whole weights and optimizer state are bitwise the same (measured at stages 0-3)."""
    return _run(tmp_path_factory.mktemp("straight") / "run", SCRIPT, MODE="zero2", MAX_STEPS="12")


def _whole_state(result: dict) -> dict:
    """The optimizer part without ``local`` (each process's module copy, which ZeRO-3 does not keep)."""
    return {key: value for key, value in result["optimizer"].items() if key != "local"}


def test_zero_stopped_mid_epoch_and_resumed_equals_the_straight_run(stopped, straight, tmp_path):
    mode, first, folder = stopped
    assert [r["steps"] for r in first] == [7, 7]
    assert [e[1] for e in first[0]["events"] if e[0] == "checkpoint"] == [0, 3, 6, 7]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["meta"]["engine"] == "deepspeed" and manifest["meta"]["world_size"] == 2
    shards = sorted(name for name in manifest["files"] if name.startswith("shards/"))
    assert shards == [f"shards/whole-0000{r}-of-00002.safetensors" for r in (0, 1)]
    assert "model.safetensors" not in manifest["files"] and verify_checkpoint(folder).ok
    # each process wrote its share: together every weight and moment once, none twice
    keys = [set(load_file(folder / name)) for name in shards]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == 6 * 3  # 6 parameters: weight, exp_avg, exp_avg_sq
    resumed = _run(
        tmp_path / "resumed", SCRIPT, MODE=mode, MAX_STEPS="12", CKPT_DIR=str(folder.parent), RESUME="1"
    )
    assert [e[:2] for e in resumed[0]["events"] if e[0] == "resume"] == [["resume", 7]]
    for rank in (0, 1):
        assert resumed[rank]["steps"] == 12
        assert resumed[rank]["params"] == straight[rank]["params"], "weights differ from the straight run"
        assert _whole_state(resumed[rank]) == _whole_state(straight[rank]), "optimizer state differs"
        assert resumed[rank]["lr"] == straight[rank]["lr"]
    assert straight[0]["optimizer"]["steps"] == {"0": 12.0}  # Adam's step, restored with the moments
    if mode == "zero2":  # the weights each process computes with are the restored master weights
        assert resumed[0]["optimizer"]["local"] == resumed[1]["optimizer"]["local"] == resumed[0]["params"]
    assert {k: v for k, v in resumed[0]["losses"].items() if k not in ("7", "9")} == {
        k: v for k, v in straight[0]["losses"].items() if k != "9"
    }
    assert straight[0]["params"] != first[0]["params"]


def test_zero_checkpoints_consolidate_reshard_to_one_process_and_hold_no_pickle(stopped, tmp_path):
    mode, first, folder = stopped
    assert main(["consolidate", str(folder), str(tmp_path / "whole")]) == 0
    consolidated = load_file(tmp_path / "whole" / "model.safetensors")
    assert {name: whole(tensor) for name, tensor in consolidated.items()} == first[0]["params"]
    for path in folder.rglob("*"):
        if path.is_file():
            assert path.suffix in (".json", ".safetensors"), path
            assert not path.read_bytes().startswith(b"\x80"), path
    if mode != "zero3":
        return
    # whole tensors: one process at another stage reads them bit for bit
    [one] = _run(tmp_path / "one", SCRIPT, processes=1, MODE="zero2", MAX_STEPS="7", RESUME_FROM=str(folder))
    assert one["steps"] == 7
    assert one["params"] == first[0]["params"] and one["optimizer"] == {
        **first[0]["optimizer"],
        "local": one["params"],
    }
    # AdamW state is refused by an SGD run (it would fail at its first step, on a missing moment)
    with pytest.raises(AssertionError, match=r"holds AdamW optimizer state; this run's optimizer is SGD"):
        _run(tmp_path / "sgd", SCRIPT, processes=1, MODE="zero2", OPTIMIZER="sgd", RESUME_FROM=str(folder))
    # a DeepSpeed checkpoint is refused outside DeepSpeed, naming both sides and the way out
    with pytest.raises(
        AssertionError,
        match=r"written under DeepSpeed .* by 2 processes; this run is not under DeepSpeed on 1.*consolidate",
    ):
        _alone(tmp_path / "plain", MODE="ddp", MAX_STEPS="7", RESUME_FROM=str(folder))


@pytest.fixture(scope="module")
def divergent(tmp_path_factory) -> list[dict]:
    """The spike of the rollback tests, kept (rollback off, no checkpoints): the same under ZeRO-2 and 3."""
    return _run(tmp_path_factory.mktemp("divergent") / "run", SCRIPT, MODE="zero2", ROLLBACK="0", **SPIKE)


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_zero_a_spike_on_rank_one_rolls_both_ranks_back_to_the_same_checkpoint(tmp_path, divergent, mode):
    results = _run(tmp_path / "run", SCRIPT, MODE=mode, CKPT_DIR=str(tmp_path / "ckpt"), **SPIKE)
    for r in results:
        assert r["rollbacks"] == 1 and r["steps"] == 24
        assert [e[1] for e in r["events"] if e[0] == "rollback"] == [9]
    assert results[0]["params"] == results[1]["params"] and results[0]["lr"] == results[1]["lr"]
    if mode == "zero2":  # each process's own module copy: the same weights on both after the rollback
        assert results[0]["optimizer"]["local"] == results[1]["optimizer"]["local"] == results[0]["params"]
    assert divergent[0]["rollbacks"] == 0
    assert list(results[0]["losses"].items())[:9] == list(divergent[0]["losses"].items())[:9]
    assert results[0]["lr"] == divergent[0]["lr"] * 0.5
    ours, theirs = (sum(list(r[0]["losses"].values())[-4:]) / 4 for r in (results, divergent))
    print(f"{mode}: mean loss of steps 21-24, rolled back {ours:.4f}, divergent {theirs:.4f}")
    assert ours < theirs and all(math.isfinite(v) for v in results[0]["losses"].values())
