"""safeloop's shard writer against torch's ``HuggingFaceStorageWriter(save_distributed=True)``.

The writer streams each process's shard file with ``save_file`` instead of building it in memory;
its files must be the ones torch's writer makes (name, tensors, header metadata), so that
``HuggingFaceStorageReader`` reads both, resharding included. No process group is needed: DCP
runs as one process, and the plans of two processes are built by hand.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from safeloop.checkpoint.sharded import (
    DCP_ERRORS,
    _StreamingShardWriter,
    safetensors_problem,
    shard_file_name,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

torch.manual_seed(0)
# the whole tensors; each of the two "processes" holds a block of rows (the 0-d one: process 2)
WHOLE = {
    "model.weight": torch.randn(6, 4),
    "model.bias": torch.randn(6, dtype=torch.bfloat16),
    "optim.state.model.weight.exp_avg": torch.randn(6, 4),
    "model.tied": torch.empty(6, 4),  # model.weight's values, set below
    "optim.state.step": torch.tensor(3, dtype=torch.int64),
}


WHOLE["model.tied"] = WHOLE["model.weight"].clone()


class _Planner:
    """What a writer asks of DCP's planner: each item's data, by name."""

    def __init__(self, local: dict[str, torch.Tensor]) -> None:
        self.local = local

    def resolve_data(self, item: WriteItem) -> torch.Tensor:
        return self.local[item.index.fqn]


def _part(process: int) -> tuple[SavePlan, _Planner]:
    """Process ``process``'s plan (rows 0-2 or 3-5) and its local tensors, as DCP would give them."""
    items, local = [], {}
    for name, whole in WHOLE.items():
        if whole.dim() == 0:
            if process != 2:
                continue
            offsets, block = torch.Size([]), whole
        else:
            offsets = torch.Size([3 * (process - 1)] + [0] * (whole.dim() - 1))
            block = whole[3 * (process - 1) : 3 * process]  # a view into the whole tensor's storage
        chunk = ChunkStorageMetadata(offsets=offsets, sizes=block.shape)
        data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=whole.dtype), size=whole.shape)
        items.append(WriteItem(MetadataIndex(name, offsets), WriteItemType.SHARD, tensor_data=data))
        local[name] = block
    # a weight tied under two names: views of one buffer, which safetensors refuses to write
    # together; both writers copy a view of a larger buffer out of it first
    flat = torch.cat([local["model.weight"].flatten(), torch.zeros(1)])
    local["model.weight"], local["model.tied"] = flat[:12].view(3, 4), flat[:12].view(3, 4)
    return SavePlan(items, storage_data={"shard_index": process}), _Planner(local)


def _header(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's parsed header and its data bytes.

    The header's JSON is compared parsed: safetensors writes its metadata's keys in no fixed
    order, even between two files of torch's own writer. The sharding JSON stays a string.
    """
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _write(writer: HuggingFaceStorageWriter) -> list:
    results = []
    for process in (1, 2):
        plan, planner = _part(process)
        results += [(r.index, r.size_in_bytes) for r in writer.write_data(plan, planner).wait()]
    return results


def test_its_files_are_the_ones_torchs_writer_makes(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "torch"
    ours.mkdir(), theirs.mkdir()
    assert _write(_StreamingShardWriter(ours)) == _write(
        HuggingFaceStorageWriter(str(theirs), save_distributed=True)
    )
    names = sorted(p.name for p in theirs.iterdir())
    assert names == [shard_file_name(1), shard_file_name(2)] == sorted(p.name for p in ours.iterdir())
    for name in names:
        assert _header(ours / name) == _header(theirs / name)  # names, dtypes, offsets, metadata, bytes
        assert safetensors_problem(ours / name) is None
    sharding = json.loads(_header(ours / shard_file_name(2))[0]["__metadata__"]["DCP_SHARDING_INFO"])
    assert sharding == {
        "model.weight": {"saved_offsets": [3, 0]},
        "model.bias": {"saved_offsets": [3]},
        "optim.state.model.weight.exp_avg": {"saved_offsets": [3, 0]},
        "model.tied": {"saved_offsets": [3, 0]},
        "optim.state.step": {"saved_offsets": []},
    }
    read = [HuggingFaceStorageReader(str(folder)).read_metadata() for folder in (ours, theirs)]
    assert read[0].state_dict_metadata == read[1].state_dict_metadata


def test_two_processes_shards_load_whole_into_one_process(tmp_path):
    _write(_StreamingShardWriter(tmp_path))
    state = {name: torch.zeros_like(whole) for name, whole in WHOLE.items()}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(tmp_path)))  # one process: resharded
    for name, whole in WHOLE.items():
        assert torch.equal(state[name], whole), name


def test_a_dcp_save_writes_one_plain_safetensors_file_and_no_metadata_pickle(tmp_path):
    dcp.save(
        {name: whole.clone() for name, whole in WHOLE.items()}, storage_writer=_StreamingShardWriter(tmp_path)
    )
    assert [p.name for p in tmp_path.iterdir()] == [shard_file_name(1)]
    assert safetensors_problem(tmp_path / shard_file_name(1)) is None
    with safe_open(tmp_path / shard_file_name(1), framework="pt") as fh:
        assert torch.equal(fh.get_tensor("model.weight"), WHOLE["model.weight"])


def test_a_non_tensor_value_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(DCP_ERRORS, match="not a tensor"):
        dcp.save({"model.weight": torch.ones(2), "lr": 0.1}, storage_writer=_StreamingShardWriter(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_plan_shaped_otherwise_is_left_to_torchs_writer(tmp_path):
    plan, planner = _part(1)
    other = SavePlan(plan.items, storage_data={})  # not the shape this torch's writer gives its plans
    _StreamingShardWriter(tmp_path).write_data(other, planner).wait()
    assert [p.name for p in tmp_path.iterdir()] == ["model-00001-of-00001.safetensors"]


def test_one_tensor_under_two_names_is_written_under_both(tmp_path):
    # FSDP1 with use_orig_params=False gives every parameter of a FlatParameter the same `step`
    # tensor; torch's writer fails on it (safetensors refuses tensors that share memory)
    step = torch.tensor(5.0)
    data = TensorWriteData(
        ChunkStorageMetadata(torch.Size([]), torch.Size([])), TensorProperties(), torch.Size([])
    )
    names = ("optim.state.0.weight.step", "optim.state.0.bias.step")
    items = [
        WriteItem(MetadataIndex(name, torch.Size([])), WriteItemType.SHARD, tensor_data=data)
        for name in names
    ]
    plan, planner = SavePlan(items, storage_data={"shard_index": 1}), _Planner(dict.fromkeys(names, step))
    _StreamingShardWriter(tmp_path).write_data(plan, planner).wait()
    state = {name: torch.zeros(()) for name in names}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(tmp_path)))
    assert all(torch.equal(value, step) for value in state.values())
