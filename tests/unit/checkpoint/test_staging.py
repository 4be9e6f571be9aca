"""The host copies of an asynchronous sharded save, and how a failed shard write is described."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

from safeloop.checkpoint.background import shard_write_problem
from safeloop.checkpoint.spread_hashing import gather_shard_digests
from safeloop.checkpoint.staging import HostStaging


def test_the_copies_share_no_memory_with_the_live_tensors_and_keep_their_values():
    padded = torch.arange(10.0)
    live = {
        "w": torch.randn(3, 4),
        "view": padded[2:8],
        "strided": torch.randn(4, 3).t(),
        "step": torch.tensor(5.0),
    }
    before = {name: tensor.clone() for name, tensor in live.items()}
    staged = HostStaging().copies(live)
    for name, tensor in live.items():
        assert staged[name].is_contiguous() and staged[name].nbytes == staged[name].untyped_storage().nbytes()
        assert staged[name].untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
        tensor.add_(1.0)  # the next optimizer step, in place
    assert all(torch.equal(staged[name], before[name]) for name in live)


def test_the_buffers_are_filled_again_at_the_next_save_and_those_of_dropped_names_let_go():
    staging = HostStaging()
    first = staging.copies({"a": torch.ones(4), "b": torch.ones(2)})
    pointer = first["a"].data_ptr()
    second = staging.copies({"a": torch.full((4,), 2.0), "c": torch.zeros(3, dtype=torch.int64)})
    assert second["a"].data_ptr() == pointer and torch.equal(second["a"], torch.full((4,), 2.0))
    assert set(staging._buffers) == {"a", "c"}
    third = staging.copies({"a": torch.ones(5)})  # another shape: a new buffer
    assert third["a"].shape == (5,) and torch.equal(third["a"], torch.ones(5))


def test_a_value_that_is_not_a_tensor_is_refused():
    with pytest.raises(TypeError, match="cannot stage 'lr' for an asynchronous save: a float"):
        HostStaging().copies({"lr": 0.1})


def test_a_failed_write_names_the_process_it_failed_on_not_the_one_reporting():
    try:
        raise OSError(28, "No space left on device")
    except OSError as err:
        wrapped = _wrap_exception(err)
    raised_everywhere = CheckpointException("failed", {1: wrapped})  # what DCP raises on every process
    assert shard_write_problem(raised_everywhere, 0) == (
        "process 1 could not write its shards: OSError: [Errno 28] No space left on device"
    )
    assert (
        shard_write_problem(ValueError("bad"), 0) == "process 0 could not write its shards: ValueError: bad"
    )


def test_a_problem_is_shared_and_nothing_is_hashed(tmp_path):
    digests, problem = gather_shard_digests(Accelerator(cpu=True), tmp_path, {}, problem="process 0 failed")
    assert digests == {} and problem == "process 0 failed"
