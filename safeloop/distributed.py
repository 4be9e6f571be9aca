"""The only module that runs collectives: reductions over the processes of a run.

Every function here must be called by every process, in the same order.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from accelerate import Accelerator

__all__ = [
    "reduce_across_processes",
    "settle_collectives",
    "agree_all_finite",
    "agree_any",
    "broadcast_int",
    "barrier",
    "gather_json",
    "sum_over_group",
]


def reduce_across_processes(accelerator: Accelerator, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
    """Return ``tensor`` reduced over all processes (``"sum"`` or ``"mean"``).

    Args:
        accelerator (`Accelerator`): the run's accelerator.
        tensor (`torch.Tensor`): the same shape and dtype on every process.
        reduction (`str`): ``"sum"`` or ``"mean"``.

    Returns:
        `torch.Tensor`: a new tensor; ``tensor`` itself is left unchanged. With one process,
        the input is returned as it is.
    """
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor, reduction=reduction)


def settle_collectives(accelerator: Accelerator) -> None:
    """Let the communication threads finish with every collective before ``fit`` returns.

    A gloo worker thread frees a finished collective's tensors after ``wait()`` has returned,
    and freeing a tensor that has a Python object takes the GIL. When that happens while the
    process exits, the main thread can hold the GIL while it joins that very thread (DDP's
    Reducer freeing the process group) and both wait forever: 3 of 8 runs on 2 CPU ranks with
    torch 2.13 hung at exit. A barrier, then a short sleep that releases the GIL, lets the
    workers free everything now (0 of 10 runs hung).
    """
    if accelerator.num_processes == 1:
        return
    accelerator.wait_for_everyone()
    time.sleep(0.05)


def agree_all_finite(accelerator: Accelerator, flag: torch.Tensor) -> torch.Tensor:
    """Return the minimum of a 0/1 flag over all processes (1 only if every rank is finite).

    Every rank reaches this once per optimizer step, so all of them take the same branch: a
    NaN on one rank makes every rank skip the same step. A number, as NCCL cannot reduce bool.
    """
    if accelerator.num_processes == 1:
        return flag
    agreed = flag.clone()
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    return agreed


def agree_any(accelerator: Accelerator, value: bool) -> bool:
    """Return True on every process when ``value`` is True on any (a host read: call rarely)."""
    if accelerator.num_processes == 1:
        return value
    flag = torch.tensor(int(value), dtype=torch.int32, device=accelerator.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())  # host sync: once per log_every steps


def broadcast_int(accelerator: Accelerator, value: int) -> int:
    """Return the main process's ``value`` on every process (a host read: call rarely)."""
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=accelerator.device)
    torch.distributed.broadcast(tensor, src=0)
    return int(tensor.item())


def barrier(accelerator: Accelerator) -> None:
    """Wait until every process reaches this point."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def gather_json(accelerator: Accelerator, value: Any) -> list[Any]:
    """Return every process's JSON-able ``value``, by rank (never pickled: JSON bytes in a tensor)."""
    if accelerator.num_processes == 1:
        return [value]
    data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=accelerator.device)
    sizes = [
        torch.zeros(1, dtype=torch.int64, device=accelerator.device) for _ in range(accelerator.num_processes)
    ]
    torch.distributed.all_gather(
        sizes, torch.tensor([data.numel()], dtype=torch.int64, device=accelerator.device)
    )
    longest = max(int(s.item()) for s in sizes)
    padded = torch.nn.functional.pad(data, (0, longest - data.numel()))
    parts = [torch.empty_like(padded) for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather(parts, padded)
    return [
        json.loads(bytes(part[: int(size.item())].tolist()).decode())
        for part, size in zip(parts, sizes, strict=True)
    ]


def sum_over_group(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``tensor`` in place over the processes of ``group`` and return it.

    For sharded (DTensor) parameters, whose shards live on the processes of one mesh dimension's
    group (``device_mesh.get_group(dim)``), which may be fewer than the run's processes (HSDP).
    Every process of ``group`` must call it, in the same order.
    """
    torch.distributed.all_reduce(tensor, group=group)
    return tensor
