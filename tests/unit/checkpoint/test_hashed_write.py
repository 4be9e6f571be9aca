"""Shard files hashed as they are written: the digests are the file's, and damage is still refused.

The manifest of a sharded checkpoint lists digests each process took while writing its files,
from memory, without reading them back: they must equal the SHA-256 of the file's bytes on disk
(what verification hashes later), chunk by chunk, across chunk boundaries.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch.distributed.checkpoint import HuggingFaceStorageReader

from safeloop.checkpoint import hashed_write, spread_hashing
from safeloop.checkpoint.hashed_write import save_hashed
from safeloop.checkpoint.manager import CheckpointManager, Snapshot
from safeloop.checkpoint.manifest import CHUNK_BYTES, verify_checkpoint
from safeloop.checkpoint.sharded import SHARD_DIR, _StreamingShardWriter, shard_file_name
from safeloop.checkpoint.spread_hashing import shards_problem
from safeloop.checkpoint.store import CheckpointWriter

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _disk_digests(path: Path) -> list[str]:
    """The SHA-256 of each chunk of the file as it is on disk (what verification computes)."""
    data = path.read_bytes()
    return [
        hashlib.sha256(data[i : i + CHUNK_BYTES]).hexdigest()
        for i in range(0, max(len(data), 1), CHUNK_BYTES)
    ]


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        # more than two chunks, so that chunks span the header and several tensors
        "model.big": torch.randn(9 * 2**20 + 3),
        "model.half": torch.randn(3, 1001, dtype=torch.bfloat16),
        "optim.step": torch.tensor(7, dtype=torch.int64),
        "model.empty": torch.empty(0, 4),
        "model.flags": torch.tensor([True, False, True]),
    }


def test_the_digests_taken_at_write_time_are_the_files_on_disk(tmp_path):
    path = tmp_path / "shard.safetensors"
    digests = save_hashed(_tensors(), path, {"DCP_VERSION": "1.0", "format": "pt"})
    assert path.stat().st_size > 2 * CHUNK_BYTES
    assert digests == _disk_digests(path)


def test_a_file_of_no_tensors_has_the_digest_of_its_bytes(tmp_path):
    path = tmp_path / "shard.safetensors"
    assert save_hashed({}, path) == _disk_digests(path)


def test_a_layout_not_recognised_is_hashed_from_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(hashed_write, "_file_pieces", lambda path, tensors: None)
    path = tmp_path / "shard.safetensors"
    assert save_hashed(_tensors(), path) == _disk_digests(path)


def test_a_header_naming_other_tensors_is_not_hashed_from_memory(tmp_path):
    path = tmp_path / "shard.safetensors"
    save_hashed({"a": torch.ones(3)}, path)
    assert hashed_write._file_pieces(path, {"b": torch.ones(3)}) is None
    assert hashed_write._file_pieces(path, {"a": torch.ones(4)}) is None
    assert hashed_write._file_pieces(path, {"a": torch.ones(3)}) is not None


def test_the_shard_writer_hands_back_the_digests_of_its_file(tmp_path):
    writer = _StreamingShardWriter(tmp_path)
    dcp.save({name: tensor.clone() for name, tensor in _tensors().items()}, storage_writer=writer)
    assert list(writer.digests) == [shard_file_name(1)]
    assert writer.digests[shard_file_name(1)] == _disk_digests(tmp_path / shard_file_name(1))


def _write_shards(written: bool, folder: Path) -> dict[str, list[str]] | None:
    folder.mkdir()
    digests = save_hashed(_tensors(), folder / shard_file_name(1))
    return {shard_file_name(1): digests} if written else None


@pytest.mark.parametrize("written", [True, False], ids=["hashed-at-write", "hashed-from-disk"])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_damaged_shard_is_refused_by_verification(tmp_path, monkeypatch, written, async_save):
    manager = CheckpointManager(tmp_path, Accelerator(cpu=True), every=1, keep=3, async_save=async_save)
    with monkeypatch.context() as patch:
        if written:  # the shards are never read back to be hashed (the small files are)
            reread = pytest.fail
            patch.setattr(spread_hashing, "file_digests", lambda *args: reread("shard hashed from disk"))
            adopt = CheckpointWriter.adopt
            patch.setattr(
                CheckpointWriter,
                "adopt",
                lambda self, name, digests=None: adopt(self, name, digests or reread(f"{name} not hashed")),
            )
        for step in (1, 2):
            snapshot = Snapshot(
                step=step, model=None, shared={}, rank={}, trainer={"global_step": step},
                write_shards=lambda folder: _write_shards(written, folder),
            )  # fmt: skip
            manager.save(snapshot)
        manager.close()
    newest = tmp_path / "step-00000002"
    shard = newest / SHARD_DIR / shard_file_name(1)
    listed = verify_checkpoint(newest).manifest["files"][f"{SHARD_DIR}/{shard_file_name(1)}"]
    assert listed == {"size": shard.stat().st_size, "sha256": _disk_digests(shard)}
    assert verify_checkpoint(newest).ok and shards_problem(manager.accelerator, newest) == ""
    with shard.open("r+b") as fh:  # one flipped byte, in the second chunk
        fh.seek(CHUNK_BYTES + 5)
        byte = fh.read(1)
        fh.seek(CHUNK_BYTES + 5)
        fh.write(bytes([byte[0] ^ 0xFF]))
    check = verify_checkpoint(newest)
    assert not check.ok and shard.name in check.problem
    assert shard.name in shards_problem(manager.accelerator, newest)
    found = manager.resolve_and_load("latest")  # falls back to the intact checkpoint
    assert found is not None and found[0].name == "step-00000001"


def test_a_strided_tensor_is_written_contiguous_and_hashed(tmp_path):
    strided = torch.randn(4, 3).t()  # save_file refuses a tensor that is not contiguous
    writer = _StreamingShardWriter(tmp_path)
    dcp.save({"model.weight": strided}, storage_writer=writer)
    path = tmp_path / shard_file_name(1)
    assert writer.digests[path.name] == _disk_digests(path)
    state = {"model.weight": torch.zeros(3, 4)}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(tmp_path)))
    assert torch.equal(state["model.weight"], strided)
