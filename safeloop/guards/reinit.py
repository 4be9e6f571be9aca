"""All-zero weights: which are stuck, which are deliberate, and re-initialising the stuck ones.

A weight left at zero can make a layer learn nothing: two zero Linear layers in a row pass each
other zero gradients forever. But zero is sometimes deliberate (a LoRA adapter's ``B``, the last
layer of a zero-init residual branch, adaLN-Zero): those receive gradient and learn. The test
that tells them apart is the gradient of the first backward pass: all zero means stuck.

Under FSDP2 (``fully_shard``) every parameter and its gradient are DTensors, and each process
holds one dim-0 shard (uneven or empty ones included). A parameter is all zero only if every
shard is, and its gradient's norm is the root of the shards' squared norms summed: both come
from local shards and one sum over the shards' processes, for all parameters at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from safeloop.distributed import sum_over_group

try:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    _DTENSOR: tuple[type, ...] = (DTensor,)
except ImportError:  # a torch built without distributed support has no sharded tensors
    _DTENSOR = ()

__all__ = ["REINIT_CHOICES", "REINIT_SCOPES", "ZeroParam", "find_zero_params", "initial_values", "reinit_"]

REINIT_CHOICES = ("xavier", "normal", None)
REINIT_SCOPES = ("weights", "all")


@dataclass(frozen=True)
class ZeroParam:
    """A trainable parameter found all zeros before the first optimizer step.

    Attributes:
        name (`str`): its qualified name.
        shape (`tuple[int, ...]`): its shape.
        stuck (`bool`): its gradient is all zeros too, so it cannot leave zero.
        grad_norm (`float`): the norm of its first gradient.
    """

    name: str
    shape: tuple[int, ...]
    stuck: bool
    grad_norm: float

    @property
    def is_weight(self) -> bool:
        """Two or more dimensions (a weight), as opposed to a bias or a norm's shift."""
        return len(self.shape) >= 2

    def reinit_wanted(self, scope: str) -> bool:
        """Whether ``scope`` asks for this parameter to be re-initialised."""
        return self.stuck and (self.is_weight or scope == "all")


def find_zero_params(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> list[ZeroParam]:
    """Return every trainable parameter that is all zeros, with its gradient's verdict.

    Parameters without a gradient are left out: they did not take part in the loss at all,
    which is a different fault (unused or detached parameters), and re-initialising them
    would not make them learn.

    Args:
        named_params (`Iterable[tuple[str, Parameter]]`): ``model.named_parameters()`` after a
            backward pass.

    Returns:
        `list[ZeroParam]`: in parameter order.
    """
    candidates = [
        (name, param)
        for name, param in named_params
        if param.requires_grad and param.grad is not None and param.numel() > 0
    ]
    if not candidates:
        return []
    device = candidates[0][1].device
    nonzero = torch.stack(
        [
            # a DTensor's own `any` would be a collective per parameter: it is counted below
            torch.zeros((), dtype=torch.bool, device=device)
            if isinstance(param, _DTENSOR)
            else param.detach().any().to(device)
            for _, param in candidates
        ]
    )
    # DTensor shards: a shard's "any" says nothing of the others, so this rank's verdict is
    # replaced by the one summed over the shards (and the gradient's norm comes with it)
    sharded = _sharded_stats([param for _, param in candidates])
    if sharded is None:
        flags = nonzero.tolist()
    else:
        flags = torch.cat([nonzero.to(sharded.dtype), sharded.to(device).flatten()]).tolist()
    count = len(candidates)
    found = []
    # host read: one for all parameters, once per fit; a few more only for zero ones not sharded
    for i, (name, param) in enumerate(candidates):
        if not isinstance(param, _DTENSOR):
            if flags[i]:
                continue
            grad_norm = float(param.grad.detach().float().norm())  # type: ignore[union-attr]
        else:
            if flags[count + i] > 0:  # the number of shards holding a nonzero value
                continue
            grad_norm = flags[2 * count + i] ** 0.5
        found.append(ZeroParam(name, tuple(param.shape), stuck=grad_norm == 0.0, grad_norm=grad_norm))
    return found


def _sharded_stats(params: list[torch.nn.Parameter]) -> torch.Tensor | None:
    """For DTensor parameters: how many shards are nonzero, and the gradient's squared norm.

    Each process measures its own shards; the sums over the processes that hold the other
    shards come from one all-reduce per distinct (mesh, sharded mesh dimensions) pair, which is
    one in all for FSDP2 on a 1-D mesh. Every process must call this with the same parameters in
    the same order (``named_parameters()`` of the same model, gradients None on all alike).

    Args:
        params (`list[Parameter]`): parameters with a gradient, DTensors or not.

    Returns:
        `torch.Tensor | None`: ``(2, len(params))`` float32 on the first DTensor's local device:
        row 0 the number of nonzero shards, row 1 the gradient's squared norm (zeros in the
        columns of parameters that are not DTensors); None when none is a DTensor.
    """
    positions = [i for i, param in enumerate(params) if isinstance(param, _DTENSOR)]
    if not positions:
        return None
    device = params[positions[0]].to_local().device  # type: ignore[attr-defined]
    # grouped by the mesh dimensions that cut the parameter: summing over a replicated dimension
    # (HSDP's) would count the same shard more than once
    groups: dict[tuple[object, tuple[int, ...]], list[int]] = {}
    for i in positions:
        placements = params[i].placements  # type: ignore[attr-defined]
        dims = tuple(d for d, p in enumerate(placements) if isinstance(p, Shard))
        groups.setdefault((params[i].device_mesh, dims), []).append(i)  # type: ignore[attr-defined]
    columns = [torch.zeros(2, device=device)] * len(params)
    for (mesh, dims), members in groups.items():
        part = torch.stack([_local_stats(params[i], device) for i in members], dim=1)
        for dim in dims:
            if mesh.size(dim) > 1:  # type: ignore[attr-defined]
                # over the mesh dimension's group, which may be smaller than the run's world
                sum_over_group(part, mesh.get_group(dim))  # type: ignore[attr-defined]
        # a Python reordering: an index tensor would be one more host-to-device copy
        for i, column in zip(members, part.unbind(dim=1), strict=True):
            columns[i] = column
    return torch.stack(columns, dim=1)


def _local_stats(param: torch.nn.Parameter, device: torch.device) -> torch.Tensor:
    """This process's shard of ``param``: 1.0 if it holds a nonzero value, and its gradient's squared norm."""
    local = param.detach().to_local()  # type: ignore[attr-defined]
    grad = param.grad.to_local()  # type: ignore[union-attr]
    # an empty shard (fewer rows than processes) counts as zero with a zero norm, as it should
    any_nonzero = local.any().to(device=device, dtype=torch.float32)
    squared = torch.linalg.vector_norm(grad, dtype=torch.float32).to(device).square()
    return torch.stack([any_nonzero, squared])


def initial_values(
    shape: Sequence[int], method: str, *, std: float, generator: torch.Generator
) -> torch.Tensor:
    """Draw a whole re-initialised tensor on the CPU (float32), the same on every process.

    Args:
        shape (`Sequence[int]`): the parameter's whole shape.
        method (`str`): ``"xavier"`` (uniform; 1-D shapes fall back to normal) or ``"normal"``.
        std (`float`): the standard deviation for ``"normal"``.
        generator (`torch.Generator`): a CPU generator, seeded alike on every process.

    Returns:
        `torch.Tensor`: the values.
    """
    values = torch.empty(tuple(shape), dtype=torch.float32)
    if method == "xavier" and len(values.shape) >= 2:
        torch.nn.init.xavier_uniform_(values, generator=generator)
    else:
        torch.nn.init.normal_(values, mean=0.0, std=std, generator=generator)
    return values


def reinit_(param: torch.Tensor, method: str, *, std: float, generator: torch.Generator) -> None:
    """Re-initialise ``param`` in place, identically on every process.

    Values are drawn on the CPU from ``generator`` (seeded the same on every rank) and copied to
    the parameter's device, so all ranks hold the same weights without a broadcast. A DTensor
    parameter (FSDP2) is drawn whole the same way, and each process keeps its own shard: the
    gathered parameter is the one an unsharded run draws.

    Args:
        param (`torch.Tensor`): the parameter (any device, any dtype; a DTensor too).
        method (`str`): ``"xavier"`` (uniform, for tensors of 2 or more dims; 1-D tensors fall
            back to normal) or ``"normal"`` (mean 0, standard deviation ``std``).
        std (`float`): the standard deviation for ``"normal"``.
        generator (`torch.Generator`): a CPU generator.
    """
    values = initial_values(param.shape, method, std=std, generator=generator)
    if isinstance(param, _DTENSOR):
        with torch.no_grad():
            local = param.to_local()  # type: ignore[attr-defined]
            # every process holds the whole draw: cut it locally (no source rank, no collective)
            shard = distribute_tensor(
                values.to(device=local.device, dtype=local.dtype),
                param.device_mesh,  # type: ignore[attr-defined]
                param.placements,  # type: ignore[attr-defined]
                src_data_rank=None,
            ).to_local()
            local.copy_(shard)
        return
    with torch.no_grad():
        param.copy_(values.to(device=param.device, dtype=param.dtype))
