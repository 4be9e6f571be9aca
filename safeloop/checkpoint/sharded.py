"""Sharded model and optimizer state (FSDP) through ``torch.distributed.checkpoint``, in safetensors.

Under FSDP2 (``fully_shard``) and FSDP1 every process holds a shard of each parameter and of its
optimizer state. ``get_state_dict`` (flattened optimizer state) gives them as DTensors (FSDP2) or
ShardedTensors (FSDP1's sharded state dict), both split by rows the same way; every
process writes its own shards in the layout of ``HuggingFaceStorageWriter(save_distributed=True)``,
one ``shards/shard-0000N-model-00001-of-00001.safetensors`` each, whose header holds the shard's
offsets as JSON, streamed to disk by ``_StreamingShardWriter`` (torch's writer builds each file
in memory first). Non-tensor values (param-group hyper-parameters: lr, betas, ...) are never handed
to DCP, which would ``torch.save`` them into the file: they go to ``state.json`` beside the shards.
With consolidation off no ``.metadata`` file is written, so no pickle reaches the disk. Loading
builds the same flattened state dict from the live model and optimizer (the shapes and shardings
to fill) and lets ``HuggingFaceStorageReader`` read each shard's slices, at any world size.

Every DCP call of safeloop is in this module. ``CheckpointException`` derives from
``BaseException``, so it is caught by name.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from safeloop.checkpoint.hashed_write import save_hashed
from safeloop.checkpoint.staging import HostStaging
from safeloop.errors import CheckpointError
from safeloop.stepping import unwrap_optimizer

__all__ = [
    "SHARD_DIR",
    "MODEL_PREFIX",
    "SHARD_INFO_PART",
    "ShardedState",
    "ShardSnapshot",
    "shard_file_name",
    "sharded_engine",
    "safetensors_problem",
    "dcp_support_problem",
    "DCP_ERRORS",
]

SHARD_DIR = "shards"
# the part of state.json about the shards: every tensor's whole shape ("shapes") and whether the
# optimizer had no state yet when they were taken ("fresh_optimizer")
SHARD_INFO_PART = "shard_info"
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
    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    DCP_ERRORS: tuple[type[BaseException], ...] = (OSError, CheckpointError, CheckpointException)
    _HF_WRITER = "save_distributed" in inspect.signature(HuggingFaceStorageWriter).parameters
except ImportError:  # a torch older than DCP's safetensors writer
    DCP_ERRORS = (OSError, CheckpointError)
    _HF_WRITER = False
    HuggingFaceStorageWriter = object  # type: ignore[assignment,misc]  # the base below; never built

# the header metadata HuggingFaceStorageWriter(save_distributed=True) gives a shard file, which
# HuggingFaceStorageReader reads back: every tensor's offsets in the whole one, as JSON
_SHARDING_KEY, _VERSION_KEY, _VERSION, _FORMAT = "DCP_SHARDING_INFO", "DCP_VERSION", "1.0", "pt"


def shard_file_name(shard_index: int) -> str:
    """The file the process with DCP's ``shard_index`` (from 1) writes, as torch's writer names it."""
    return f"shard-{shard_index:05d}-model-00001-of-00001.safetensors"


@dataclass
class _ShardSpan:
    """Where one tensor's bytes went (what DCP's results carry; nothing reads it back here)."""

    relative_path: str
    offset: int
    length: int


class _StreamingShardWriter(HuggingFaceStorageWriter):  # type: ignore[misc,valid-type]
    """``HuggingFaceStorageWriter(save_distributed=True)`` that writes each file with ``save_file``.

    torch's writer serialises a process's whole shard file into memory (``safetensors.torch.save``,
    then a copy into ``bytes``) and then writes it: extra copies of every byte, which made a save
    1.5-2.4x DCP's default writer on 2 CPU processes. ``save_file`` writes from the tensors' own
    memory. The plan (torch's), the file's name, its tensors' bytes and its header (names, dtypes,
    shapes, ``DCP_SHARDING_INFO`` offsets, version and format) are what torch's writer gives, so
    ``HuggingFaceStorageReader`` reads files of either. A plan shaped otherwise than this torch's
    writer shapes it (another torch) is left to torch's own code.

    Each file is hashed as it is written (``hashed_write.py``): :attr:`digests` holds the chunk
    digests of the files this process wrote, by name, for the manifest (none for a file left to
    torch's code, which is hashed from disk later).
    """

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), save_distributed=True)
        self.digests: dict[str, list[str]] = {}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this process's shard file and fsync it (nothing when it holds no tensor)."""
        planned = plan.storage_data  # what torch's prepare_global_plan gave this process
        shard_index = planned.get("shard_index") if isinstance(planned, dict) else None
        if not isinstance(shard_index, int) or planned.get("fqn_to_index_mapping") is not None:
            return super().write_data(plan, planner)
        name = shard_file_name(shard_index)
        tensors: dict[str, torch.Tensor] = {}
        offsets: dict[str, dict[str, list[int]]] = {}
        results = []
        storages: set[int] = set()
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
                # torch would pickle it into the file; ShardSnapshot keeps such values out
                raise CheckpointError(f"{item.index.fqn!r} is not a tensor: it cannot go into a shard file")
            tensor = planner.resolve_data(item).detach().cpu()
            storage = tensor.untyped_storage()
            if (
                storage.nbytes() != tensor.nbytes
                or storage.data_ptr() in storages
                or not tensor.is_contiguous()
            ):
                # safetensors refuses tensors that share memory: a view into a larger buffer (a
                # padded shard, a flat parameter) is copied out, as torch's writer does, and so is
                # one tensor under a second name (FSDP1 with use_orig_params=False gives every
                # parameter of a FlatParameter the same `step`), which torch's writer fails on;
                # a strided view is made contiguous (save_file refuses it too)
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[item.index.fqn] = tensor
            offsets[item.index.fqn] = {"saved_offsets": list(item.tensor_data.chunk.offsets)}
            results.append(WriteResult(item.index, tensor.nbytes, _ShardSpan(name, 0, tensor.nbytes)))
        if tensors:  # fsynced (durable before the folder is published) and hashed for the manifest
            metadata = {_SHARDING_KEY: json.dumps(offsets), _VERSION_KEY: _VERSION, "format": _FORMAT}
            self.digests[name] = save_hashed(tensors, Path(self.path) / name, metadata)
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done


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


@dataclass
class ShardSnapshot:
    """One process's part of a sharded checkpoint, taken at a step boundary.

    Attributes:
        tensors (`dict[str, torch.Tensor]`): ``model.*`` and ``optim.*`` shards for DCP.
        values (`dict[str, Any]`): the optimizer's non-tensor values (JSON, never handed to DCP).
        shapes (`dict[str, list[int]]`): every tensor's whole shape, which the shard headers
            cannot vouch for (a lost last shard leaves a smaller tensor that still tiles).
        fresh_optimizer (`bool`): the optimizer had no state yet (before the first step); its
            ``optim.state.*`` tensors are DCP's placeholders.
    """

    tensors: dict[str, torch.Tensor]
    values: dict[str, Any]
    shapes: dict[str, list[int]]
    fresh_optimizer: bool = False


@contextlib.contextmanager
def _quiet_internals() -> Iterator[None]:
    """Silence what torch's FSDP1 state-dict code warns about itself at every save.

    Its ``ShardedTensor`` deprecation and process-group device notes are about torch's own
    internals, and no action of the user changes them.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ShardedTensor", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*_get_pg_default_device", category=UserWarning)
        warnings.filterwarnings("ignore", message="Multiple backends are registered", category=UserWarning)
        yield


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
        self._staging = HostStaging()  # an asynchronous save's copies, in buffers kept between saves

    def _live_state(self, options: StateDictOptions) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """``get_state_dict`` of the live model and optimizer, and whether the optimizer was fresh.

        DCP gives an optimizer without state one by an ``optimizer.step()`` at lr 0 on zero
        gradients. That step counts: AdamW's ``step`` would start at 1 and every later update
        would differ from an uncheckpointed run's. A fresh optimizer is made fresh again.
        """
        fresh = not self.optimizer.state
        with _quiet_internals():
            model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        if fresh:
            self.optimizer.state.clear()
        return model_state, optim_state, fresh

    def capture(self) -> ShardSnapshot:
        """This process's shards, the optimizer's non-tensor values and every tensor's whole shape."""
        model_state, optim_state, fresh = self._live_state(self._options)
        with _quiet_internals():
            tensors = {MODEL_PREFIX + key: value for key, value in model_state.items()}
            values = {}
            for key, value in optim_state.items():
                if isinstance(value, torch.Tensor):
                    tensors[_OPTIM + key] = value
                else:
                    values[key] = value
            shapes = {key: list(tensor.shape) for key, tensor in tensors.items()}  # global, not local
        return ShardSnapshot(tensors, values, shapes, fresh)

    def copy_to_host(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """Copies of ``tensors`` in host memory that the next optimizer step cannot change.

        The buffers of the previous call are filled again: call it once its copies are written.
        """
        with _quiet_internals():  # ShardedTensor.to warns of ShardedTensor itself
            return self._staging.copies(tensors)

    def write(self, tensors: dict[str, Any], folder: Path, group: Any = None) -> dict[str, list[str]]:
        """Write the shards into ``folder`` (a collective: every process calls it with its own).

        Args:
            tensors (`dict`): this process's shards (``capture``, or staged copies of them).
            folder (`Path`): the checkpoint's ``shards`` folder.
            group (`ProcessGroup`, *optional*): the group DCP plans the save over (a background
                save's own); None: the default group.

        Returns:
            `dict[str, list[str]]`: the chunk digests of the files this process wrote, by name in
            ``folder``, taken as they were written (see ``hashed_write.py``).
        """
        writer = _StreamingShardWriter(folder)
        # the warning filters are global: a background thread leaves them alone (what it would
        # silence comes from the state-dict calls of the step boundary, not from dcp.save)
        with _quiet_internals() if group is None else contextlib.nullcontext():
            dcp.save(tensors, storage_writer=writer, process_group=group)
        return dict(writer.digests)

    def load(self, folder: Path, values: dict[str, Any], fresh: bool = False) -> None:
        """Read the shards of ``folder`` into the model and optimizer (a collective).

        Args:
            folder (`Path`): the checkpoint's ``shards`` folder, verified against its manifest.
            values (`dict`): the optimizer's non-tensor values saved with it (``state.json``).
            fresh (`bool`, *optional*, defaults to False): the optimizer had no state when it
                was saved (before the first step): it has none after loading either.
        """
        tensors = self.capture().tensors  # the live shapes and shardings to fill
        with _quiet_internals():
            dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)))
        model_state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
        flat = {k[len(_OPTIM) :]: v for k, v in tensors.items() if k.startswith(_OPTIM)}
        self._set(model_state, self._unflatten({**flat, **values}), StateDictOptions(), fresh)

    def _set(
        self, model_state: dict[str, Any], optim_state: dict[str, Any], options: StateDictOptions, fresh: bool
    ) -> None:
        """``set_state_dict``; a checkpoint of a fresh optimizer leaves it fresh (no placeholder state)."""
        with _quiet_internals():
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=model_state,
                optim_state_dict=optim_state,
                options=options,
            )
        if fresh:  # the hyper-parameters are loaded; the placeholder state goes
            self.optimizer.state.clear()

    def _unflatten(self, flat: dict[str, Any]) -> dict[str, Any]:
        """The optimizer state dict (by parameter name) of a flattened one, as saved.

        DCP's own unflattening keeps, per parameter, only the state names the live optimizer
        holds for it. Under FSDP1 a parameter with no elements in this process's shard has no
        state here, while another process's has: their loads would then disagree on the
        collectives they run, and the processes fail. Every name saved is kept here instead.
        """
        _, live, _ = self._live_state(StateDictOptions())  # the parameter names of each group
        state: dict[str, dict[str, Any]] = {}
        groups = []
        for group in live["param_groups"]:
            names = list(group["params"])
            for name in names:
                prefix = f"state.{name}."
                state[name] = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
            # a hyper-parameter the saving torch did not know keeps this one's value
            hyper = {
                k: flat.get(f"param_groups.{names[0]}.{k}", v) for k, v in group.items() if k != "params"
            }
            groups.append({**(hyper if names else group), "params": names})
        return {"state": {name: value for name, value in state.items() if value}, "param_groups": groups}

    def load_whole(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any]) -> None:
        """Load an unsharded checkpoint's whole state into this run's shards (a collective).

        The saved optimizer state names parameters by position (``optimizer.state_dict()``);
        the live optimizer, built over the same model the same way, gives the name at each
        position. Every process holds the whole tensors while they are sharded out.

        Raises:
            CheckpointError: the saved optimizer's groups differ from the live one's.
        """
        whole = StateDictOptions(full_state_dict=True)
        _, live, _ = self._live_state(whole)  # the names of the parameters, by position
        saved_groups, live_groups = optimizer_state["param_groups"], live["param_groups"]
        sizes = [len(g["params"]) for g in saved_groups], [len(g["params"]) for g in live_groups]
        if sizes[0] != sizes[1]:
            raise CheckpointError(
                f"the checkpoint's optimizer has parameter groups of sizes {sizes[0]}, this run's "
                f"{sizes[1]}: it was built over another model, or another way"
            )
        name_of = {
            index: name
            for saved, current in zip(saved_groups, live_groups, strict=True)
            for index, name in zip(saved["params"], current["params"], strict=True)
        }
        optim_state = {
            "state": {name_of[int(index)]: value for index, value in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in saved_groups],
        }
        self._set(model_state, optim_state, whole, fresh=not optimizer_state["state"])


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
