"""All-zero weights: which are stuck, which are deliberate, and re-initialising the stuck ones.

A weight left at zero can make a layer learn nothing: two zero Linear layers in a row pass each
other zero gradients forever. But zero is sometimes deliberate (a LoRA adapter's ``B``, the last
layer of a zero-init residual branch, adaLN-Zero): those receive gradient and learn. The test
that tells them apart is the gradient of the first backward pass: all zero means stuck.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["REINIT_CHOICES", "REINIT_SCOPES", "ZeroParam", "find_zero_params", "reinit_"]

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
    nonzero = torch.stack([param.detach().any().to(device) for _, param in candidates])
    found = []
    # host read: one for all parameters, once per fit; a few more only for zero ones
    for (name, param), is_nonzero in zip(candidates, nonzero.tolist(), strict=True):
        if is_nonzero:
            continue
        grad_norm = float(param.grad.detach().float().norm())  # type: ignore[union-attr]
        found.append(ZeroParam(name, tuple(param.shape), stuck=grad_norm == 0.0, grad_norm=grad_norm))
    return found


def reinit_(param: torch.Tensor, method: str, *, std: float, generator: torch.Generator) -> None:
    """Re-initialise ``param`` in place, identically on every process.

    Values are drawn on the CPU from ``generator`` (seeded the same on every rank) and copied to
    the parameter's device, so all ranks hold the same weights without a broadcast.

    Args:
        param (`torch.Tensor`): the parameter (any device, any dtype).
        method (`str`): ``"xavier"`` (uniform, for tensors of 2 or more dims; 1-D tensors fall
            back to normal) or ``"normal"`` (mean 0, standard deviation ``std``).
        std (`float`): the standard deviation for ``"normal"``.
        generator (`torch.Generator`): a CPU generator.
    """
    values = torch.empty(param.shape, dtype=torch.float32)
    if method == "xavier" and param.dim() >= 2:
        torch.nn.init.xavier_uniform_(values, generator=generator)
    else:
        torch.nn.init.normal_(values, mean=0.0, std=std, generator=generator)
    with torch.no_grad():
        param.copy_(values.to(device=param.device, dtype=param.dtype))
