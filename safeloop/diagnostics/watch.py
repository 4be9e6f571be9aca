"""Hooks that watch the first batch: which modules ran in the forward, which parameters got a gradient.

:class:`ForwardWatch` records, with forward hooks, which modules ran and in which autograd mode;
:class:`GradientReach` records, with gradient-accumulation hooks, which parameters the backward
reached, for engines that never leave a gradient in ``.grad`` (DeepSpeed ZeRO). ``first_batch``
turns both records into findings. The hooks only add names to sets: no tensor data is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["ForwardWatch", "GradientReach"]


class ForwardWatch:
    """Records which modules ran during a forward pass, and in which autograd mode.

    A context manager: forward hooks on every module of ``model`` inside, none after (removed on
    exit, exception or not). Hooks on the inner modules fire through a wrapper (DDP) too.

    Args:
        model (`torch.nn.Module`): the unwrapped model.

    Attributes:
        model (`torch.nn.Module`): the watched model.
        ran (`set[str]`): names of the modules that ran (``""`` is the model itself).
        no_grad (`set[str]`): modules that ran with gradients disabled, outside inference mode.
        inference (`set[str]`): modules that ran under ``torch.inference_mode``.
        grad_output (`set[str]`): modules that returned a tensor requiring grad.
        last_grad_output (`str | None`): the last module that did: the graph was whole up to there.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ran: set[str] = set()
        self.no_grad: set[str] = set()
        self.inference: set[str] = set()
        self.grad_output: set[str] = set()
        self.last_grad_output: str | None = None
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> ForwardWatch:
        try:
            for name, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(partial(self._pre_hook, name)))
                self._handles.append(module.register_forward_hook(partial(self._post_hook, name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_hook(self, name: str, module: torch.nn.Module, args: Any) -> None:
        self.ran.add(name)
        if torch.is_inference_mode_enabled():  # it disables grad too: kept apart, the fixes differ
            self.inference.add(name)
        elif not torch.is_grad_enabled():
            self.no_grad.add(name)

    def _post_hook(self, name: str, module: torch.nn.Module, args: Any, output: Any) -> None:
        if _requires_grad(output):
            self.grad_output.add(name)
            self.last_grad_output = name


class GradientReach:
    """Records which trainable parameters a backward reaches, from gradient accumulation hooks.

    For engines that never leave a gradient in ``.grad`` (DeepSpeed ZeRO moves it into its
    partitions): a parameter's post-accumulate-grad hook fires when autograd accumulates a
    gradient into it, before the engine takes it away. Hooks are on from construction to
    :meth:`close`; they only add a name to a set.

    Args:
        model (`torch.nn.Module`): the unwrapped model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.reached: set[str] = set()
        self._handles: list[RemovableHandle] = []
        try:
            for name, param in model.named_parameters():
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(partial(self._hook, name)))
        except BaseException:
            self.close()
            raise

    def _hook(self, name: str, param: torch.Tensor) -> None:
        self.reached.add(name)

    def close(self) -> set[str]:
        """Remove the hooks; return the names of the parameters that got a gradient."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.reached


def _requires_grad(value: Any, depth: int = 0) -> bool:
    """Whether a module output holds a tensor requiring grad (metadata only, no device read)."""
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if depth >= 4:  # outputs nest shallowly; a deep structure is not worth walking
        return False
    if isinstance(value, Mapping):  # Hugging Face ModelOutput is an OrderedDict
        items: Iterable[Any] = value.values()
    elif isinstance(value, (tuple, list)):
        items = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = (getattr(value, f.name, None) for f in dataclasses.fields(value))
    else:
        return False
    return any(_requires_grad(item, depth + 1) for item in items)
