"""Sharded model and optimizer state (FSDP2) through ``torch.distributed.checkpoint``, in safetensors.

Under FSDP2 (``fully_shard``) every process holds a shard of each parameter and of its
optimizer state. ``get_state_dict`` (flattened optimizer state) gives them as DTensors; every
process writes its own shards with ``HuggingFaceStorageWriter(save_distributed=True)``, one
``shards/shard-0000N-model-00001-of-00001.safetensors`` each, whose header holds the shard's
offsets as JSON. Non-tensor values (param-group hyper-parameters: lr, betas, ...) are never handed
to DCP, which would ``torch.save`` them into the file: they go to ``state.json`` beside the shards.
With consolidation off no ``.metadata`` file is written, so no pickle reaches the disk. Loading
builds the same flattened state dict from the live model and optimizer (the shapes and shardings
to fill) and lets ``HuggingFaceStorageReader`` read each shard's slices, at any world size.

Every DCP call of safeloop is in this module. ``CheckpointException`` derives from
``BaseException``, so it is caught by name.
"""

from __future__ import annotations

import inspect
import json
import struct
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from safeloop.errors import CheckpointError
from safeloop.stepping import unwrap_optimizer

__all__ = [
    "SHARD_DIR",
    "MODEL_PREFIX",
    "SHAPES_PART",
    "ShardedState",
    "sharded_engine",
    "safetensors_problem",
    "dcp_support_problem",
    "DCP_ERRORS",
]

SHARD_DIR = "shards"
SHAPES_PART = "shard_shapes"  # the part of state.json with every sharded tensor's whole shape
MODEL_PREFIX, _OPTIM = "model.", "optim."  # DCP keys of the weights and the optimizer state
_HEADER_LIMIT = 100 * 2**20  # safetensors' own bound on a header's size

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]
try:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    DCP_ERRORS: tuple[type[BaseException], ...] = (OSError, CheckpointError, CheckpointException)
    _HF_WRITER = "save_distributed" in inspect.signature(HuggingFaceStorageWriter).parameters
except ImportError:  # a torch older than DCP's safetensors writer
    DCP_ERRORS = (OSError, CheckpointError)
    _HF_WRITER = False


def dcp_support_problem() -> str | None:
    """Why this torch cannot write sharded safetensors checkpoints, or None when it can."""
    if _HF_WRITER:
        return None
    return (
        f"sharded checkpoints need torch.distributed.checkpoint's HuggingFaceStorageWriter with "
        f"`save_distributed` (checked with torch 2.13); this torch is {torch.__version__}. Upgrade torch"
    )


def sharded_engine(accelerator: Accelerator, model: torch.nn.Module) -> str | None:
    """The sharding engine of a prepared model: ``"fsdp2"``, ``"fsdp1"``, ``"deepspeed"``, or None.

    Args:
        accelerator (`Accelerator`): the run's accelerator, after ``prepare``.
        model (`torch.nn.Module`): the prepared model.
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind != DistributedType.FSDP:
        return None
    params = list(model.parameters())
    if DTensor is not None and params and all(isinstance(p, DTensor) for p in params):
        return "fsdp2"
    return "fsdp1"


class ShardedState:
    """The model's and optimizer's shards of this process, written and read through DCP.

    Args:
        model (`torch.nn.Module`): the prepared (``fully_shard``-ed) model.
        optimizer (`torch.optim.Optimizer`): the prepared optimizer over its DTensor parameters.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = unwrap_optimizer(optimizer)
        self._options = StateDictOptions(flatten_optimizer_state_dict=True)

    def capture(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This process's shards (DTensors and replicated tensors) and the optimizer's non-tensor values."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._options)
        tensors = {MODEL_PREFIX + key: value for key, value in model_state.items()}
        values = {}
        for key, value in optim_state.items():
            if isinstance(value, torch.Tensor):
                tensors[_OPTIM + key] = value
            else:
                values[key] = value
        return tensors, values

    def write(self, tensors: dict[str, torch.Tensor], folder: Path) -> None:
        """Write the shards into ``folder`` (a collective: every process calls it with its own)."""
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))

    def load(self, folder: Path, values: dict[str, Any]) -> None:
        """Read the shards of ``folder`` into the model and optimizer (a collective).

        Args:
            folder (`Path`): the checkpoint's ``shards`` folder, verified against its manifest.
            values (`dict`): the optimizer's non-tensor values saved with it (``state.json``).
        """
        tensors, _ = self.capture()  # the live shapes and shardings to fill
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)))
        model_state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
        optim_state = {k[len(_OPTIM) :]: v for k, v in tensors.items() if k.startswith(_OPTIM)}
        optim_state.update(values)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=self._options,
        )


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a well-formed safetensors file, or None when it is.

    A safetensors file is an 8-byte little-endian header length, a JSON header whose tensors'
    ``data_offsets`` tile the rest of the file exactly, and nothing else: a file with pickled
    bytes in front of or inside it (what DCP writes for non-tensor values) fails this.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{path} is shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > min(_HEADER_LIMIT, size - 8):
            return f"{path}: header length {length} does not fit the file ({size} bytes)"
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"{path}: the header is not JSON ({err})"
    if not isinstance(header, dict):
        return f"{path}: the header is not a JSON object"
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{path}: tensor {name!r} has no valid data_offsets"
        spans.append(tuple(offsets))
    end = 0
    for start, stop in sorted(spans):
        if start != end or stop < start:
            return f"{path}: the tensors' data does not tile the file (gap or overlap at byte {start})"
        end = stop
    if 8 + length + end != size:
        return f"{path}: {size - 8 - length - end} bytes beyond the tensors' data"
    return None
