"""Which per-parameter diagnostics a sharded run can have, and how its shards add up.

Under FSDP2 (``fully_shard``) every parameter is a DTensor: each process holds a shard of it
and, after the backward's reduce-scatter, the matching shard of its gradient: exactly the
gradient its optimizer uses. Squared norms of shards add up to the squared norm of the whole
tensor, so per-parameter gradient norms and update ratios can be had from local shards and one
sum over processes. FSDP1 and DeepSpeed flatten parameters into flat buffers whose shards say
nothing about one parameter: there, per-parameter statistics stay off and the reason is logged.
Nothing here runs a collective or reads a tensor on the host.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

try:
    from torch.distributed.tensor import DTensor, Shard

    _DTENSOR: tuple[type, ...] = (DTensor,)
except ImportError:  # a torch built without distributed support has no sharded tensors
    _DTENSOR = ()

__all__ = ["ShardLayout", "shard_layout"]

_OFF = (
    "per-parameter gradient norms, update ratios, weight health and the first-batch gradient-reach "
    "check are off; the global gradient norm, exploding-grad and loss-plateau checks run"
)


@dataclass(frozen=True)
class ShardLayout:
    """How the diagnostics see the parameters of a run.

    Attributes:
        sharded (`bool`): parameters are shards (FSDP or DeepSpeed).
        shard_count (`int | None`): FSDP2: the number of shards of each parameter. The mean over
            all processes of a squared shard norm, times this, is the squared norm of the whole
            tensor. None when parameters are not DTensor shards.
        per_param (`bool`): per-parameter gradient norms and update ratios can be measured.
        gradient_reach (`bool`): ``.grad is None`` means "no gradient" on every process alike.
        reason (`str | None`): why per-parameter statistics are off, for the log.
    """

    sharded: bool
    shard_count: int | None = None
    per_param: bool = True
    gradient_reach: bool = True
    reason: str | None = None


def shard_layout(accelerator: Accelerator, params: Iterable[torch.nn.Parameter]) -> ShardLayout:
    """Return what the diagnostics can measure on ``params`` under ``accelerator``.

    Args:
        accelerator (`Accelerator`): the run's accelerator, after ``prepare``.
        params (`Iterable[torch.nn.Parameter]`): the unwrapped model's parameters.

    Returns:
        `ShardLayout`: unsharded for DDP and single-process runs; per-parameter statistics
        from shards under FSDP2; off, with the reason, under FSDP1 and DeepSpeed.

    Example:
        >>> layout = shard_layout(trainer.accelerator, model.parameters())  # FSDP2, 2 processes
        >>> layout.per_param, layout.shard_count
        (True, 2)
    """
    kind = accelerator.distributed_type
    if kind not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return ShardLayout(sharded=False)
    if kind == DistributedType.DEEPSPEED:
        # ZeRO partitions gradients inside its engine and `.grad` is not populated in time;
        # `deepspeed.utils.safe_get_full_grad` would gather every full gradient (one collective
        # per parameter per read), and no DeepSpeed run can test it here
        return _off(f"DeepSpeed ZeRO keeps gradients in its engine's partitioned buffers: {_OFF}.")
    trainable = [p for p in params if p.requires_grad]
    if not trainable or not all(isinstance(p, _DTENSOR) for p in trainable):
        return _off(
            "FSDP1 flattens each wrapped module's parameters into one FlatParameter (with "
            "`use_orig_params=True` each parameter is a flat, possibly empty, slice of its rank's "
            f"shard): {_OFF}. FSDP2 (`FullyShardedDataParallelPlugin(fsdp_version=2)`) has them all."
        )
    counts = {_shard_count(p) for p in trainable}
    if len(counts) != 1:
        return _off(
            f"the parameters are sharded over different numbers of processes ({sorted(counts)}), "
            f"so one sum over processes cannot restore their norms: {_OFF}."
        )
    return ShardLayout(sharded=True, shard_count=counts.pop())


def _shard_count(param: torch.nn.Parameter) -> int:
    """How many distinct shards the mesh cuts ``param`` into (replicated mesh dims copy them)."""
    mesh, placements = param.device_mesh, param.placements  # type: ignore[attr-defined]
    return math.prod(mesh.size(d) for d, p in enumerate(placements) if isinstance(p, Shard))


def _off(reason: str) -> ShardLayout:
    return ShardLayout(sharded=True, per_param=False, gradient_reach=False, reason=reason)
