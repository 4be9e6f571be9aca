"""Sharded checkpoints under FSDP2 and FSDP1 on two CPU processes (gloo): resume, rollback, resharding.

Each rank writes its own model and optimizer shards through ``torch.distributed.checkpoint``
(safetensors, one file per rank in ``shards/``); the manifest lists and hashes every rank's files.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from safeloop.checkpoint.manifest import verify_checkpoint
from safeloop.cli import main
from tests.distributed.scripts.train_sharded_checkpoints import whole
from tests.distributed.test_fsdp import _run

SCRIPT = Path(__file__).parent / "scripts" / "train_sharded_checkpoints.py"
pytestmark = pytest.mark.slow


def _alone(out_dir: Path, **env: str) -> dict:
    """The script as one plain process (no torchrun, no process group)."""
    out_dir.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE"))}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir)],
        env={**clean, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module", params=["fsdp2", "fsdp1"])
def stopped(request, tmp_path_factory) -> tuple[str, list[dict], Path]:
    """A run stopped at step 7 (mid second epoch): its mode, its results, the checkpoint folder."""
    mode = request.param
    base = tmp_path_factory.mktemp(mode)
    first = _run(base / "first", SCRIPT, MODE=mode, MAX_STEPS="7", CKPT_DIR=str(base / "ckpt"))
    shutil.copytree(base / "ckpt", _as_written(base / "ckpt"))  # the resume test adds to the folder
    return mode, first, base / "ckpt" / "step-00000007"


def _as_written(ckpt: Path) -> Path:
    """A copy of the checkpoint folder ``ckpt`` as the run stopped at step 7 left it."""
    return ckpt.with_name("ckpt-as-written")


@pytest.fixture(scope="module")
def straight(stopped, tmp_path_factory) -> list[dict]:
    """The run that goes straight to step 12, in the mode of ``stopped``."""
    mode = stopped[0]
    return _run(tmp_path_factory.mktemp(f"{mode}-straight") / "run", SCRIPT, MODE=mode, MAX_STEPS="12")


def test_fsdp_stopped_mid_epoch_and_resumed_equals_the_straight_run(stopped, straight, tmp_path):
    mode, first, folder = stopped
    ckpt = folder.parent
    assert [r["steps"] for r in first] == [7, 7]  # 4 steps per epoch: 7 is mid second epoch
    assert [e[1] for e in first[0]["events"] if e[0] == "checkpoint"] == [0, 3, 6, 7]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["meta"]["engine"] == mode and manifest["meta"]["world_size"] == 2
    shards = sorted(name for name in manifest["files"] if name.startswith("shards/"))
    assert shards == [f"shards/shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
    assert "model.safetensors" not in manifest["files"]  # the model is in the shards
    assert verify_checkpoint(folder).ok
    # consolidated: the whole weights, bitwise what the 2 processes hold at step 7
    assert main(["consolidate", str(folder), str(tmp_path / "whole")]) == 0
    consolidated = load_file(tmp_path / "whole" / "model.safetensors")
    assert {name: whole(tensor) for name, tensor in consolidated.items()} == first[0]["params"]
    # no pickle anywhere on disk: every file is JSON or safetensors, and none holds a pickle opcode stream
    for path in folder.rglob("*"):
        if path.is_file():
            assert path.suffix in (".json", ".safetensors"), path
            assert not path.read_bytes().startswith(b"\x80"), path
    # resharding: one plain process reads the 2-process shards (the weights and moments, whole)
    alone = _alone(tmp_path / "alone", MODE="ddp", MAX_STEPS="7", RESUME_FROM=str(folder))
    assert alone["steps"] == 7 and alone["params"] == first[0]["params"]
    assert alone["optimizer"] == first[0]["optimizer"]
    resumed = _run(tmp_path / "resumed", SCRIPT, MODE=mode, MAX_STEPS="12", CKPT_DIR=str(ckpt), RESUME="1")
    assert [r["steps"] for r in resumed] == [12, 12]
    assert [e[:2] for e in resumed[0]["events"] if e[0] == "resume"] == [["resume", 7]]
    for rank in (0, 1):
        assert resumed[rank]["params"] == straight[rank]["params"], "weights differ from the straight run"
        assert resumed[rank]["optimizer"] == straight[rank]["optimizer"], "optimizer state differs"
        assert resumed[rank]["lr"] == straight[rank]["lr"]
    # the first run logged its partial interval at step 7: the entries of the other log steps agree
    assert {k: v for k, v in resumed[0]["losses"].items() if k not in ("7", "9")} == {
        k: v for k, v in straight[0]["losses"].items() if k != "9"
    }
    assert list(straight[0]["losses"]) == ["3", "6", "9", "12"]
    assert straight[0]["params"] != first[0]["params"]  # training moved the weights on


def _content(folder: Path) -> dict:
    """What a checkpoint holds, byte for byte where it matters: every safetensors file's header (as
    JSON: safetensors writes the metadata's keys in an order of its own each time) and tensor
    bytes, the JSON state's parts (the run's counters name the folder), the manifest's meta."""
    held = {}
    for name in json.loads((folder / "manifest.json").read_text())["files"]:
        data = (folder / name).read_bytes()
        if name.endswith(".safetensors"):
            length = int.from_bytes(data[:8], "little")
            held[name] = (json.loads(data[8 : 8 + length]), data[8 + length :])
        else:
            held[name] = json.loads(data)["parts"]
    return {"files": held, "meta": json.loads((folder / "manifest.json").read_text())["meta"]}


def test_an_asynchronous_save_writes_the_shards_behind_the_step_boundary(stopped, straight, tmp_path):
    mode, first, folder = stopped
    ckpt = tmp_path / "ckpt"
    # every shard file's write waits 0.2 s in the background: the next steps run meanwhile
    slow = _run(
        tmp_path / "async", SCRIPT, MODE=mode, MAX_STEPS="7", CKPT_DIR=str(ckpt), ASYNC="1", SLOW_SHARDS="0.2"
    )
    for rank in (0, 1):  # no process's shard file was on disk when its save returned
        assert [save[:2] for save in slow[rank]["saves"]] == [[0, False], [3, False], [6, False], [7, False]]
        assert (
            slow[rank]["params"] == first[rank]["params"]
            and slow[rank]["optimizer"] == first[rank]["optimizer"]
        )
    assert [e[1] for e in slow[0]["events"] if e[0] == "checkpoint"] == [0, 3, 6, 7]  # once durable
    # the checkpoints the synchronous run wrote, rotated the same way, holding the same bytes: the
    # copies taken at the step boundary did not change while later steps ran
    synchronous = _as_written(folder.parent)
    assert sorted(p.name for p in ckpt.glob("step-*")) == sorted(p.name for p in synchronous.glob("step-*"))
    for step in (3, 6, 7):
        name = f"step-{step:08d}"
        assert verify_checkpoint(ckpt / name).ok
        assert _content(ckpt / name) == _content(synchronous / name), (
            f"{name} differs from the synchronous save's"
        )
    if mode != "fsdp2":
        return
    resumed = _run(
        tmp_path / "resumed", SCRIPT, MODE=mode, MAX_STEPS="12", CKPT_DIR=str(ckpt), RESUME="1", ASYNC="1"
    )
    assert [e[:2] for e in resumed[0]["events"] if e[0] == "resume"] == [["resume", 7]]
    for rank in (0, 1):
        assert resumed[rank]["params"] == straight[rank]["params"], "weights differ from the straight run"
        assert resumed[rank]["optimizer"] == straight[rank]["optimizer"], "optimizer state differs"
        assert resumed[rank]["lr"] == straight[rank]["lr"]


def test_a_failed_background_shard_write_on_one_process_is_raised_on_both(tmp_path):
    # rank 1 alone fails to write its shard of step 6 (no space left), in the background
    ckpt = tmp_path / "ckpt"
    failed = _run(tmp_path / "run", SCRIPT, MAX_STEPS="9", CKPT_DIR=str(ckpt), ASYNC="1", FAIL_SHARDS_AT="6")
    for result in failed:  # training went on; both raise it at the next save (step 9), neither hangs
        assert result["steps"] == 9
        assert result["error"].startswith("the asynchronous save of step 6 to ")
        assert "process 1 could not write its shards: OSError: [Errno 28] No space left" in result["error"]
        assert "The previous checkpoints are intact" in result["error"]
    # nothing of step 6 is left (its temporary folder was removed), step 9 was not begun
    written = sorted(p.name for p in ckpt.iterdir() if p.name.startswith(("step-", ".step-")))
    assert written == ["step-00000000", "step-00000003"]
    assert verify_checkpoint(ckpt / "step-00000003").ok


def test_a_checkpoint_of_one_fsdp_version_loads_under_the_other_bit_for_bit(stopped, tmp_path):
    mode, first, folder = stopped
    other = "fsdp1" if mode == "fsdp2" else "fsdp2"
    loaded = _run(tmp_path / other, SCRIPT, MODE=other, MAX_STEPS="7", RESUME_FROM=str(folder))
    for rank in (0, 1):
        assert loaded[rank]["steps"] == 7
        assert (
            loaded[rank]["params"] == first[0]["params"]
            and loaded[rank]["optimizer"] == first[0]["optimizer"]
        )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[dict, Path]:
    """A plain one-process run's checkpoint at step 7 (unsharded) and its result."""
    base = tmp_path_factory.mktemp("one")
    alone = _alone(base / "alone", MODE="ddp", MAX_STEPS="7", CKPT_DIR=str(base / "ckpt"))
    return alone, base / "ckpt" / "step-00000007"


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_a_one_process_checkpoint_resumes_under_two_process_fsdp_bit_for_bit(one_process, tmp_path, mode):
    alone, folder = one_process
    assert "model.safetensors" in json.loads((folder / "manifest.json").read_text())["files"]
    loaded = _run(tmp_path / "loaded", SCRIPT, MODE=mode, MAX_STEPS="7", RESUME_FROM=str(folder))
    for rank in (0, 1):  # the whole tensors, sharded out: each process's shards are their slices
        assert loaded[rank]["steps"] == 7
        assert loaded[rank]["params"] == alone["params"] and loaded[rank]["optimizer"] == alone["optimizer"]
        assert loaded[rank]["lr"] == alone["lr"]
    if mode == "fsdp2":  # and training goes on from there
        onward = _run(tmp_path / "onward", SCRIPT, MODE=mode, MAX_STEPS="10", RESUME_FROM=str(folder))
        assert [r["steps"] for r in onward] == [10, 10] and onward[0]["params"] != alone["params"]
        assert all(math.isfinite(loss) for loss in onward[0]["losses"].values())


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_fsdp_a_spike_on_rank_one_rolls_both_ranks_back_to_the_same_sharded_checkpoint(tmp_path, mode):
    # 3 poisoned batches on rank 1 (wrong labels, inputs x100): the loss spikes, and the updates
    # they bring point the wrong way (a loss merely scaled up would be a larger step the right way)
    spike = {"MODE": mode, "MAX_STEPS": "24", "SPIKE_ON_RANK1_AT_STEP": "10", "POISON": "1",
             "SPIKE_WARMUP": "4", "LOG_EVERY": "1"}  # fmt: skip
    if mode == "fsdp2":  # saved asynchronously: the rollback waits for the save in flight first
        spike["ASYNC"] = "1"
    if mode == "fsdp1":  # use_orig_params=False: its FlatParameters' optimizer state is saved and restored
        spike["ORIG"] = "0"  # (use_orig_params=True: the resume and resharding tests above)
    results = _run(tmp_path / "run", SCRIPT, CKPT_DIR=str(tmp_path / "ckpt"), **spike)
    for r in results:
        assert r["rollbacks"] == 1
        rollback = [e for e in r["events"] if e[0] == "rollback"]
        assert [e[1] for e in rollback] == [9]  # the newest healthy checkpoint before step 10
    assert results[0]["params"] == results[1]["params"], "ranks hold different weights after the rollback"
    assert results[0]["lr"] == results[1]["lr"]
    assert results[0]["steps"] == 24
    divergent = _run(tmp_path / "divergent", SCRIPT, ROLLBACK="0", **spike)  # and no checkpoints
    assert divergent[0]["rollbacks"] == 0
    # up to the spike both runs are one: checkpointing (a fresh optimizer's at step 0 included)
    # changes nothing of the training
    assert list(results[0]["losses"].items())[:9] == list(divergent[0]["losses"].items())[:9]
    assert results[0]["lr"] == divergent[0]["lr"] * 0.5  # rollback_lr_factor, on the same schedule
    # the last 4 logged losses (steps 21-24): the rolled-back run ends below the one that kept the spike
    ours, theirs = (sum(list(r[0]["losses"].values())[-4:]) / 4 for r in (results, divergent))
    print(f"{mode}: mean loss of steps 21-24, rolled back {ours:.4f}, divergent {theirs:.4f}")
    assert ours < theirs


def test_a_damaged_shard_is_found_by_the_processes_together_and_a_pickled_one_is_refused(tmp_path, capsys):
    from safeloop.checkpoint.manifest import MANIFEST, file_digests, hash_pool, results
    from safeloop.checkpoint.state import read_state
    from safeloop.errors import CheckpointError

    ckpt = tmp_path / "ckpt"
    _run(tmp_path / "first", SCRIPT, MAX_STEPS="3", CKPT_DIR=str(ckpt))
    folder = ckpt / "step-00000003"
    assert main(["inspect", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert "sharded (fsdp2): 2 shard files from 2 processes" in shown
    assert "optim.state.0.weight.exp_avg" in shown
    # one flipped bit of tensor data in the newest checkpoint's shard of process 1: the processes
    # hash the shards together when resuming, find it, and fall back to the checkpoint before
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    other = damaged / "step-00000003" / "shards" / "shard-00002-model-00001-of-00001.safetensors"
    intact = other.read_bytes()
    other.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    resumed = _run(tmp_path / "resumed", SCRIPT, MAX_STEPS="4", CKPT_DIR=str(damaged), RESUME="1")
    assert [e[:2] for e in resumed[0]["events"] if e[0] == "resume"] == [["resume", 0]]
    log = (tmp_path / "resumed" / "launch.log").read_text()
    assert "skipping damaged checkpoint step-00000003" in log and "shard-00002" in log
    shard = folder / "shards" / "shard-00001-model-00001-of-00001.safetensors"
    planted = pickle.dumps({"lr": 0.1}) + shard.read_bytes()  # what DCP writes for non-tensor values
    shard.write_bytes(planted)
    assert not verify_checkpoint(folder).ok  # the hash no longer matches: damage
    manifest = json.loads((folder / MANIFEST).read_text())  # a manifest rewritten to match
    pool = hash_pool()
    name = "shards/" + shard.name
    manifest["files"][name] = {
        "size": len(planted),
        "sha256": results(file_digests(shard, len(planted), pool)),
    }
    pool.shutdown()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert verify_checkpoint(folder).ok
    with pytest.raises(CheckpointError, match="nothing of it was loaded"):
        read_state(folder)
