"""Finding where a non-finite loss came from, by replaying its batch with forward hooks.

Runs only after a skipped step, never on healthy steps. The replay leaves the run untouched:
it runs under ``torch.no_grad`` on the unwrapped model (no DDP collective), restores the RNG
states it consumes (dropout) and the buffers it updates (BatchNorm running statistics).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Localisation", "nonfinite_inputs", "locate_nonfinite", "named_tensors"]

# where a model that computes its own loss (Hugging Face style) returns it
_OWN_LOSS = ("output['loss']", "output.loss")


@dataclass(frozen=True)
class Localisation:
    """Where a non-finite value first appeared.

    Attributes:
        kind (`str`): ``"input"`` (the batch held it), ``"module"`` (a module's output), or
            ``"loss"`` (every module output was finite; the loss computation made it).
        batch_idx (`int`): index of the micro-batch in its epoch.
        where (`str`): the input's key or position, or the module's qualified name.
        count (`int`): non-finite elements seen there.
        rows (`tuple[int, ...]`): for an input, the samples (positions along its first dimension)
            holding them; empty for a 0-d tensor and for the other kinds.
        samples (`int | None`): for an input, the length of its first dimension.
    """

    kind: str
    batch_idx: int
    where: str = ""
    count: int = 0
    rows: tuple[int, ...] = ()
    samples: int | None = None


def named_tensors(value: Any, path: str) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every tensor in a nested batch or output (``batch[0]``, ...)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from named_tensors(item, f"{path}[{key!r}]")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from named_tensors(item, f"{path}[{i}]")
    elif hasattr(value, "__dataclass_fields__") or hasattr(value, "__dict__"):
        for key, item in vars(value).items():
            yield from named_tensors(item, f"{path}.{key}")


def _nonfinite_count(tensor: torch.Tensor) -> int:
    if not tensor.is_floating_point() and not tensor.is_complex():
        return 0
    return int((~torch.isfinite(tensor)).sum())  # host read: replay only


def nonfinite_inputs(batch: Any) -> list[tuple[str, int]]:
    """Return ``(path, count)`` for every tensor of ``batch`` holding NaN or Inf.

    Example:
        >>> nonfinite_inputs((torch.tensor([1.0, float("nan")]), torch.tensor([0, 1])))
        [('batch[0]', 1)]
    """
    found = []
    for path, tensor in named_tensors(batch, "batch"):
        count = _nonfinite_count(tensor)
        if count:
            found.append((path, count))
    return found


def _first_nonfinite_input(batch: Any) -> Localisation | None:
    """The first tensor of ``batch`` holding NaN/Inf, with the samples that hold them (host reads)."""
    for path, tensor in named_tensors(batch, "batch"):
        count = _nonfinite_count(tensor)
        if not count:
            continue
        if tensor.dim() == 0:
            return Localisation("input", 0, path, count)
        bad = (~torch.isfinite(tensor)).reshape(tensor.shape[0], -1).any(dim=1)
        rows = tuple(int(i) for i in torch.nonzero(bad).flatten().tolist())
        return Localisation("input", 0, path, count, rows, int(tensor.shape[0]))
    return None


def locate_nonfinite(
    model: torch.nn.Module,
    batches: Iterable[tuple[int, Any]],
    loss_of: Callable[[torch.nn.Module, Any], torch.Tensor],
) -> Localisation | None:
    """Replay ``batches`` and return the first place a non-finite value appeared.

    Args:
        model (`torch.nn.Module`): the unwrapped model, in the mode it trained in.
        batches (`Iterable[tuple[int, Any]]`): ``(batch_idx, batch)`` of the skipped step.
        loss_of (`Callable`): ``loss_of(model, batch) -> loss`` (the batch conventions).

    Returns:
        `Localisation | None`: None when the replay stayed finite (e.g. only gradients were
        non-finite, or the value came from another process).
    """
    rng = _RngState.save()
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        for batch_idx, batch in batches:
            bad_input = _first_nonfinite_input(batch)
            if bad_input is not None:
                return dataclasses.replace(bad_input, batch_idx=batch_idx)
            found, loss = _replay(model, batch, loss_of)
            if found is not None:
                name, count = found
                return Localisation("module", batch_idx, name, count)
            if not math.isfinite(loss):
                return Localisation("loss", batch_idx)
        return None
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(buffers[name])
        rng.restore()


def _replay(
    model: torch.nn.Module, batch: Any, loss_of: Callable[[torch.nn.Module, Any], torch.Tensor]
) -> tuple[tuple[str, int] | None, float]:
    """Run one forward pass with hooks; return the first non-finite module output and the loss."""
    first: list[tuple[str, int]] = []

    def hook(name: str) -> Callable[..., None]:
        def check(module: torch.nn.Module, args: Any, output: Any) -> None:
            if first:
                return
            for path, tensor in named_tensors(output, "output"):
                if module is model and path in _OWN_LOSS:
                    continue  # a model that computes its own loss returns it: the loss, not a module's output
                count = _nonfinite_count(tensor)
                if count:
                    first.append((name or type(module).__name__, count))
                    return

        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()]
    try:
        with torch.no_grad():
            loss = loss_of(model, batch)
        loss_value = float(loss.detach().float())  # host read: replay only
    finally:
        for handle in handles:
            handle.remove()
    return (first[0] if first else None), loss_value


class _RngState:
    def __init__(self, cpu: torch.Tensor, cuda: list[torch.Tensor] | None) -> None:
        self.cpu = cpu
        self.cuda = cuda

    @classmethod
    def save(cls) -> _RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
