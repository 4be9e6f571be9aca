"""Which per-parameter diagnostics a sharded run can have, and how its shards add up.

Under FSDP2 (``fully_shard``) every parameter is a DTensor: each process holds a shard of it
and, after the backward's reduce-scatter, the matching shard of its gradient: exactly the
gradient its optimizer uses. Squared norms of shards add up to the squared norm of the whole
tensor, so per-parameter gradient norms and update ratios can be had from local shards and one
sum over processes.

FSDP1 with ``use_orig_params=True`` keeps the original parameters, but each is a flat view of
its slice of its rank's shard of a ``FlatParameter`` (possibly empty), and so is its ``.grad``
after the reduce-scatter. The slices of one parameter over the processes of a shard group
partition it, so the same sum of squares restores its norms; its whole shape (a weight or not,
how many elements) comes from the ``FlatParameter`` that holds it, read once here. FSDP1 with
``use_orig_params=False`` exposes only the ``FlatParameter`` s: there per-parameter statistics
stay off and the reason is logged.

DeepSpeed ZeRO-1/2/3 partitions each reduced gradient and each fp32 master weight over the
data-parallel processes; ``safeloop.zero`` reads this process's partitions (``ShardLayout.local``),
and the same sum of squares restores whole norms. ``.grad`` is not where ZeRO keeps gradients, so
the first-batch gradient-reach check watches gradient accumulation with hooks instead
(``reach_hooks``). ZeRO stage 0 keeps whole parameters and reduced ``.grad`` s: unsharded.
Nothing here runs a collective or reads a tensor on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from safeloop.guards.flat_slices import fsdp1_units
from safeloop.zero import ZeroEngine

try:
    from torch.distributed.fsdp import FlatParameter
    from torch.distributed.tensor import DTensor, Shard

    _DTENSOR: tuple[type, ...] = (DTensor,)
    _FLAT: tuple[type, ...] = (FlatParameter,)
except ImportError:  # a torch built without distributed support has no sharded tensors
    _DTENSOR = _FLAT = ()

__all__ = ["ShardLayout", "shard_layout", "unwrapped_name"]

# the attribute under which FSDP1 holds the module it wraps: it stays in the parameter names of
# modules wrapped inside the root (auto-wrap), which `unwrap_model` does not strip
_FSDP1_PREFIX = "_fsdp_wrapped_module."
# activation checkpointing's wrapper (FSDP1 under Lightning's `activation_checkpointing_policy`)
_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."

_OFF = (
    "per-parameter gradient norms, update ratios, weight health and the first-batch gradient-reach "
    "check are off; the global gradient norm, exploding-grad and loss-plateau checks run"
)


@dataclass(frozen=True)
class ShardLayout:
    """How the diagnostics see the parameters of a run.

    Attributes:
        sharded (`bool`): parameters are shards (FSDP or DeepSpeed).
        shard_count (`int | None`): FSDP2 and FSDP1 with ``use_orig_params=True``: the number of
            shards of each parameter. The mean over all processes of a squared shard norm, times
            this, is the squared norm of the whole tensor. None when parameters are not shards.
        per_param (`bool`): per-parameter gradient norms and update ratios can be measured.
        gradient_reach (`bool`): ``.grad is None`` means "no gradient" on every process alike.
        reason (`str | None`): why per-parameter statistics are off, for the log.
        shapes (`tuple[torch.Size, ...] | None`): FSDP1 and DeepSpeed ZeRO: the whole shape of
            every parameter, in ``params`` order, where a parameter's own shape is that of its
            local slice (or a placeholder). None where a parameter's own shape is whole
            (DTensors, unsharded runs).
        local (`Callable | None`): DeepSpeed ZeRO: this process's part of a parameter's fp32
            master weight (flat, possibly empty); None where the parameter itself (or its
            DTensor's local shard) is that part.
        reach_hooks (`bool`): ``.grad`` is never set, but gradient accumulation hooks fire on
            every process for the parameters its backward reached (DeepSpeed ZeRO).
    """

    sharded: bool
    shard_count: int | None = None
    per_param: bool = True
    gradient_reach: bool = True
    reason: str | None = None
    shapes: tuple[torch.Size, ...] | None = None
    local: Callable[[torch.nn.Parameter], torch.Tensor] | None = None
    reach_hooks: bool = False


def shard_layout(
    accelerator: Accelerator,
    params: Iterable[torch.nn.Parameter],
    model: torch.nn.Module | None = None,
    zero: ZeroEngine | None = None,
) -> ShardLayout:
    """Return what the diagnostics can measure on ``params`` under ``accelerator``.

    Args:
        accelerator (`Accelerator`): the run's accelerator, after ``prepare``.
        params (`Iterable[torch.nn.Parameter]`): the unwrapped model's parameters.
        model (`torch.nn.Module`, *optional*): the prepared model. FSDP1 needs it: the whole
            shapes of the parameters are in the ``FlatParameter`` s of its FSDP modules.
        zero (`ZeroEngine`, *optional*): the trainer's DeepSpeed engine (DeepSpeed needs it).

    Returns:
        `ShardLayout`: unsharded for DDP, single-process runs and ZeRO stage 0; per-parameter
        statistics from shards under FSDP2, FSDP1 with ``use_orig_params=True`` and ZeRO-1/2/3;
        off, with the reason, under FSDP1 with ``use_orig_params=False``.

    Example:
        >>> layout = shard_layout(trainer.accelerator, model.parameters())  # FSDP2, 2 processes
        >>> layout.per_param, layout.shard_count
        (True, 2)
    """
    kind = accelerator.distributed_type
    if kind not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return ShardLayout(sharded=False)
    if kind == DistributedType.DEEPSPEED:
        return _zero_layout(accelerator, zero)
    params = list(params)
    trainable = [p for p in params if p.requires_grad]
    if trainable and any(isinstance(p, _FLAT) for p in params):
        return _off(
            "FSDP1 with `use_orig_params=False` flattens each wrapped module's parameters into one "
            f"FlatParameter: {_OFF}. `FullyShardedDataParallelPlugin(use_orig_params=True)` or "
            "FSDP2 (`fsdp_version=2`) has them all."
        )
    if trainable and not any(isinstance(p, _DTENSOR) for p in trainable):
        return _fsdp1_layout(params, model)
    if not trainable or not all(isinstance(p, _DTENSOR) for p in trainable):
        return _off(f"some trainable parameters are DTensor shards and some are not: {_OFF}.")
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


def unwrapped_name(name: str) -> str:
    """``name`` without FSDP1's and activation checkpointing's wrapper attributes: the model's own name.

    Example:
        >>> unwrapped_name("0._fsdp_wrapped_module.weight")
        '0.weight'
        >>> unwrapped_name("0._fsdp_wrapped_module._checkpoint_wrapped_module.weight")
        '0.weight'
    """
    return name.replace(_FSDP1_PREFIX, "").replace(_CHECKPOINT_PREFIX, "")


def _fsdp1_layout(params: list[torch.nn.Parameter], model: torch.nn.Module | None) -> ShardLayout:
    """FSDP1 with ``use_orig_params=True``: each parameter is its rank's flat slice of it."""
    if model is None or not _FLAT:
        return _off(f"FSDP1 parameters without the prepared model to read their shapes from: {_OFF}.")
    units = fsdp1_units(model)
    if units is None:
        return _off(f"this torch's FSDP1 does not say which parameters its FlatParameters hold: {_OFF}.")
    shapes: dict[int, torch.Size] = {}
    counts: set[int] = set()
    for unit in units:
        shapes.update((id(p), s) for p, s in zip(unit.params, unit.shapes, strict=True))
        # the gradient is reduce-scattered over the shard group (within a node under HYBRID_SHARD,
        # whose replicas then hold equal copies); NO_SHARD leaves every process a whole copy
        counts.add(unit.group.size() if unit.sharded and unit.group is not None else 1)
    missing = [p for p in params if p.requires_grad and id(p) not in shapes]
    if missing:
        return _off(
            f"{len(missing)} trainable parameters are outside FSDP1's FlatParameters (`ignored_modules`), "
            f"so their gradients are not reduced over processes: {_OFF}."
        )
    if len(counts) != 1:
        return _off(
            f"the parameters are sharded over different numbers of processes ({sorted(counts)}), "
            f"so one sum over processes cannot restore their norms: {_OFF}."
        )
    # a frozen parameter of an ignored module keeps its whole shape
    whole_shapes = tuple(shapes.get(id(p), p.shape) for p in params)
    if any(p.numel() > s.numel() for p, s in zip(params, whole_shapes, strict=True)):
        return _off(f"FSDP1's recorded shapes do not fit its parameters' slices: {_OFF}.")
    # a process whose slice of a parameter is empty holds `.grad = None` for it: not "no gradient"
    return ShardLayout(sharded=True, shard_count=counts.pop(), gradient_reach=False, shapes=whole_shapes)


def _zero_layout(accelerator: Accelerator, zero: ZeroEngine | None) -> ShardLayout:
    """DeepSpeed: partitions of every parameter over the data-parallel processes (ZeRO-1/2/3)."""
    if zero is None:
        return _off(f"DeepSpeed without the trainer's engine to read its partitions from: {_OFF}.")
    if not zero.partitioned:
        return ShardLayout(sharded=False)
    processes = int(getattr(zero.engine, "dp_world_size", accelerator.num_processes))
    if processes != accelerator.num_processes:
        # the diagnostics sum over all processes; partitions cover a parameter once per data-parallel group
        return _off(
            f"ZeRO partitions over {processes} data-parallel processes of {accelerator.num_processes}, "
            f"so one sum over all processes cannot restore the norms: {_OFF}."
        )
    return ShardLayout(
        sharded=True,
        shard_count=processes,
        gradient_reach=False,
        shapes=zero.whole_shapes(),
        local=zero.local_param,
        reach_hooks=True,
    )


def _off(reason: str) -> ShardLayout:
    return ShardLayout(sharded=True, per_param=False, gradient_reach=False, reason=reason)
