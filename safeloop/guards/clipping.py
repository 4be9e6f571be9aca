"""Gradient clipping and the one global gradient norm of an optimizer step.

The norm is measured once per optimizer step, before clipping, and kept on the device: the
same tensor feeds logging and the NaN/Inf guard. Nothing here reads a tensor on the host.
Under FSDP2, and FSDP1 with ``use_orig_params=True``, the per-parameter norms are those of this
process's shard (or flat slice) of each gradient (the reduce-scattered gradient the optimizer
uses); the diagnostics combine them over processes.

When the norm clips, it is torch's own (the update stays bitwise ``clip_grad_norm_``'s). When it
only measures (no ``max_norm``), float32 gradients on the CPU take one BLAS ``dot`` each, about
a third fewer instructions than ``torch._foreach_norm`` per step; the values agree with torch's to
float32 rounding (the order of the additions differs), and overflow (past 1e19) and underflow
(below 1e-22) alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

try:
    from torch.distributed.fsdp import FlatParameter
    from torch.distributed.tensor import DTensor

    _DTENSOR: tuple[type, ...] = (DTensor,)
    _FLAT: tuple[type, ...] = (FlatParameter,)
except ImportError:  # a torch built without distributed support has no sharded tensors
    _DTENSOR = _FLAT = ()

__all__ = [
    "GradNorms",
    "grad_norms",
    "shard_grad_norms",
    "squared_norms",
    "clip_and_measure",
    "measure_and_clip",
]

# Under these, gradients are sharded: a local norm would be wrong, so the norm comes from
# Accelerate's sharding-aware clip with an infinite bound (a multiply by exactly 1.0).
_SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


@dataclass(frozen=True)
class GradNorms:
    """Gradient norms of one step, on the device.

    Attributes:
        total (`torch.Tensor`): the global L2 norm, 0-dim.
        per_param (`torch.Tensor | None`): the L2 norm of each parameter's gradient, in
            ``parameters`` order, 0.0 for parameters without one. Under FSDP2 and FSDP1 with
            ``use_orig_params=True`` the norm of this process's shard of each gradient (see
            :func:`shard_grad_norms`); None under FSDP1 with ``use_orig_params=False`` and
            DeepSpeed, whose parameters are flattened.
    """

    total: torch.Tensor
    per_param: torch.Tensor | None = None


def squared_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The squared L2 norm of each tensor, as float32 0-dim tensors on its device.

    float32 and float64 tensors take one BLAS ``dot`` each: about half the instructions of
    ``torch._foreach_norm``'s reduction on a CPU. Half-precision ones accumulate in float32 (a
    half-precision dot would overflow). A NaN or Inf element gives NaN or Inf, as the norm does.

    Example:
        >>> squared_norms([torch.tensor([3.0, 4.0])])
        [tensor(25.)]
    """
    squares = []
    for tensor in tensors:
        if tensor.dtype == torch.float32:  # no .float(): a call per tensor, every step, for nothing
            flat = tensor.reshape(-1)
            squares.append(torch.dot(flat, flat))
        elif tensor.dtype == torch.float64:
            flat = tensor.reshape(-1)
            squares.append(torch.dot(flat, flat).float())
        else:
            squares.append(torch.linalg.vector_norm(tensor, dtype=torch.float32).square())
    return squares


def _measured_by_dot(grads: list[torch.Tensor]) -> bool:
    # CPU float32 only: on a GPU one _foreach_norm launch beats a kernel per gradient, and float64
    # or half-precision norms keep torch's own accumulation
    return all(g.dtype == torch.float32 and g.device.type == "cpu" for g in grads)


def grad_norms(parameters: Iterable[torch.nn.Parameter], *, exact: bool = True) -> GradNorms:
    """Return the global gradient norm and the norm of each gradient.

    With ``exact`` the total is computed exactly as ``torch.nn.utils.get_total_norm`` does (same
    grouping by device and dtype, same kernels, same summation order), so clipping with it is
    bitwise equal to ``torch.nn.utils.clip_grad_norm_``; the per-parameter norms come for free.
    Without it (a norm that only measures), float32 CPU gradients take one ``dot`` each
    (:func:`squared_norms`): the same values to float32 rounding, in fewer instructions.

    Args:
        parameters (`Iterable[torch.nn.Parameter]`): parameters whose ``.grad`` to measure.
        exact (`bool`, *optional*, defaults to True): bitwise torch's norm (needed to clip with it).

    Returns:
        `GradNorms`: total 0.0 when no parameter has a gradient.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> grad_norms([p]).total
        tensor(5.)
    """
    params = list(parameters)
    positions = [i for i, p in enumerate(params) if p.grad is not None]
    grads = [params[i].grad for i in positions]
    if not grads:
        return GradNorms(total=torch.zeros((), device=params[0].device if params else None))
    if not exact and len(grads) == len(params) and _measured_by_dot(grads):  # type: ignore[arg-type]
        squares = torch.stack(squared_norms(grads))  # type: ignore[arg-type]
        return GradNorms(total=squares.sum().sqrt(), per_param=squares.sqrt())
    first_device = grads[0].device
    grouped = _group_tensors_by_device_and_dtype([grads], with_indices=True)  # type: ignore[list-item]
    norms: list[torch.Tensor] = []
    order: list[int] = []
    for (device, _), ([device_grads], indices) in grouped.items():
        if _has_foreach_support(device_grads, device):
            norms.extend(torch._foreach_norm(device_grads, 2.0))
        else:
            norms.extend(torch.linalg.vector_norm(g, 2.0) for g in device_grads)
        order.extend(indices)
    if len(grouped) == 1:  # one device and dtype: no per-norm device check (this runs every step)
        stacked = torch.stack(norms)
    else:
        stacked = torch.stack(
            [norm if norm.device == first_device else norm.to(first_device) for norm in norms]
        )
    total = torch.linalg.vector_norm(stacked, 2.0)
    if len(positions) == len(params) and order == sorted(order):
        # every parameter has a gradient, one device and dtype (the usual case): already in
        # `parameters` order, no reordering (it would cost a dozen small ops every step)
        return GradNorms(total=total, per_param=stacked)
    # one slot per parameter, in `parameters` order (0.0 for those without a gradient), so that
    # an index names the same parameter as `model.parameters()` does
    # (a Python reordering: an index tensor built here would be a host-to-device copy per step)
    by_param = [stacked.new_zeros(())] * len(params)
    for k, i in enumerate(order):
        by_param[positions[i]] = stacked[k]
    per_param = torch.stack(by_param)
    return GradNorms(total=total, per_param=per_param)


def shard_grad_norms(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """Return the L2 norm of this process's shard of each gradient, without a collective.

    Under FSDP2 every parameter and its gradient are DTensors, and the local part of the
    gradient is this process's shard after the reduce-scatter: the gradient its optimizer uses.
    Under FSDP1 with ``use_orig_params=True`` a parameter's ``.grad`` is already this process's
    flat slice of that gradient (None where the slice is empty). Either way the squares of these
    norms add up over processes to the squared norm of the whole gradient.

    Args:
        parameters (`Iterable[torch.nn.Parameter]`): the prepared model's parameters.

    Returns:
        `torch.Tensor | None`: one norm per parameter, in ``parameters`` order, 0.0 for those
        without a gradient (an empty shard too); None for FSDP1's ``FlatParameter`` s
        (``use_orig_params=False``), whose shards say nothing about one parameter, and when
        only some parameters are DTensors.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> shard_grad_norms([p])  # an FSDP1 slice is a plain tensor: its own norm
        tensor([5.])
    """
    params = list(parameters)
    dtensors = sum(isinstance(p, _DTENSOR) for p in params)
    if not params or 0 < dtensors < len(params) or any(isinstance(p, _FLAT) for p in params):
        return None
    positions = [i for i, p in enumerate(params) if p.grad is not None]
    device = _local(params[0]).device
    if not positions:
        return torch.zeros(len(params), device=device)
    grads = [_local(params[i].grad) for i in positions]  # type: ignore[arg-type]
    if _has_foreach_support(grads, device) and len({g.dtype for g in grads}) == 1:
        norms = list(torch._foreach_norm(grads, 2.0))
    else:
        norms = [torch.linalg.vector_norm(g, 2.0) for g in grads]
    # a Python reordering, as in grad_norms: an index tensor would be a host-to-device copy per step
    by_param = [torch.zeros((), device=device)] * len(params)
    for k, i in enumerate(positions):
        by_param[i] = norms[k].float().to(device)
    return torch.stack(by_param)


def clip_and_measure(
    accelerator: Accelerator,
    parameters: Iterable[torch.nn.Parameter],
    *,
    max_norm: float | None,
    max_value: float | None,
) -> GradNorms:
    """Unscale, measure and clip the gradients of one optimizer step.

    The update stays bitwise the one of a hand-written Accelerate loop calling
    ``accelerator.clip_grad_norm_`` / ``clip_grad_value_``: gradients are unscaled (fp16), the
    global norm is measured as torch measures it, then clipped with that norm (without
    ``max_norm`` it only measures, as :func:`grad_norms` does without ``exact``).

    Args:
        accelerator (`Accelerator`): the run's accelerator (owns the fp16 scaler).
        parameters (`Iterable[torch.nn.Parameter]`): the prepared model's parameters.
        max_norm (`float`, *optional*): max global norm.
        max_value (`float`, *optional*): clamp for every gradient element.

    Returns:
        `GradNorms`: the norms before clipping, on the device.
    """
    params = list(parameters)
    if accelerator.distributed_type in _SHARDED:
        # before the clip: the per-parameter norms are, as without sharding, those before clipping;
        # DeepSpeed's `.grad` is not this process's share of the gradient (its engine holds that)
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        per_param = shard_grad_norms(params) if fsdp else None
        bound = float("inf") if max_norm is None else max_norm
        return GradNorms(total=_as_tensor(accelerator.clip_grad_norm_(params, bound)), per_param=per_param)
    accelerator.unscale_gradients()
    return measure_and_clip(params, max_norm=max_norm, max_value=max_value)


def measure_and_clip(
    parameters: Iterable[torch.nn.Parameter], *, max_norm: float | None, max_value: float | None
) -> GradNorms:
    """Measure the (already unscaled, unsharded) gradients, then clip them with that norm.

    Bitwise the clip of ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``; the norms
    returned are those before clipping, on the device. Without ``max_norm`` the norm only
    measures and takes the faster path of :func:`grad_norms` (``exact=False``).

    Args:
        parameters (`Iterable[torch.nn.Parameter]`): the model's parameters.
        max_norm (`float`, *optional*): max global norm.
        max_value (`float`, *optional*): clamp for every gradient element.

    Returns:
        `GradNorms`: the norms before clipping.
    """
    params = list(parameters)
    norms = grad_norms(params, exact=max_norm is not None)  # clipping needs torch's own norm
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norms.total)
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(params, max_value)
    return norms


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, _DTENSOR) else tensor  # type: ignore[attr-defined]


def _as_tensor(norm: object) -> torch.Tensor:
    if isinstance(norm, _DTENSOR):
        # FSDP2: torch's clip hands back the total norm as a DTensor, which the finite-flag
        # all-reduce rejects ("c10d.allreduce_ ... no sharding strategy"); a replicated one is
        # already whole here, a partial one needs its (one, 0-dim) reduction, once per step
        return norm.full_tensor()  # type: ignore[attr-defined]
    # DeepSpeed hands back a float (or None before its first step) instead of a tensor.
    if isinstance(norm, torch.Tensor):
        return norm
    return torch.tensor(float("nan") if norm is None else float(norm))  # type: ignore[arg-type]
