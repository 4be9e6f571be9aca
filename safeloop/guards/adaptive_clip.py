"""Adaptive gradient clipping: clip a gradient norm that is an outlier against its own history.

The idea and defaults follow ZClip (Kumar et al., 2025): keep exponential moving averages of the
global gradient norm's mean and variance; when a step's norm has a z-score above ``zscore``,
scale the gradients so that the norm becomes ``mean + zscore**2 / z * std`` (the "reciprocal"
rule: the larger the outlier, the closer to the mean it is brought), and feed the clipped norm to
the averages. Everything stays on the device: no host read, no branch on a tensor value.

Off by default (``adaptive_clip=None``); it replaces ``clip_grad_norm``, whose fixed bound it
makes relative.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["AdaptiveClip", "DEFAULT_ALPHA", "DEFAULT_WARMUP"]

DEFAULT_ALPHA = 0.97  # ZClip's EMA factor
DEFAULT_WARMUP = 25  # ZClip's warm-up: steps whose norms only build the statistics


class AdaptiveClip:
    """A z-score clip of the global gradient norm, on the device.

    Args:
        zscore (`float`): norms more than this many running standard deviations above the
            running mean are clipped.
        alpha (`float`, *optional*, defaults to 0.97): EMA factor of the mean and variance.
        warmup (`int`, *optional*, defaults to 25): steps observed before any clipping.
    """

    def __init__(self, zscore: float, *, alpha: float = DEFAULT_ALPHA, warmup: int = DEFAULT_WARMUP) -> None:
        self.zscore = zscore
        self.alpha = alpha
        self.warmup = warmup
        self.steps = 0
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def apply(self, parameters: Iterable[torch.nn.Parameter], total_norm: torch.Tensor) -> torch.Tensor:
        """Scale the gradients of one step if its norm is an outlier; return the coefficient.

        Args:
            parameters (`Iterable[Parameter]`): the parameters whose ``.grad`` to scale.
            total_norm (`torch.Tensor`): the step's global gradient norm (before any clipping).

        Returns:
            `torch.Tensor`: the 0-dim factor applied to the gradients (1.0 when not clipped).
        """
        norm = total_norm.detach().float()
        finite = torch.isfinite(norm)
        safe = torch.where(finite, norm, torch.zeros_like(norm))  # NaN/Inf: the NaN guard's business
        self.steps += 1
        if self.mean is None or self.var is None:
            self.mean, self.var = safe.clone(), torch.zeros_like(safe)
            return torch.ones_like(norm)
        if self.steps <= self.warmup:
            self._update(safe, finite)
            return torch.ones_like(norm)
        std = self.var.clamp_min(0).sqrt().clamp_min(1e-12)
        z = (safe - self.mean) / std
        outlier = finite & (z > self.zscore)
        target = self.mean + (self.zscore**2 / z.clamp_min(1e-12)) * std
        coefficient = torch.where(outlier, target / safe.clamp_min(1e-12), torch.ones_like(norm))
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coefficient.to(grads[0].device))
        self._update(torch.where(outlier, target, safe), finite)
        return coefficient

    def _update(self, value: torch.Tensor, finite: torch.Tensor) -> None:
        assert self.mean is not None and self.var is not None  # invariant: set at the first step
        delta = value - self.mean
        mean = self.mean + (1 - self.alpha) * delta
        var = self.alpha * (self.var + (1 - self.alpha) * delta * delta)
        # a non-finite step leaves the statistics as they were
        self.mean = torch.where(finite, mean, self.mean)
        self.var = torch.where(finite, var, self.var)

    def state_dict(self) -> dict[str, float | int | None]:
        """JSON state for checkpoints (a host read: only when a checkpoint is written)."""
        return {
            "steps": self.steps,
            "mean": None if self.mean is None else float(self.mean),
            "var": None if self.var is None else float(self.var),
        }

    def load_state_dict(self, state: dict[str, float | int | None], device: torch.device) -> None:
        """Restore :meth:`state_dict`."""
        self.steps = int(state["steps"] or 0)
        mean, var = state["mean"], state["var"]
        self.mean = None if mean is None else torch.tensor(float(mean), device=device)
        self.var = None if var is None else torch.tensor(float(var), device=device)
