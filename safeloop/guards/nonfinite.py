"""The NaN/Inf guard: a device flag per optimizer step, and the host policy over skips.

``finite_flag`` is pure and stays on the device. ``SkipTracker`` is host-side policy over plain
numbers (learnt every step on the host-read path, every ``log_every`` steps on the fused path):
it counts skips, builds their events, and says when a run of skips must escalate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["NAN_GUARD_CHOICES", "finite_flag", "true_overflow", "SkipRecord", "SkipTracker", "Escalation"]

NAN_GUARD_CHOICES = ("skip", "raise", "off")
Escalation = Literal["continue", "escalate"]


def finite_flag(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Return a float32 device scalar: 1 when the loss and the global gradient norm are finite.

    The global norm is non-finite as soon as one gradient element is, so one scalar covers
    every gradient. A number rather than a bool: NCCL cannot reduce bool tensors; float32, the
    dtype of the step's metric row, so that it joins the row without a cast every step.

    Args:
        loss (`torch.Tensor`): the step's loss (mean over its micro-batches).
        grad_norm (`torch.Tensor`): the global gradient norm before clipping.

    Returns:
        `torch.Tensor`: 0-dim float32, 1.0 (finite) or 0.0.

    Example:
        >>> finite_flag(torch.tensor(1.0), torch.tensor(float("inf")))
        tensor(0.)
    """
    # loss + 0 * norm: NaN when the norm is NaN or infinite (0 * inf is NaN), the loss itself
    # otherwise, so one check sees both; without the .float()/.detach() copies of two checks
    both = torch.add(loss, grad_norm, alpha=0)
    if both.dim():
        return torch.isfinite(both).all().to(torch.float32)
    # 1 - 0 * both: exactly 1 when both is finite, NaN otherwise, which nan_to_num_ makes 0: three
    # kernels in all, where isfinite is four and its bool needs a copy to float32 (every step)
    flag = torch.rsub(both, 1.0, alpha=0).nan_to_num_(0.0, 0.0, 0.0)
    return flag if flag.dtype == torch.float32 else flag.to(torch.float32)


def true_overflow(scaler_found_inf: torch.Tensor | None, loss: torch.Tensor) -> torch.Tensor | None:
    """The fp16 scaler's skip counts as an overflow only when the loss itself was finite.

    A finite loss whose scaled gradients overflow is the scaler settling its scale (expected,
    never escalated); a NaN/Inf loss is a fault the scaler would otherwise hide forever while it
    keeps halving its scale, so it counts as the guard's skip.

    Example:
        >>> true_overflow(torch.tensor(1.0), torch.tensor(float("nan")))
        tensor(0.)
    """
    if scaler_found_inf is None:
        return None
    return scaler_found_inf * torch.isfinite(loss.detach()).all().to(scaler_found_inf.dtype)


@dataclass(frozen=True)
class SkipRecord:
    """What the host knows about one skipped step.

    Attributes:
        step (`int`): the global step that was skipped (1-based, as ``global_step`` after it).
        loss (`float`): the step's loss (NaN/Inf, or finite when only gradients were bad).
        grad_norm (`float`): the global gradient norm before clipping.
        params (`tuple[str, ...]`): parameters whose gradient was not finite, when known.
    """

    step: int
    loss: float
    grad_norm: float
    params: tuple[str, ...] = ()

    @property
    def cause(self) -> str:
        """``"loss"`` when the loss was not finite, else ``"gradients"``."""
        return "gradients" if math.isfinite(self.loss) else "loss"

    def detail(self) -> dict[str, object]:
        """The JSON-able detail of the ``"skip"`` event."""
        return {
            "cause": self.cause,
            "loss": _json_float(self.loss),
            "grad_norm": _json_float(self.grad_norm),
            "params": list(self.params),
        }


def _json_float(value: float) -> float | str:
    # JSON has no NaN/Inf; keep them readable as strings.
    return value if math.isfinite(value) else str(value)


@dataclass
class SkipTracker:
    """Counts skipped steps in a row and decides when a run of them escalates.

    Args:
        max_consecutive_skips (`int`): more skips in a row than this escalate.
    """

    max_consecutive_skips: int
    consecutive: int = 0

    def observe(self, finite: bool) -> Escalation:
        """Take the outcome of one step, in step order.

        Args:
            finite (`bool`): whether the step was applied.

        Returns:
            `str`: ``"escalate"`` when this skip makes the run of skips exceed the limit.
        """
        if finite:
            self.consecutive = 0
            return "continue"
        self.consecutive += 1
        return "escalate" if self.consecutive > self.max_consecutive_skips else "continue"

    def state_dict(self) -> dict[str, Any]:
        """The run of skips under way, for checkpoints."""
        return {"consecutive_skips": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.consecutive = int(state["consecutive_skips"])
