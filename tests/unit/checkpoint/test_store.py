"""Checkpoint folders: atomic writes, manifests, verification, discovery, rotation."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from safeloop import CheckpointError
from safeloop.checkpoint.manifest import CHUNK_BYTES, MANIFEST, VerifiedReader, verify_checkpoint
from safeloop.checkpoint.store import (
    checkpoint_name,
    latest_valid,
    list_checkpoints,
    rotate,
    write_checkpoint,
)


def _write(root, step, payload=b"weights"):
    return write_checkpoint(
        root, step, {"model.safetensors": payload, "state.json": b"{}"}, meta={"healthy": True}
    )


def test_a_written_checkpoint_verifies_and_lists_every_file_with_size_and_hash(tmp_path):
    path = _write(tmp_path, 500)
    assert path.name == "step-00000500" == checkpoint_name(500)
    check = verify_checkpoint(path)
    assert check.ok and check.complete
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 500 and manifest["meta"] == {"healthy": True}
    assert manifest["files"]["model.safetensors"]["size"] == len(b"weights")
    assert manifest["files"]["model.safetensors"]["sha256"] == [hashlib.sha256(b"weights").hexdigest()]
    assert manifest["hash"] == {"algorithm": "sha256", "chunk_bytes": CHUNK_BYTES}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-manifest", "bad-manifest", "missing-file"])
def test_damage_is_detected_and_the_loader_falls_back_to_the_previous_checkpoint(tmp_path, damage):
    older = _write(tmp_path, 10)
    newer = _write(tmp_path, 20, payload=b"newer weights")
    target = newer / "model.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[3] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-2])
    elif damage == "no-manifest":
        (newer / MANIFEST).unlink()
    elif damage == "bad-manifest":
        (newer / MANIFEST).write_text("{not json")
    else:
        target.unlink()
    path, warnings = latest_valid(tmp_path)
    assert path == older
    if damage == "no-manifest":
        assert warnings == []  # an unfinished write, not damage: ignored without a warning
    else:
        assert len(warnings) == 1 and "step-00000020" in warnings[0]
        assert ("model.safetensors" in warnings[0]) or (MANIFEST in warnings[0])


def test_large_files_are_hashed_in_chunks_and_a_flipped_byte_is_located(tmp_path):
    payload = bytes(range(256)) * ((2 * CHUNK_BYTES + 1000) // 256)  # three chunks, the last short
    tensors = {"w": torch.arange(CHUNK_BYTES // 2, dtype=torch.float32), "b": torch.ones(3)}

    def write_tensors(path):
        save_file(tensors, str(path))

    path = write_checkpoint(tmp_path, 1, {"blob.bin": payload, "t.safetensors": write_tensors}, meta={})
    entry = json.loads((path / MANIFEST).read_text())["files"]["blob.bin"]
    expected = [
        hashlib.sha256(payload[a : a + CHUNK_BYTES]).hexdigest() for a in range(0, len(payload), CHUNK_BYTES)
    ]
    assert len(expected) == 3 and entry["sha256"] == expected
    reader = VerifiedReader(path)
    assert reader.read("blob.bin") == payload
    loaded = reader.tensors("t.safetensors")
    reader.confirm()
    assert torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["b"], tensors["b"])
    with (path / "blob.bin").open("r+b") as fh:  # damage the second chunk only
        fh.seek(CHUNK_BYTES + 5)
        fh.write(bytes([payload[CHUNK_BYTES + 5] ^ 0xFF]))
    check = verify_checkpoint(path)
    assert not check.ok
    assert f"blob.bin does not match its SHA-256 in the manifest (bytes {CHUNK_BYTES}-" in check.problem
    reader = VerifiedReader(path)
    reader.tensors("t.safetensors")
    with pytest.raises(CheckpointError, match=r"blob\.bin does not match"):
        reader.confirm()  # the file not read is hashed too


@pytest.mark.parametrize("where", ["data", "header"])
def test_tensors_are_checked_against_the_manifest_from_their_own_memory(tmp_path, where):
    tensors = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(2, 3).half(), "e": torch.zeros(0)}

    def write_tensors(path):
        save_file(tensors, str(path))

    path = write_checkpoint(tmp_path, 1, {"t.safetensors": write_tensors}, meta={})
    reader = VerifiedReader(path)
    loaded = reader.tensors("t.safetensors")
    reader.confirm()
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    data = bytearray((path / "t.safetensors").read_bytes())
    if where == "data":
        data[-1] ^= 0x01  # the last tensor's last byte: still loads, with a wrong value
    else:
        at = data.index(b'"dtype":"F32"')  # a valid header that reads the same bytes as int32
        data[at : at + 13] = b'"dtype":"I32"'
    (path / "t.safetensors").write_bytes(bytes(data))
    reader = VerifiedReader(path)
    reader.tensors("t.safetensors")
    with pytest.raises(CheckpointError, match=r"t\.safetensors does not match its SHA-256"):
        reader.confirm()


def test_a_manifest_of_another_format_or_hash_is_refused_by_name(tmp_path):
    path = _write(tmp_path, 3)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["hash"] = {"algorithm": "md5", "chunk_bytes": CHUNK_BYTES}
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert "names hash" in verify_checkpoint(path).problem and "md5" in verify_checkpoint(path).problem
    manifest["format_version"] = 1
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert "written by an older safeloop (manifest format 1" in verify_checkpoint(path).problem
    manifest["format_version"] = 7
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert "format_version 7, expected 2" in verify_checkpoint(path).problem


@pytest.mark.parametrize(
    "files",
    [
        {},
        {"model.safetensors": "7"},
        {"model.safetensors": {"size": 7.0, "sha256": ["0" * 64]}},
        {"model.safetensors": {"size": 7, "sha256": "0" * 64}},
        {"model.safetensors": {"size": 7, "sha256": []}},
    ],
    ids=["no-files", "not-a-dict", "float-size", "digest-not-a-list", "no-digest"],
)
def test_a_manifest_of_the_wrong_shape_is_damage_not_an_exception(tmp_path, files):
    path = _write(tmp_path, 3)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"] = files
    (path / MANIFEST).write_text(json.dumps(manifest))
    check = verify_checkpoint(path)
    assert not check.ok and check.complete
    assert "lists no files" in check.problem or "malformed entry for 'model.safetensors'" in check.problem


def test_a_tensor_file_swapped_while_it_is_read_is_refused(tmp_path, monkeypatch):
    import safeloop.checkpoint.manifest as manifest_module

    def write_tensors(path):
        save_file({"a": torch.arange(4, dtype=torch.float32)}, str(path))

    path = write_checkpoint(tmp_path / "run", 1, {"t.safetensors": write_tensors}, meta={})
    swapped = tmp_path / "swapped.safetensors"  # the same bytes, read as int32
    swapped.write_bytes((path / "t.safetensors").read_bytes().replace(b'"F32"', b'"I32"'))
    opener = manifest_module.safe_open
    # the header is read from the checkpoint, then safetensors opens the swapped file
    monkeypatch.setattr(manifest_module, "safe_open", lambda _name, **kw: opener(str(swapped), **kw))
    with pytest.raises(CheckpointError, match=r"changed while it was read \(`a` differs\)"):
        VerifiedReader(path).tensors("t.safetensors")


def test_no_checkpoint_with_a_manifest_means_a_fresh_start(tmp_path):
    (tmp_path / "step-00000005").mkdir()  # a crash during the very first save
    assert latest_valid(tmp_path) == (None, [])


def test_checkpoints_that_all_fail_verification_raise_with_every_problem(tmp_path):
    for step in (1, 2):
        path = _write(tmp_path, step)
        (path / "model.safetensors").write_bytes(b"xx")
    with pytest.raises(CheckpointError, match=r"2 checkpoints .* none verifies") as excinfo:
        latest_valid(tmp_path)
    assert "step-00000001" in str(excinfo.value) and "step-00000002" in str(excinfo.value)


def test_latest_is_chosen_by_step_in_the_name_not_by_modification_time(tmp_path):
    newer = _write(tmp_path, 200)
    _write(tmp_path, 100)  # written last, yet older by step
    assert latest_valid(tmp_path)[0] == newer
    assert [step for step, _ in list_checkpoints(tmp_path)] == [100, 200]


def test_files_not_in_the_manifest_are_never_read(tmp_path):
    path = _write(tmp_path, 3)
    (path / "extra.bin").write_bytes(b"not listed, never opened")
    assert verify_checkpoint(path).ok


def test_rewriting_a_step_replaces_it_whole(tmp_path):
    _write(tmp_path, 7, payload=b"first")
    path = _write(tmp_path, 7, payload=b"second")
    assert (path / "model.safetensors").read_bytes() == b"second" and verify_checkpoint(path).ok
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000007"]


def test_rotation_keeps_the_newest_and_never_deletes_a_protected_one(tmp_path):
    paths = [_write(tmp_path, step) for step in (1, 2, 3, 4, 5)]
    deleted = rotate(tmp_path, keep=2, protect=[paths[1]])
    assert deleted == [paths[0], paths[2]]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4, 5]


def test_file_names_that_could_escape_the_folder_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="plain names"):
        write_checkpoint(tmp_path, 1, {"../evil": b""}, meta={})
