"""DeepSpeed under Lightning: ``DeepSpeedStrategy``, whose engine steps itself after the callback's hook.

Under ``DeepSpeedStrategy`` Lightning wraps the ``LightningModule`` in a ``DeepSpeedEngine``. Its
precision plugin runs the engine's ``backward`` (DeepSpeed reduces the gradients there and, under
ZeRO-1/2/3, partitions them over the processes, at the end of an accumulation window), then
``on_before_optimizer_step``, then the engine's own ``step``. DeepSpeed counts the accumulation
itself: Lightning calls the hook and the engine's ``step`` at every micro-batch, and only the
window's last (``is_gradient_accumulation_boundary()``) holds reduced gradients and takes an update.

So ``SafeTrainer``'s DeepSpeed components apply, fed at that boundary:

- ``ZeroEngine.measure``: the global norm and each process's partition norms, the finite flag
  agreed in the same all-reduce (ZeRO-1/2/3; stage 0 holds whole reduced ``.grad`` s);
- the decision, carried out inside the engine's ``step``: :class:`ZeroStepGate` wraps it on the
  instance for the fit and hands it to ``ZeroEngine.step``, which sends a refused step down
  DeepSpeed's own overflow path (gradients dropped, optimizer state untouched);
- the all-zero weight check, the diagnostics and the checkpoints on partitions
  (``ZeroEngine.find_zero_params``, ``Diagnostics(zero=...)``, ``ZeroState``).

DeepSpeed clips inside its step with its config's ``gradient_clipping``, which Lightning sets from
``Trainer(gradient_clip_val=...)``: the callback's own clipping is refused (:func:`deepspeed_problems`).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

from safeloop.zero import ZeroEngine

__all__ = ["DEEPSPEED_NOISE", "ZeroStepGate", "deepspeed_problems", "is_deepspeed", "zero_of"]

# why the gradient noise scale stays off under DeepSpeed (INFO, docs/lightning.md)
DEEPSPEED_NOISE = (
    "under Lightning's DeepSpeedStrategy the gradients are reduced inside DeepSpeed's engine, where "
    'no hook sees a process\'s own gradient whole; DDP (`strategy="ddp"`) and FSDP2 '
    "(`ModelParallelStrategy`) are measured"
)


def is_deepspeed(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``DeepSpeedStrategy`` (or a subclass of it)."""
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover - every supported Lightning has it
        return False
    return isinstance(strategy, DeepSpeedStrategy)


def zero_of(trainer: Any, module: torch.nn.Module) -> ZeroEngine | None:
    """The fit's DeepSpeed engine, wrapped as ``SafeTrainer`` wraps it; None when not under DeepSpeed.

    Args:
        trainer (`lightning.pytorch.Trainer`): the trainer, after its strategy's set-up.
        module (`LightningModule`): the module the engine wraps.
    """
    if not is_deepspeed(trainer.strategy):
        return None
    return ZeroEngine(trainer.strategy.model, list(module.parameters()))


def deepspeed_problems(strategy: Any, settings: Any) -> list[str]:
    """What SafeLoopCallback cannot do under ``DeepSpeedStrategy`` with these settings.

    Args:
        strategy (`DeepSpeedStrategy`): the trainer's strategy, its engine built.
        settings (`TrainerConfig`): the callback's settings.

    Returns:
        `list[str]`: one sentence per problem, each with its fix; empty when supported.
    """
    problems = []
    managed = getattr(strategy.model, "managed_gradient_accumulation", None)
    if callable(managed) and not managed():
        problems.append(
            "the DeepSpeed config sets `managed_gradient_accumulation: false`: DeepSpeed then reduces "
            "the gradients inside its `step`, after `on_before_optimizer_step`, and says a window has "
            "ended only while that step runs, so the callback sees neither the reduced gradients nor "
            "the window's end. Fix: leave `managed_gradient_accumulation` at its default (true), or "
            "remove SafeLoopCallback for this run."
        )
    for name in ("clip_grad_norm", "clip_grad_value", "adaptive_clip"):
        value = getattr(settings, name)
        if value is not None:
            problems.append(
                f"`SafeLoopCallback({name}={value!r})` under DeepSpeedStrategy: DeepSpeed steps its "
                "partitioned gradients inside its engine and clips there, with its config's "
                "`gradient_clipping`, so the callback cannot clip. Fix: "
                "`Trainer(gradient_clip_val=...)` (Lightning passes it to DeepSpeed as "
                f"`gradient_clipping`, by norm), and drop `{name}`."
            )
    return problems


class ZeroStepGate:
    """Applies or refuses each DeepSpeed step of a Lightning fit on the guard's agreed flag.

    The same interface as :class:`~safeloop.lightning.step_gate.StepGate`, for the engine's
    ``step`` instead of the optimizer's. The engine reports on the host whether it applied each
    step (``was_step_applied``, read by DeepSpeed itself), so skips are learnt at the step.

    Args:
        zero (`ZeroEngine`): the fit's engine.

    Attributes:
        device_side (`bool`): always False: the verdict of every step is known on the host.
    """

    device_side = False

    def __init__(self, zero: ZeroEngine) -> None:
        self.zero = zero
        self._pending: torch.Tensor | None = None
        self._armed = False  # decide() ran since the last step: the next boundary step is the guard's
        self._applied: bool | None = None
        self._installed: types.MethodType | None = None

    def install(self) -> None:
        """Wrap the engine's ``step`` on the instance (once per fit)."""
        if self._installed is not None:
            return
        engine = self.zero.engine
        original = engine.step
        gate = self

        def step(engine: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            return gate.run(original, args, kwargs)

        self._installed = types.MethodType(step, engine)
        engine.step = self._installed  # type: ignore[method-assign]

    def uninstall(self) -> None:
        """Put the engine's own ``step`` back (idempotent; after an error too)."""
        engine = self.zero.engine
        if self._installed is not None and vars(engine).get("step") is self._installed:
            del engine.step
        self._installed, self._pending, self._armed = None, None, False

    def overflow(self) -> torch.Tensor | None:
        """None: DeepSpeed's fp16 loss scaler decides inside its step (``ZeroEngine.overflowed``)."""
        return None

    def gradient_scale(self) -> torch.Tensor | None:
        """None: ``ZeroEngine.measure`` divides the norms by DeepSpeed's loss scale itself."""
        return None

    def decide(self, flag: torch.Tensor | None) -> None:
        """Take this step's agreed finite flag (``on_before_optimizer_step``); None: apply the step."""
        self._applied = None
        self._pending, self._armed = flag, True

    def take_applied(self) -> bool | None:
        """Whether the last step's update was applied (False: refused by the guard); None when not known."""
        applied, self._applied = self._applied, None
        return applied

    def run(self, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The engine's ``step``: at a step the callback decided, through ``ZeroEngine.step``."""
        if not self._armed:  # a micro-batch inside a window, or after the fit: the engine's own step
            return original(*args, **kwargs)
        flag, self._pending, self._armed = self._pending, None, False
        returned: list[Any] = []
        self._applied = self.zero.step(flag, take_step=lambda: returned.append(original(*args, **kwargs)))
        return returned[0] if returned else None
