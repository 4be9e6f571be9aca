"""Sharded checkpoints, the parts that need no process group: names, file structure, refusals."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from safeloop.checkpoint.checkpointer import build_manager
from safeloop.checkpoint.manifest import valid_file_name
from safeloop.checkpoint.sharded import safetensors_problem
from safeloop.config import TrainerConfig
from safeloop.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("state.json", True),
        ("shards/shard-00001-model-00001-of-00001.safetensors", True),
        ("manifest.json", False),
        ("other/file.safetensors", False),
        ("shards/../state.json", False),
        ("shards/.hidden", False),
        ("/etc/passwd", False),
        ("shards/a/b", False),
        (".state.json", False),
    ],
)
def test_only_plain_names_and_names_in_shards_may_be_listed(name, valid):
    assert valid_file_name(name) is valid


def test_a_well_formed_safetensors_file_passes_and_planted_bytes_do_not(tmp_path):
    path = tmp_path / "shard.safetensors"
    save_file(
        {"a": torch.arange(6.0), "b": torch.ones(2, 3, dtype=torch.int64)}, str(path), metadata={"k": "v"}
    )
    assert safetensors_problem(path) is None
    data = path.read_bytes()
    cases = {
        "pickle in front": pickle.dumps({"lr": 0.1}) + data,
        "pickle behind": data + pickle.dumps({"lr": 0.1}),
        "truncated": data[:-4],
        "no header": data[:5],
    }
    for what, content in cases.items():
        path.write_bytes(content)
        assert safetensors_problem(path) is not None, what


def test_a_deepspeed_checkpoint_dir_is_refused_with_the_way_out(tmp_path):
    config = TrainerConfig(checkpoint_dir=str(tmp_path))
    for engine, name in (("deepspeed", "DeepSpeed"),):
        with pytest.raises(ConfigError, match=rf"`checkpoint_dir` is set under {name}.*Use FSDP"):
            build_manager(config, accelerator=None, engine=engine)  # type: ignore[arg-type]
        manager, note = build_manager(TrainerConfig(), accelerator=None, engine=engine)  # type: ignore[arg-type]
        assert manager is None and note is not None and note.code == "rollback-unavailable"
        assert name in note.message


@pytest.mark.parametrize(("engine", "name"), [("fsdp2", "FSDP2"), ("fsdp1", "FSDP1")])
def test_fsdp_on_a_torch_without_the_safetensors_writer_is_refused_naming_the_version(
    tmp_path, monkeypatch, engine, name
):
    from safeloop.checkpoint import sharded

    monkeypatch.setattr(sharded, "_HF_WRITER", False)
    with pytest.raises(ConfigError, match=rf"under {name}, but sharded checkpoints need .*save_distributed"):
        build_manager(TrainerConfig(checkpoint_dir=str(tmp_path)), accelerator=None, engine=engine)  # type: ignore[arg-type]
    manager, note = build_manager(TrainerConfig(), accelerator=None, engine=engine)  # type: ignore[arg-type]
    assert manager is None and note is not None and f"{name} with this torch" in note.message


def test_spread_digests_on_one_process_are_the_manifests_chunk_digests(tmp_path):
    from types import SimpleNamespace

    from safeloop.checkpoint.manifest import CHUNK_BYTES, file_digests, hash_pool, results
    from safeloop.checkpoint.spread_hashing import spread_digests

    sizes = {"shard-00001-model-00001-of-00001.safetensors": CHUNK_BYTES + 5, "b.safetensors": 0}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    one = SimpleNamespace(process_index=0, num_processes=1)
    digests, problem = spread_digests(one, tmp_path, sorted(sizes))  # type: ignore[arg-type]
    pool = hash_pool()
    expected = {n: results(file_digests(tmp_path / n, s, pool)) for n, s in sizes.items()}
    pool.shutdown()
    assert problem == "" and digests == expected
    assert len(digests["shard-00001-model-00001-of-00001.safetensors"]) == 2  # one per 16 MiB chunk
