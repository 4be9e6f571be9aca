"""Copies of a process's shards in host memory, for a save written while training goes on.

An asynchronous sharded save writes its shards in a background thread while the next optimizer
steps run. What ``capture`` returns aliases the live state: FSDP2's DTensors and FSDP1's
ShardedTensors hold views of the parameters and of the optimizer's moments, which the next
``optimizer.step()`` changes in place. :class:`HostStaging` copies every tensor into host memory
of its own (pinned when it comes from a GPU, so that the copies run at full speed and the step
boundary waits only for them), keeping the wrapper each tensor came in (DTensor, ShardedTensor),
which tells ``torch.distributed.checkpoint`` where the shard sits in the whole tensor. No copy
shares memory with the live state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]
try:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
except ImportError:  # the same
    ShardedTensor = None  # type: ignore[assignment,misc]

__all__ = ["HostStaging", "ShardWrite"]


class _ShardOwner(Protocol):
    """What writes a process's shards: ``ShardedState`` (DCP) or ``ZeroState`` (DeepSpeed)."""

    def copy_to_host(self, tensors: dict[str, Any]) -> dict[str, Any]: ...

    def write(
        self, tensors: dict[str, Any], folder: Path, group: Any = None
    ) -> dict[str, list[str]] | None: ...


class ShardWrite:
    """One process's shards of one checkpoint, to be written now or, once staged, in the background.

    Args:
        owner (`ShardedState | ZeroState`): what took the shards and writes them.
        tensors (`dict[str, Any]`): the shards ``owner.capture()`` took (they may alias the live
            state until :meth:`stage` copies them).
    """

    def __init__(self, owner: _ShardOwner, tensors: dict[str, Any]) -> None:
        self.owner = owner
        self.tensors = tensors

    def stage(self) -> None:
        """Replace the shards by copies in host memory that nothing else holds (the step boundary's wait)."""
        self.tensors = self.owner.copy_to_host(self.tensors)

    def write(self, folder: Path, group: Any = None) -> dict[str, list[str]] | None:
        """Write the shards into ``folder`` (a collective over ``group``, None: the default one).

        Returns:
            `dict[str, list[str]] | None`: the chunk digests taken while writing, by file name
            (None: the files are hashed from disk).
        """
        return self.owner.write(self.tensors, folder, group)


class HostStaging:
    """Host-memory copies of one process's shards, in buffers kept from one save to the next.

    The buffers are allocated at the first save (pinned for tensors on a GPU) and filled again at
    each later one: the step boundary then waits for the copies alone, not for the allocation and
    the first touch of every page (on 2 CPU processes, 151 MB each: 0.018 s best, 0.022 s median
    against 0.026 s / 0.070 s with fresh memory each time). The cost is host memory for one copy of
    the shards between saves too.

    A buffer is filled again only by the next :meth:`copies`, which the caller makes once the
    previous copies are written (the checkpoint manager waits for the save in flight first).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def copies(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """Host copies of ``tensors`` (plain tensors, DTensors, ShardedTensors), by name.

        Every copy is contiguous and shares no memory with the live tensors, which may change as
        soon as this returns. Copies from a GPU are made without blocking, then one
        synchronisation waits for all of them.

        Raises:
            TypeError: a value that is not a tensor (the caller keeps those out).
        """
        waits: set[torch.device] = set()
        kept, self._buffers = self._buffers, {}  # buffers of names no longer saved are let go
        with torch.no_grad():
            staged = {
                name: self._stage(name, value, kept.get(name), waits) for name, value in tensors.items()
            }
        for device in waits:  # the non-blocking copies are complete before anyone reads them
            torch.cuda.synchronize(device)
        return staged

    def _stage(self, name: str, value: Any, buffer: torch.Tensor | None, waits: set[torch.device]) -> Any:
        if DTensor is not None and isinstance(value, DTensor):
            # the same shard of the same whole tensor (mesh, placements, whole shape and strides),
            # over a copy of this process's piece: nothing is communicated
            local = self._copy(name, value.to_local(), buffer, waits)
            return DTensor.from_local(
                local, value.device_mesh, value.placements, run_check=False, shape=value.shape,
                stride=value.stride(),
            )  # fmt: skip
        if ShardedTensor is not None and isinstance(value, ShardedTensor):
            # FSDP1's: torch's own copy of a ShardedTensor (its local shards copied, its metadata
            # kept with the placements on the host), into fresh memory each time
            return value.to(device="cpu", copy=True)
        if isinstance(value, torch.Tensor):
            return self._copy(name, value, buffer, waits)
        raise TypeError(
            f"cannot stage {name!r} for an asynchronous save: a {type(value).__name__}, not a tensor. "
            "Only tensors go into shard files; this is a safeloop bug, please report it"
        )

    def _copy(
        self, name: str, tensor: torch.Tensor, buffer: torch.Tensor | None, waits: set[torch.device]
    ) -> torch.Tensor:
        # a contiguous buffer of exactly the tensor's bytes (pinned for a GPU's): the shard writer
        # writes it as it is, where it copies a view into a larger buffer (a padded FSDP2 shard)
        # or a strided tensor once more
        pinned = tensor.device.type == "cuda"
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pinned)
        buffer.copy_(tensor.detach(), non_blocking=pinned and buffer.is_pinned())
        if pinned:
            waits.add(tensor.device)
        self._buffers[name] = buffer
        return buffer
