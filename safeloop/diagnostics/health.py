"""Weight health during training: weights that collapse to zero, rows that get no gradient.

Measured on device once per ``log_every`` steps (the gradients of the log step itself, the
weights after its update) and read on the host in the same transfer as the training metrics.
Nothing here changes the model: a weight that collapses mid-run is reported, not re-initialised.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from safeloop.results import Finding

__all__ = ["WeightHealth", "lookup_tables", "DEAD_ROW_FRACTION", "DEAD_ROW_CHECKS"]

# AUTOTRAINER calls a ReLU layer dying when >= 70% of its units get no gradient; requiring it at
# 3 log checks in a row keeps one odd batch from raising it.
DEAD_ROW_FRACTION = 0.7
DEAD_ROW_CHECKS = 3


def lookup_tables(model: torch.nn.Module) -> list[str]:
    """Names of the embedding tables of ``model`` (``nn.Embedding``, ``nn.EmbeddingBag``).

    A row of such a table gets gradient only when its index is in the batch: with a vocabulary
    larger than a batch's tokens most rows get none at every step, and rows of tokens the data
    never holds get none ever. They are not units, so they say nothing about dead units.
    """
    tables = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
    }
    return [name for name, param in model.named_parameters() if id(param) in tables]


def _rows_with_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Which rows of a 2-D gradient hold a nonzero (a NaN row does not), as a bool vector.

    A sum of absolute values is 0 only when every term is, so for float32/float64 one BLAS
    matrix-vector product does what ``abs().amax(dim=1) > 0`` does in about 20% fewer
    instructions; half precision keeps the reduction (no half-precision BLAS on every device).
    """
    magnitudes = grad.abs()
    if grad.dtype in (torch.float32, torch.float64) and grad.shape[1] > 0:
        return torch.mv(magnitudes, magnitudes.new_ones(grad.shape[1])) > 0
    return magnitudes.amax(dim=1) > 0


class WeightHealth:
    """Watches the trainable weights of 2 or more dims of a model.

    Args:
        named_params (`Iterable[tuple[str, Parameter]]`): the unwrapped model's parameters.
        zero_at_start (`Iterable[str]`): names of weights that were all zeros before the first
            update and left so on purpose (they are not reported as collapsing).
        lookup_tables (`Iterable[str]`): names of embedding tables (see `lookup_tables`): rows
            indexed by the batch, not units, so their rows without gradient are not dead units.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        zero_at_start: Iterable[str] = (),
        lookup_tables: Iterable[str] = (),
    ) -> None:
        self.weights = [(n, p) for n, p in named_params if p.requires_grad and p.dim() >= 2 and p.numel() > 0]
        self.zero_at_start = set(zero_at_start)
        tables = set(lookup_tables)
        # weights whose rows are units (a Linear's outputs, a conv's channels): the dead-unit check
        self.unit_weights = [(n, p) for n, p in self.weights if n not in tables]
        self._row_masks: list[torch.Tensor] | None = None
        self._dead_streak: dict[str, int] = {}
        # set when the first backward gave every parameter an exactly zero gradient (a loss through
        # `round` or a threshold): rows without gradient are that, not dead units
        self.rows_explained = False
        self._reported: set[tuple[str, str]] = set()

    def capture_gradients(self) -> None:
        """Keep, on device, which rows of each weight received gradient this step."""
        masks = []
        for _, param in self.unit_weights:
            if param.grad is None:
                masks.append(torch.ones(param.shape[0], dtype=torch.bool, device=param.device))
            else:
                masks.append(_rows_with_gradient(param.grad.detach().flatten(1)))
        self._row_masks = masks

    def measurements(self, nonzero: bool = True) -> torch.Tensor | None:
        """The device vector to read at a log step: per weight "not all zero", then row masks.

        The trainer reads it together with the training metrics, in the same transfer.

        Args:
            nonzero (`bool`, *optional*, defaults to True): measure "not all zero" here; False
                when the caller has each weight's norm anyway (a norm of 0 is an all-zero weight)
                and hands it to :meth:`check`, which saves a pass over every weight.
        """
        if not self.weights:
            return None
        device = self.weights[0][1].device
        parts = []
        if nonzero:
            parts.append(torch.stack([p.detach().any().to(device) for _, p in self.weights]).float())
        if self._row_masks is not None:
            parts += [mask.to(device).float() for mask in self._row_masks]
        return torch.cat(parts) if parts else None

    def check(
        self, step: int, values: list[float], weight_norms: dict[str, float] | None = None
    ) -> list[Finding]:
        """Turn the host values of ``measurements()`` into new findings.

        Args:
            step (`int`): the log step.
            values (`list[float]`): the host values of ``measurements()``.
            weight_norms (`dict[str, float]`, *optional*): each weight's norm, when
                ``measurements(nonzero=False)`` left "not all zero" to them. A norm of exactly 0
                is an all-zero weight (a NaN norm is not: its weight holds a NaN).
        """
        if not self.weights:
            return []
        if weight_norms is not None:
            nonzero = [1.0 if weight_norms.get(name, 1.0) != 0.0 else 0.0 for name, _ in self.weights]
            rows = values
        else:
            nonzero, rows = values[: len(self.weights)], values[len(self.weights) :]
        findings = [
            self._collapsed(name, step) for (name, _), ok in zip(self.weights, nonzero, strict=True) if not ok
        ]
        if self._row_masks is not None and rows and not self.rows_explained:
            offset = 0
            upstream: str | None = None
            for (name, param), mask in zip(self.unit_weights, self._row_masks, strict=True):
                alive = rows[offset : offset + mask.numel()]
                offset += mask.numel()
                finding = self._dead_rows(name, tuple(param.shape), alive, step, upstream)
                findings.append(finding)
                if finding is not None and upstream is None:
                    upstream = name
        self._row_masks = None
        return [f for f in findings if f is not None]

    def _collapsed(self, name: str, step: int) -> Finding | None:
        if name in self.zero_at_start or (name, "zero") in self._reported:
            return None
        self._reported.add((name, "zero"))
        return Finding(
            code="zero-params",
            severity="warning",
            message=(
                f"`{name}` collapsed to all zeros during training (seen at step {step}); it no "
                "longer passes any signal."
            ),
            params=(name,),
            step=step,
            suggestion=(
                "Look for an excessive weight decay or learning rate, or code that writes the "
                "weight in place (`.data.zero_()`, masking)."
            ),
        )

    def _dead_rows(
        self, name: str, shape: tuple[int, ...], alive: list[float], step: int, upstream: str | None
    ) -> Finding | None:
        dead = alive.count(0.0)  # (a C loop: thousands of rows at every log step)
        fraction = dead / max(len(alive), 1)
        streak = self._dead_streak[name] = (
            self._dead_streak.get(name, 0) + 1 if fraction >= DEAD_ROW_FRACTION else 0
        )
        if streak < DEAD_ROW_CHECKS or (name, "dead") in self._reported:
            return None
        self._reported.add((name, "dead"))
        return Finding(
            code="dead-units",
            severity="warning",
            message=(
                f"`{name}` {shape}: {dead} of {len(alive)} rows ({fraction:.0%}) received no gradient "
                f"at {DEAD_ROW_CHECKS} log steps in a row (last at step {step}): "
                + (
                    f"it sits downstream of `{upstream}`, whose units are dead, so its input is zero."
                    if upstream is not None and dead == len(alive)
                    else "their units never activate (dead ReLU) or their output is cut off."
                )
            ),
            params=(name,),
            step=step,
            suggestion=(
                "Lower the learning rate, use LeakyReLU/GELU, check the initialisation and bias "
                "of the layer, or normalise its inputs."
            ),
        )
