"""Everything a learning-rate range test changes, captured before it and put back after it, bitwise.

The sweep trains: it moves the weights, the optimizer's moments and step counts, the learning rates,
the fp16 loss scale, every RNG (dropout, shuffling), the dataloader's epoch counter and Accelerate's
accumulation counter. :class:`TrainingSnapshot` copies all of them first and restores them in place
afterwards, so that the tensors the optimizer, the scheduler and the user hold stay the same objects
with the same bits.

Where the copy lives: host memory (the tensors are copied off the accelerator, so the sweep does not
compete with training for device memory), or, above half of the host's available memory, one
temporary safetensors file per process that is read back and deleted at the restore. Either way it
costs one copy of the weights, buffers and optimizer state of this process (its shards under FSDP).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import GradientState
from safetensors.torch import load_file, save_file

from safeloop.data_cursor import RngSnapshot
from safeloop.stepping import unwrap_optimizer

__all__ = ["TrainingSnapshot", "SnapshotCost", "SNAPSHOT_PLACES", "local_part"]

SNAPSHOT_PLACES = ("auto", "memory", "disk")


@dataclass
class SnapshotCost:
    """Where a snapshot lived and what it cost.

    Attributes:
        where (`str`): ``"memory"`` (host) or ``"disk"`` (a temporary safetensors file).
        bytes (`int`): the size of the copy on this process.
        capture_seconds (`float`): time to take it.
        restore_seconds (`float`): time to put it back.
    """

    where: str
    bytes: int
    capture_seconds: float = 0.0
    restore_seconds: float = 0.0


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (FSDP2), else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return None


@dataclass
class _Slot:
    """One live tensor and the copy of its bits."""

    live: torch.Tensor
    key: str


@dataclass
class TrainingSnapshot:
    """The state a sweep changes, captured by :meth:`capture` and put back by :meth:`restore`."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loader: Any
    cost: SnapshotCost
    _slots: list[_Slot] = field(default_factory=list)
    _copies: dict[str, torch.Tensor] = field(default_factory=dict)
    _folder: Path | None = None
    _state_values: list[tuple[torch.Tensor, dict[str, Any]]] = field(default_factory=list)
    _groups: list[dict[str, Any]] = field(default_factory=list)
    _scheduler: dict[str, Any] | None = None
    _scaler: dict[str, Any] | None = None
    _rng: dict[str, Any] = field(default_factory=dict)
    _accelerator_step: int = 0
    _gradient_state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(
        cls,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        loader: Any,
        where: str = "auto",
    ) -> TrainingSnapshot:
        """Copy the training state of this process.

        Args:
            accelerator (`Accelerator`): the run's accelerator (fp16 scaler, accumulation counter).
            model (`torch.nn.Module`): the prepared model (parameters and buffers are copied).
            optimizer (`torch.optim.Optimizer`): the prepared optimizer (state and param groups).
            lr_scheduler (`LRScheduler`, *optional*): its ``state_dict``.
            loader (`Any`): the training dataloader (its shuffle generator and epoch counter).
            where (`str`, *optional*, defaults to ``"auto"``): ``"memory"``, ``"disk"``, or
                ``"auto"``: memory unless the copy exceeds half of the available host memory.

        Returns:
            `TrainingSnapshot`: ready for :meth:`restore`.
        """
        started = time.perf_counter()
        snapshot = cls(accelerator, model, optimizer, lr_scheduler, loader, SnapshotCost("memory", 0))
        inner = unwrap_optimizer(optimizer)
        tensors: list[tuple[str, torch.Tensor]] = []
        for i, param in enumerate(model.parameters()):
            tensors.append((f"param.{i}", param))
        for i, buffer in enumerate(model.buffers()):
            tensors.append((f"buffer.{i}", buffer))
        for j, (param, state) in enumerate(inner.state.items()):
            values: dict[str, Any] = {}
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors.append((f"optim.{j}.{name}", value))
                values[name] = value  # the same object goes back (tensor values are also copied)
            snapshot._state_values.append((param, values))
        snapshot._groups = [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in inner.param_groups
        ]
        size = sum(local_part(t).numel() * local_part(t).element_size() for _, t in tensors)
        if where == "auto":
            available = _available_memory()
            where = "disk" if available is not None and size > available // 2 else "memory"
        snapshot.cost = SnapshotCost(where, size)
        with torch.no_grad():
            for key, live in tensors:
                snapshot._slots.append(_Slot(live, key))
                snapshot._copies[key] = local_part(live).detach().to("cpu", copy=True).contiguous()
        if where == "disk":
            snapshot._folder = Path(tempfile.mkdtemp(prefix="safeloop-lr-finder-"))
            save_file(
                snapshot._copies, str(snapshot._folder / f"rank-{accelerator.process_index}.safetensors")
            )
            snapshot._copies = {}
        if lr_scheduler is not None:
            snapshot._scheduler = copy.deepcopy(lr_scheduler.state_dict())
        scaler = accelerator.scaler
        if scaler is not None:
            snapshot._scaler = {
                "scale": None if scaler._scale is None else scaler._scale.clone(),
                "growth_tracker": None if scaler._growth_tracker is None else scaler._growth_tracker.clone(),
            }
        snapshot._rng = RngSnapshot(loader).as_state()
        snapshot._accelerator_step = accelerator.step
        shared = GradientState._shared_state
        snapshot._gradient_state = {k: list(v) if isinstance(v, list) else v for k, v in shared.items()}
        snapshot.cost.capture_seconds = time.perf_counter() - started
        return snapshot

    def restore(self) -> None:
        """Put every captured value back in place (the same tensor objects), then free the copy."""
        started = time.perf_counter()
        copies = self._copies
        if self._folder is not None:
            copies = load_file(str(self._folder / f"rank-{self.accelerator.process_index}.safetensors"))
        inner = unwrap_optimizer(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for slot in self._slots:
                local_part(slot.live).copy_(copies[slot.key])
        # the optimizer's state: entries the sweep created go, the captured ones come back as the
        # same objects (a momentum buffer, a step count the optimizer replaced rather than updated)
        inner.state.clear()
        for param, values in self._state_values:
            inner.state[param] = dict(values)
        for group, saved in zip(inner.param_groups, self._groups, strict=True):
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            group.update(copy.deepcopy(saved))
        if self.lr_scheduler is not None and self._scheduler is not None:
            self.lr_scheduler.load_state_dict(copy.deepcopy(self._scheduler))
        scaler = self.accelerator.scaler
        if scaler is not None and self._scaler is not None:
            for name in ("scale", "growth_tracker"):
                saved = self._scaler[name]
                live = getattr(scaler, f"_{name}")
                if saved is None or live is None:
                    setattr(scaler, f"_{name}", None if saved is None else saved.clone())
                else:
                    live.copy_(saved)
            scaler._per_optimizer_states.clear()  # reset at each `update`: nothing is pending
        RngSnapshot.restore(self._rng, self.loader)
        self.accelerator.step = self._accelerator_step
        shared = GradientState._shared_state
        for key, value in self._gradient_state.items():
            if isinstance(value, list) and isinstance(shared.get(key), list):
                shared[key][:] = value
            else:
                shared[key] = value
        self.discard()
        self.cost.restore_seconds = time.perf_counter() - started

    def discard(self) -> None:
        """Free the copy (memory, or the temporary file)."""
        self._copies = {}
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
