"""How a ``LightningModule`` drives its optimizer: the two findings ``SafeTrainer`` cannot meet.

``SafeTrainer`` calls ``backward`` and clips itself. Under Lightning's manual optimization the
user's ``training_step`` does both, and two mistakes of the usual checklist become possible:

- ``loss.backward()`` called directly instead of ``self.manual_backward(loss)``: Lightning's
  backward is skipped (the fp16 loss scaling, the strategy's preparation of the backward, the
  ``on_before_backward``/``on_after_backward`` hooks). Seen from the hooks: gradients reach
  ``on_before_optimizer_step`` while no loss reached ``on_before_backward`` since the last step
  (``direct-backward``, reported once). Under fp16 torch's ``unscale_`` raises first (nothing was
  scaled): the finding is then made when that error stops the fit, naming the cause.
- gradients that explode while nothing clips them: ``Trainer(gradient_clip_val=...)`` does not
  apply under manual optimization (Lightning refuses it), so the clipping must be a
  ``self.clip_gradients(...)`` call in ``training_step`` or the callback's ``clip_grad_norm``.
  The calls are counted at the precision plugin's ``clip_gradients`` (where
  ``LightningModule.clip_gradients`` and Lightning's automatic clipping both end), replaced on the
  instance for the fit; an ``exploding-grad`` finding made while none was seen and the callback
  clips nothing says so and names the Lightning way to clip (:class:`ClippingAwareReporter`);
  under FSDP1 (``FSDPStrategy``) the callback's ``clip_grad_norm`` alone: Lightning refuses norm
  clipping there, and FSDP1's own ``clip_grad_norm_`` cannot run inside ``training_step``.

Neither costs a host read in a healthy run: the first looks at ``.grad`` only when no loss came
through Lightning's backward, the second counts Python calls.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Collection
from typing import Any

import torch

from safeloop.findings import Reporter
from safeloop.lightning.fsdp import is_fsdp1
from safeloop.results import Finding

__all__ = ["OptimizationChecks", "ClippingAwareReporter", "DIRECT_BACKWARD"]

DIRECT_BACKWARD = "direct-backward"


class OptimizationChecks:
    """Watches the backward and the clipping of one Lightning fit.

    Args:
        trainer (`lightning.pytorch.Trainer`): its precision plugin's ``clip_gradients`` is watched.
        module (`LightningModule`): the module being fitted.
        callback_clips (`bool`): the callback itself clips (``clip_grad_norm``,
            ``clip_grad_value`` or ``adaptive_clip``); ``Trainer(gradient_clip_val=...)`` counts
            as clipping from the first step (Lightning clips after the hook that measures).

    Attributes:
        clip_calls (`int`): clipping calls with a bound > 0 seen in this fit.
    """

    def __init__(self, trainer: Any, module: torch.nn.Module, *, callback_clips: bool) -> None:
        self.plugin = trainer.precision_plugin
        self.module = module
        self.automatic = bool(getattr(module, "automatic_optimization", True))
        self.callback_clips = callback_clips or bool(trainer.gradient_clip_val)
        # FSDPStrategy: Lightning refuses norm clipping, and FSDP1's own cannot run in training_step
        self._fsdp1 = is_fsdp1(trainer.strategy)
        self.clip_calls = 0
        self._reported_backward = False
        self._installed: types.MethodType | None = None

    # -- the clipping calls --------------------------------------------------------------------

    def install(self) -> None:
        """Count the precision plugin's clipping calls for the fit (the class is untouched)."""
        if self._installed is not None:
            return
        original = self.plugin.clip_gradients  # bound: the call goes on exactly as before

        def counted(plugin: Any, *args: Any, **kwargs: Any) -> Any:
            value = kwargs.get("clip_val", args[1] if len(args) > 1 else 0.0)
            if isinstance(value, int | float) and value > 0:  # Lightning clips nothing at <= 0
                self.clip_calls += 1
            return original(*args, **kwargs)

        self._installed = types.MethodType(counted, self.plugin)
        self.plugin.clip_gradients = self._installed

    def uninstall(self) -> None:
        """Put the plugin's own method back (after an error too); idempotent."""
        installed, self._installed = self._installed, None
        if installed is not None and vars(self.plugin).get("clip_gradients") is installed:
            del self.plugin.clip_gradients

    @property
    def clipping_seen(self) -> bool:
        """Whether anything clipped in this fit: the callback, the ``Trainer``, or a clipping call."""
        return self.callback_clips or self.clip_calls > 0

    def explain(self, finding: Finding) -> Finding:
        """``finding``, completed when it is ``exploding-grad`` and nothing clipped in this fit."""
        if finding.code != "exploding-grad" or self.clipping_seen:
            return finding
        if self._fsdp1:
            seen = "No gradient clipping was seen in this fit (SafeLoopCallback clips nothing)."
            how = (
                "Clip gradients with `SafeLoopCallback(clip_grad_norm=1.0)`: under FSDPStrategy (FSDP1) "
                'Lightning cannot clip by norm (`gradient_clip_algorithm="norm"` is refused), and FSDP1\'s '
                "own `clip_grad_norm_` cannot run inside `training_step` (the root module's forward)."
            )
        elif self.automatic:
            seen = (
                "No gradient clipping was seen in this fit (`Trainer(gradient_clip_val=...)` is not set and "
                "SafeLoopCallback clips nothing)."
            )
            how = (
                "Clip gradients: `Trainer(gradient_clip_val=1.0)` or `SafeLoopCallback(clip_grad_norm=1.0)` "
                "(not both)."
            )
        else:
            seen = (
                "No gradient clipping was seen in this fit: `training_step` called no "
                "`self.clip_gradients(...)` and SafeLoopCallback clips nothing (under manual optimization "
                "`Trainer(gradient_clip_val=...)` does not apply)."
            )
            how = (
                "Clip in `training_step`, between `self.manual_backward(loss)` and `opt.step()`: "
                '`self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")`; or '
                "`SafeLoopCallback(clip_grad_norm=1.0)`, which clips in `on_before_optimizer_step`."
            )
        return dataclasses.replace(
            finding, message=f"{finding.message} {seen}", suggestion=f"{how} {finding.suggestion}"
        )

    # -- the backward --------------------------------------------------------------------------

    def before_step(self, step: int, *, had_loss: bool) -> Finding | None:
        """``on_before_optimizer_step``: a ``direct-backward`` finding, the first time one is seen.

        Args:
            step (`int`): the optimizer step about to be taken.
            had_loss (`bool`): a loss reached ``on_before_backward`` since the last step.
        """
        if had_loss or self.automatic or self._reported_backward:
            return None  # Lightning's own backward ran (always so in automatic optimization)
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads or not bool(torch.stack([g.count_nonzero() for g in grads]).sum() > 0):
            return None  # no backward at all since the gradients were zeroed: nothing to say
        return self._direct_backward(step, "gradients reached `opt.step()`")

    def at_error(self, step: int, error: BaseException, *, had_loss: bool) -> Finding | None:
        """The ``direct-backward`` finding behind torch's fp16 error, when that is what stopped the fit.

        Under fp16 Lightning unscales the gradients before ``on_before_optimizer_step``; after a
        direct ``loss.backward()`` the scaler never scaled anything, and torch's ``unscale_``
        raises ``Attempted unscale_ but _scale is None`` before the hook can say why.

        Args:
            step (`int`): the optimizer step being taken.
            error (`BaseException`): what stopped ``trainer.fit``.
            had_loss (`bool`): a loss reached ``on_before_backward`` since the last step.
        """
        if had_loss or self.automatic or self._reported_backward:
            return None
        if not (isinstance(error, AssertionError) and "_scale is None" in str(error)):
            return None
        return self._direct_backward(
            step,
            "the fp16 loss scaler's `unscale_` found no scale (torch: `Attempted unscale_ but _scale is "
            "None`), since the loss was never multiplied by it",
        )

    def _direct_backward(self, step: int, seen: str) -> Finding:
        self._reported_backward = True
        return Finding(
            code=DIRECT_BACKWARD,
            severity="warning",
            message=(
                f"step {step}: {seen}, while no loss went through `self.manual_backward`: "
                "`training_step` called `loss.backward()` itself. Lightning's backward was skipped: the "
                "fp16 loss scaling, the strategy's preparation of the backward (DDP under manual "
                "optimization) and the `on_before_backward`/`on_after_backward` hooks, where callbacks "
                "see the loss (this one's loss checks among them)."
            ),
            step=step,
            suggestion=(
                "Replace `loss.backward()` with `self.manual_backward(loss)` in `training_step` (same "
                "arguments: `self.manual_backward(loss, retain_graph=True)`)."
            ),
        )


class ClippingAwareReporter(Reporter):
    """safeloop's ``Reporter``, completing each ``exploding-grad`` finding with how to clip in Lightning.

    Every finding goes through ``explain`` before it is added or replaces another, so that the
    Python log, the ``Trainer``'s loggers and the report see the completed text.

    Args:
        *args (`Any`): ``Reporter``'s arguments.
        explain (`Callable[[Finding], Finding]`): ``OptimizationChecks.explain``.
    """

    def __init__(self, *args: Any, explain: Callable[[Finding], Finding]) -> None:
        super().__init__(*args)
        self.explain = explain

    def add(self, finding: Finding, *, before: Collection[str] = ()) -> None:
        """``Reporter.add`` of the completed finding."""
        super().add(self.explain(finding), before=before)

    def replace(self, old: Finding, new: Finding) -> None:
        """``Reporter.replace`` with the completed finding (a layer named later keeps the text)."""
        super().replace(old, self.explain(new))
