"""Whole tensors in shard files: the split between processes, and reading them back by name."""

from __future__ import annotations

import pytest
import torch

from safeloop.checkpoint.sharded import safetensors_problem
from safeloop.checkpoint.whole_shards import WholeShardFiles, assign_owners, share_file_name, write_share
from safeloop.errors import CheckpointError


def test_the_owners_balance_the_bytes_and_agree_whatever_the_order_given():
    sizes = [("model.a", 1000), ("model.b", 10), ("optim.a", 1000), ("model.c", 990), ("optim.c", 5)]
    owners = assign_owners(sizes, 2)
    assert owners == assign_owners(list(reversed(sizes)), 2)  # every process computes the same
    load = [sum(n for name, n in sizes if owners[name] == rank) for rank in (0, 1)]
    assert abs(load[0] - load[1]) < 1000  # largest first: no process gets both 1000s
    assert assign_owners(sizes, 1) == dict.fromkeys(owners, 0)
    many = assign_owners([(f"t{i}", 1) for i in range(7)], 3)
    assert sorted(list(many.values()).count(r) for r in range(3)) == [2, 2, 3]


def test_shares_read_back_bitwise_by_name_from_any_file(tmp_path):
    folder = tmp_path / "shards"
    a, b = torch.randn(3, 4), torch.arange(5, dtype=torch.float32)
    path0 = write_share({"model.a": a}, folder, 0, 2)
    write_share({"model.b": b}, folder, 1, 2)
    assert path0.name == share_file_name(0, 2) == "whole-00000-of-00002.safetensors"
    assert safetensors_problem(path0) is None  # plain safetensors, nothing else
    with WholeShardFiles(folder) as files:
        assert torch.equal(files.get("model.a", torch.Size([3, 4])), a)
        assert torch.equal(files.get("model.b", torch.Size([5])), b)
        with pytest.raises(CheckpointError, match=r"holds no `model.c`: the checkpoint is of another model"):
            files.get("model.c", torch.Size([2]))
        with pytest.raises(
            CheckpointError, match=r"`model.a` has shape \[3, 4\] .* this model's is \[4, 3\]"
        ):
            files.get("model.a", torch.Size([4, 3]))
