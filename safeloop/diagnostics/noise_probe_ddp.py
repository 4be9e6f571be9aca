"""Each process's own gradient under DDP, for the gradient noise scale (``batch-size``).

DDP without gradient accumulation leaves only the all-reduced gradient in ``.grad``. A process's
own gradient exists whole in one place: the flat buckets DDP hands to its communication, one
bucket at a time, as the backward fills them. A communication hook (``register_comm_hook``, one
per model) sees each bucket before the all-reduce; :func:`measured_allreduce_hook` adds the
bucket's squared norm (a device kernel, no host read) to the probe, then does what DDP does
without a hook.

What DDP does without a hook, to the bit: it multiplies each gradient by ``1 / world_size``
while copying it into the bucket, then sums the buckets over processes. With any hook DDP copies
the gradient unscaled and the hook must scale it. torch's ``allreduce_hook`` divides by the world
size instead, which differs from the multiplication in the last bit for worlds that are not a
power of two; this hook multiplies, so the reduced gradients, and the updates, are DDP's own on
any number of processes (tested on 3). The cost over DDP without a hook is the extra pass of the
scaling (DDP fuses it into its copy otherwise), the norm's pass, and the hook's Python: about 2%
of a step of a 3x512 MLP at batch 64 in instructions (docs/performance.md).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["attach_ddp_probe", "measured_allreduce_hook"]


def measured_allreduce_hook(add: Any) -> Any:
    """A DDP communication hook: each bucket's local squared norm to ``add``, then DDP's all-reduce.

    Args:
        add (`Callable[[torch.Tensor], None]`): takes each bucket's squared norm (a 0-dim float32
            tensor on the bucket's device).

    Returns:
        `Callable`: the hook, for ``DistributedDataParallel.register_comm_hook(None, hook)``.
    """
    import torch.distributed as dist

    # unannotated: DDP compares a hook's annotations with its own types, and this module's
    # are strings (postponed evaluation)
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        buffer = bucket.buffer()
        if buffer.dtype == torch.float32:  # one BLAS pass, where the norm is two kernels
            add(torch.dot(buffer, buffer))
        else:  # half precision: accumulated in float32
            add(torch.linalg.vector_norm(buffer, dtype=torch.float32).square())
        group = dist.group.WORLD if state is None else state
        buffer.mul_(1.0 / group.size())
        return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(_first_tensor)

    return hook


def attach_ddp_probe(model: torch.nn.parallel.DistributedDataParallel, probe: Any) -> str | None:
    """Register the measuring hook on ``model`` for ``probe``; None, or why it cannot be.

    Args:
        model (`DistributedDataParallel`): the prepared model, before its first backward.
        probe (`NoiseScaleProbe`): takes each bucket's squared norm (``add_local``).

    Returns:
        `str | None`: None when the hook is on; the reason for the INFO line when DDP refused it
        (one hook per model: the user's, or Accelerate's, is there already).
    """
    try:
        model.register_comm_hook(None, measured_allreduce_hook(probe.add_local))
    except RuntimeError as error:
        return f"the DDP model already has a communication hook ({str(error).splitlines()[0]})"
    return None


def _first_tensor(future: Any) -> torch.Tensor:
    """The reduced bucket, out of the all-reduce's future (which holds a list of tensors)."""
    return future.value()[0]
