"""The exact skip under Lightning: the optimizer's own ``step`` made to refuse a non-finite update.

A Lightning callback cannot veto a step: hooks return nothing, and ``training_step`` returning
None is an error under several processes. Zeroing the gradients is not a skip (Adam still counts
the step and decays its moments), and dropping them is one only for optimizers that pass over
parameters without a gradient, after a host read of the flag every step. So the callback decides
in ``on_before_optimizer_step`` and the decision is carried out where the update happens:

- the fp16 ``GradScaler`` (after Lightning's ``unscale_``): the flag is merged into the scaler's
  ``found_inf``, and the scaler's own ``step`` skips the update as for an overflow. Device only.
- every other case goes through the torch optimizer's ``step``, which :class:`StepGate` replaces
  on the instance for the fit. In Lightning the hook fires *inside* that call (Lightning passes
  the closure that runs ``training_step``, ``backward`` and ``on_before_optimizer_step`` to
  ``optimizer.step``, automatic and manual optimization alike), so the replacement runs the
  closure itself, as torch's optimizers do first thing, then calls the real ``step`` without it,
  or not at all:

  - fused ``Adam``/``AdamW``: the flag goes in as ``found_inf``, the attribute GradScaler uses;
    the fused kernel then changes nothing, step count included. Device only.
  - any other optimizer: one host read of the flag, then the real ``step`` or nothing.

Nothing else about the call changes: the closure runs once under ``torch.enable_grad()``, its
result is returned, keyword arguments are passed on, and an LR scheduler's wrapper of ``step``
(torch's "step called?" bookkeeping) stays inside. The original ``step`` is put back at the end
of the fit, after an error too.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

from safeloop.stepping import GatedStep, decides_on_device, takes_found_inf

__all__ = ["StepGate"]


class StepGate:
    """Applies or refuses each optimizer step of a Lightning fit on the guard's agreed flag.

    Args:
        optimizer (`torch.optim.Optimizer`): the torch optimizer of ``configure_optimizers``.
        scaler (`torch.amp.GradScaler`, *optional*): the precision plugin's fp16 scaler.

    Attributes:
        device_side (`bool`): the decision stays on the device (scaler or fused Adam): learnt at
            the log step, as ``SafeTrainer`` does.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
        self.optimizer = optimizer
        self.scaler = scaler
        self.device_side = decides_on_device(optimizer, scaler, None)
        self._found_inf = takes_found_inf(optimizer)
        self._scaled = GatedStep(optimizer, scaler)  # the scaler's found_inf, read and merged into
        self._pending: torch.Tensor | None = None
        self._applied: bool | None = None
        self._original: Callable[..., Any] | None = None
        self._had_own_step = False  # the instance already had a `step` (an LR scheduler's wrapper)
        self._installed: types.MethodType | None = None
        self._active = False

    # -- the fit's lifetime ---------------------------------------------------------------------

    def install(self) -> None:
        """Replace ``optimizer.step`` on the instance by the gated step (once per fit)."""
        if self._installed is not None:
            return
        optimizer = self.optimizer
        self._had_own_step = "step" in vars(optimizer)
        self._original = optimizer.step
        function = _gated_function()
        if getattr(self._original, "_wrapped_by_lr_sched", False):
            # torch's LR schedulers look for their marker on `optimizer.step` before their first
            # step (a bound method reads it from its function): the wrapper is still inside
            function._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self._installed = types.MethodType(function, optimizer)
        vars(optimizer)[_GATE] = self
        optimizer.step = self._installed  # type: ignore[method-assign]
        self._active = True

    def uninstall(self) -> None:
        """Put the original ``step`` back (idempotent; after an error too)."""
        if self._installed is None:
            return
        optimizer = self.optimizer
        self._active, self._pending = False, None
        if vars(optimizer).get("step") is self._installed:
            if self._had_own_step:
                optimizer.step = self._original  # type: ignore[method-assign]
            else:
                del optimizer.step
            vars(optimizer).pop(_GATE, None)
        # else a scheduler built during the fit wrapped the gated step: it stays, passing through
        self._installed = None

    # -- one step ----------------------------------------------------------------------------------

    def overflow(self) -> torch.Tensor | None:
        """The fp16 scaler's own found-inf of this step (device 0/1), or None without a scaler.

        None too before the scaler has unscaled (a fused optimizer unscales inside its step).
        """
        if not self._scaled.unscaled():
            return None
        return self._scaled.overflow()

    def gradient_scale(self) -> torch.Tensor | None:
        """The fp16 loss scale the gradients still carry in ``on_before_optimizer_step``, or None.

        Lightning does not unscale for an optimizer that unscales inside its own step (fused
        Adam); the measured norms are then divided by this (a device tensor: no host read).
        """
        if self.scaler is None or self._scaled.unscaled():
            return None
        scale = getattr(self.scaler, "_scale", None)  # the scaler's current scale, on the device
        return scale if isinstance(scale, torch.Tensor) else None

    def decide(self, flag: torch.Tensor | None) -> None:
        """Take this step's agreed finite flag (``on_before_optimizer_step``); None: apply the step.

        With an fp16 scaler that has unscaled the gradients the flag goes into its ``found_inf``
        now (the scaler's ``step`` skips); otherwise the gated ``step`` that follows applies it.
        """
        self._applied = None
        if flag is not None and self._scaled.unscaled():
            self._scaled.refuse_in_scaler(flag)
            flag = None
        self._pending = flag

    def take_applied(self) -> bool | None:
        """Whether the last step's update was applied, when read on the host; None when not read."""
        applied, self._applied = self._applied, None
        return applied

    def run(self, closure: Callable[[], Any] | None, **kwargs: Any) -> Any:
        """The gated ``optimizer.step(closure, **kwargs)``: the closure, then the update or nothing."""
        original = self._original
        assert original is not None  # invariant: only reached through the installed method
        if not self._active:  # left under a scheduler's wrapper after the fit: the plain step
            return original(closure, **kwargs)
        loss = None
        if closure is not None:  # what torch's optimizers do first; Lightning's hooks run inside
            with torch.enable_grad():
                loss = closure()
        flag, self._pending = self._pending, None
        if flag is None:  # the guard is off, or the scaler decided
            original(**kwargs)
        elif self._found_inf:
            self._refuse_fused(flag, original, kwargs)
        else:
            self._applied = bool(flag.item())  # host sync, once per optimizer step (no found_inf path)
            if self._applied:
                original(**kwargs)
            elif getattr(original, "_wrapped_by_lr_sched", False):
                # the step was called, only refused: the LR scheduler must not warn it was not
                self.optimizer._opt_called = True  # type: ignore[attr-defined]
        return loss

    def _refuse_fused(self, flag: torch.Tensor, original: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        bad = (1 - flag).to(torch.float32)
        optimizer = self.optimizer
        given = getattr(optimizer, "found_inf", None)
        if given is not None:
            # the fp16 scaler set it for a fused optimizer (and deletes it after): merged in place
            given.copy_(torch.maximum(given, bad.to(given.device)))
            original(**kwargs)
            return
        optimizer.found_inf = bad  # type: ignore[attr-defined]
        try:
            original(**kwargs)
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]


_GATE = "_safeloop_gate"


def _gated_function() -> Callable[..., Any]:
    """A new function for ``optimizer.step`` (new per install: a scheduler's marker goes on it)."""

    def step(
        optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None, **kwargs: Any
    ) -> Any:
        gate: StepGate = vars(optimizer)[_GATE]
        return gate.run(closure, **kwargs)

    return step
