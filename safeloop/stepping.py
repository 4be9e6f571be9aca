"""The optimizer step, applied or skipped on the NaN/Inf guard's device flag.

Which optimizers get which path:

- ``torch.optim.Adam`` / ``AdamW`` with ``fused=True``: the flag goes in as ``found_inf``, the
  attribute GradScaler uses; the fused kernel then changes nothing (step counts included) when
  it is set. No host read.
- under fp16 mixed precision (a GradScaler): the flag is merged into the scaler's own
  ``found_inf``, so the scaler skips the step as it would an overflow; no extra host read
  beyond the one the scaler itself makes for non-fused optimizers.
- every other optimizer: one host read of the flag per optimizer step, then ``step()`` or not.
  An optimizer's update rule is its own code, so no device-side trick is exact for all of them.

Where Accelerate's ``AcceleratedOptimizer`` would only forward the call (no fp16 scaler, no XLA,
not a LOMO optimizer, at a step that syncs gradients: the only place the trainer steps), the
user's optimizer is stepped and zeroed directly. The update is the same call; what is skipped is
the wrapper's per-step bookkeeping: ``step`` looks the ``lomo_optim`` package up with
``importlib.util.find_spec`` twice (about 227 k instructions, 23 µs each on a CPU), ``zero_grad``
builds ``inspect.signature`` of the inner ``zero_grad`` (about 99 k), every step.
"""

from __future__ import annotations

import sys

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

__all__ = ["unwrap_optimizer", "takes_found_inf", "decides_on_device", "forwards_only", "GatedStep"]

_FOUND_INF_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Return the user's optimizer inside Accelerate's wrapper."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` skips its whole update on device when ``found_inf`` is set.

    Only the fused Adam and AdamW kernels undo their step-count increment as well; fused SGD
    would leave an uninitialised momentum buffer behind when its first step is skipped.
    """
    inner = unwrap_optimizer(optimizer)
    return type(inner) in _FOUND_INF_OPTIMIZERS and bool(inner.defaults.get("fused"))


def decides_on_device(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, zero_engine: object | None
) -> bool:
    """Whether a refused step stays on the device until the log step (no host read per step).

    True with a GradScaler or a ``found_inf`` optimizer; never under DeepSpeed, whose own step
    reports its verdict on the host (``ZeroEngine.step``).
    """
    return zero_engine is None and (scaler is not None or takes_found_inf(optimizer))


def forwards_only(optimizer: torch.optim.Optimizer, inner: torch.optim.Optimizer) -> bool:
    """Whether Accelerate's wrapper ``optimizer`` adds nothing to ``inner``'s step and zero_grad.

    True for Accelerate's own ``AcceleratedOptimizer`` (not a subclass) without an fp16 scaler,
    outside XLA, around an optimizer that is not LOMO's (whose ``step`` the wrapper makes a no-op).
    """
    if type(optimizer) is not AcceleratedOptimizer or optimizer.scaler is not None:
        return False
    if optimizer.accelerator_state.distributed_type == DistributedType.XLA:
        return False
    lomo = sys.modules.get("lomo_optim")  # imported wherever a LOMO optimizer was built
    return lomo is None or not isinstance(inner, (lomo.Lomo, lomo.AdaLomo))


class GatedStep:
    """Runs ``optimizer.step()`` so that a step with flag 0 changes nothing.

    Args:
        optimizer (`torch.optim.Optimizer`): the prepared optimizer.
        scaler (`torch.amp.GradScaler`, *optional*): Accelerate's fp16 scaler.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
        self.optimizer = optimizer
        self.inner = unwrap_optimizer(optimizer)
        self.scaler = scaler
        self.device_side = scaler is not None or takes_found_inf(optimizer)
        # the optimizer the update is called on: the user's own where Accelerate's wrapper would
        # only forward the call (module docstring)
        self._stepped = self.inner if forwards_only(optimizer, self.inner) else optimizer

    def zero_grad(self) -> None:
        """Free the gradients after an optimizer step (``set_to_none=True``, as Accelerate's default)."""
        self._stepped.zero_grad(set_to_none=True)

    def step(self, flag: torch.Tensor | None) -> bool | None:
        """Apply the step when ``flag`` is 1 (or None, guard off).

        Args:
            flag (`torch.Tensor`, *optional*): float32 0/1 device scalar, already agreed by all ranks.

        Returns:
            `bool | None`: whether the step was applied when that was read on the host, None
            when the decision stayed on the device.
        """
        if flag is None:
            self._stepped.step()
            return None
        if self.scaler is not None:
            self.refuse_in_scaler(flag)
            self._stepped.step()
            return None
        if self.device_side:
            self.inner.found_inf = (1 - flag).to(torch.float32)  # type: ignore[attr-defined]
            try:
                self._stepped.step()
            finally:
                del self.inner.found_inf  # type: ignore[attr-defined]
            return None
        applied = bool(flag.item())  # host sync, once per optimizer step (no found_inf path)
        if applied:
            self._stepped.step()
        return applied

    def refuse_in_scaler(self, flag: torch.Tensor) -> None:
        """Merge the guard's flag into the fp16 scaler's ``found_inf`` (device only, no host read).

        The scaler's ``step`` then skips the update (and lowers its scale) as for an overflow.
        Valid after ``unscale_`` and before the scaler's ``step``.

        Args:
            flag (`torch.Tensor`): float32 0/1 device scalar, already agreed by all ranks.
        """
        bad = (1 - flag).to(torch.float32)
        for value in self._scaler_found_inf():
            value.copy_(torch.maximum(value, bad.to(value.device)))

    def unscaled(self) -> bool:
        """Whether the fp16 scaler has unscaled this step's gradients (its found-inf is there)."""
        return self.scaler is not None and bool(self._scaler_found_inf())

    def overflow(self) -> torch.Tensor | None:
        """The fp16 scaler's own found-inf for this step (device, 0/1), or None without a scaler.

        Valid after ``unscale_``, which the step calls before measuring the gradient norm, and
        before :meth:`step` merges the guard's flag into it.
        """
        if self.scaler is None:
            return None
        found = self._scaler_found_inf()
        return torch.stack([value.to(found[0].device) for value in found]).amax().clamp(max=1)

    def _scaler_found_inf(self) -> list[torch.Tensor]:
        state = self.scaler._per_optimizer_states[id(self.inner)]  # type: ignore[union-attr]
        return list(state["found_inf_per_device"].values())
