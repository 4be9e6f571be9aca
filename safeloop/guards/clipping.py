"""Gradient clipping and the one global gradient norm of an optimizer step.

The norm is measured once per optimizer step, before clipping, and kept on the device: the
same tensor feeds logging and the guards. Nothing here reads a tensor on the host.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

__all__ = ["global_grad_norm", "clip_and_measure"]

# Under these, gradients are sharded: a local norm would be wrong, so the norm comes from
# Accelerate's sharding-aware clip with an infinite bound (a multiply by exactly 1.0).
_SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def global_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Return the L2 norm of all gradients together, as a device scalar.

    Args:
        parameters (`Iterable[torch.nn.Parameter]`): parameters whose ``.grad`` to measure;
            those without a gradient are ignored.

    Returns:
        `torch.Tensor`: a 0-dim float tensor; 0.0 when no parameter has a gradient.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> global_grad_norm([p])
        tensor(5.)
    """
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def clip_and_measure(
    accelerator: Accelerator,
    parameters: Iterable[torch.nn.Parameter],
    *,
    max_norm: float | None,
    max_value: float | None,
) -> torch.Tensor:
    """Unscale, measure and clip the gradients of one optimizer step.

    With ``max_norm`` the call is exactly ``accelerator.clip_grad_norm_``, so the update is
    bitwise the one of a hand-written Accelerate loop; the norm it returns (pre-clipping) is
    kept. Otherwise gradients are unscaled (fp16), measured, then clamped by ``max_value``.

    Args:
        accelerator (`Accelerator`): the run's accelerator (owns the fp16 scaler).
        parameters (`Iterable[torch.nn.Parameter]`): the prepared model's parameters.
        max_norm (`float`, *optional*): max global norm.
        max_value (`float`, *optional*): clamp for every gradient element.

    Returns:
        `torch.Tensor`: the global gradient norm before clipping, on the device.
    """
    params = list(parameters)
    if max_norm is not None:
        return _as_tensor(accelerator.clip_grad_norm_(params, max_norm))
    if accelerator.distributed_type in _SHARDED:
        norm = _as_tensor(accelerator.clip_grad_norm_(params, float("inf")))
    else:
        accelerator.unscale_gradients()
        norm = global_grad_norm(params)
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(params, max_value)
    return norm


def _as_tensor(norm: object) -> torch.Tensor:
    # DeepSpeed hands back a float (or None before its first step) instead of a tensor.
    if isinstance(norm, torch.Tensor):
        return norm
    return torch.tensor(float("nan") if norm is None else float(norm))  # type: ignore[arg-type]
