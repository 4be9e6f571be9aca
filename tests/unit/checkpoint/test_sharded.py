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


def test_fsdp1_and_deepspeed_checkpoint_dirs_are_refused_with_the_way_out(tmp_path):
    config = TrainerConfig(checkpoint_dir=str(tmp_path))
    for engine, name in (("fsdp1", "FSDP1"), ("deepspeed", "DeepSpeed")):
        with pytest.raises(ConfigError, match=rf"`checkpoint_dir` is set under {name}.*Use FSDP2"):
            build_manager(config, accelerator=None, engine=engine)  # type: ignore[arg-type]
        manager, note = build_manager(TrainerConfig(), accelerator=None, engine=engine)  # type: ignore[arg-type]
        assert manager is None and note is not None and note.code == "rollback-unavailable"
        assert name in note.message
