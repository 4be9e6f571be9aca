"""Gradients and updates during training: exploding or vanishing gradients, a learning rate off.

Per optimizer step ``record`` adds the step's per-parameter gradient norms to a running sum on the
device (two small kernels, no host read). On log steps only, ``before_update`` and
``after_update`` measure each weight's update ``||dw||`` around ``optimizer.step()``;
``measurements`` returns one device vector that the trainer reads in its single transfer, and
``check`` turns its host values, with the per-step losses and global norms the trainer already
read, into findings. The update sizes are judged, and a flat loss is reported with these
measurements as its causes, in ``plateau.py``. ``check`` is deterministic: every process sees the
same means and decides the same. Nothing here changes the model.

Sharded parameters (FSDP2, or FSDP1 with ``use_orig_params=True``: ``shard_count``): each process
holds a shard of every parameter and of its reduce-scattered gradient (under FSDP1 a flat slice,
whose whole shape comes in ``shapes``), so it measures squared norms of its shards. It keeps one such
row per step of the interval on the device (the square root of a sum over processes cannot be
taken before the sum), and the trainer's one all-reduce of the log step sums the rows over
processes (a mean, multiplied back here): no collective of its own, no per-step host read. The
interval's gradient norm is then the mean of the step norms, as without sharding, so a sharded
run reports the same values and findings as an unsharded one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from safeloop.diagnostics.plateau import CONTEXT_RANKS, Cause, LossPlateau, UpdateSize, listing
from safeloop.results import Finding

__all__ = [
    "TrainingMonitor",
    "EXPLODE_FACTOR",
    "EXPLODE_WARMUP_CHECKS",
    "EXPLODE_WARMUP_STEPS",
    "LAYER_RATIO_LIMIT",
    "VANISH_RELATIVE",
    "VANISH_SPREAD",
    "STREAK_CHECKS",
]

# FINDINGS.md "exploding-grad": a global norm > 100x its running median. The median of the last
# 1000 step norms, taken only after 3 log checks and 20 steps, so the large norms of the very
# first steps neither raise an alarm nor hide a later explosion for long.
EXPLODE_FACTOR = 100.0
EXPLODE_WARMUP_CHECKS = 3
EXPLODE_WARMUP_STEPS = 20
_HISTORY_STEPS = 1000
# FINDINGS.md: first/last layer gradient-norm ratio > 70 (AUTOTRAINER's exploding rule).
LAYER_RATIO_LIMIT = 70.0
# FINDINGS.md "vanishing-grad": gradient norm below 1e-7 of the weight norm. A layer must also be
# 1000x below the best-fed layer: when every layer is that small the loss is simply near zero.
VANISH_RELATIVE = 1e-7
VANISH_SPREAD = 1e-3
# Log checks in a row a condition must hold, so one odd batch or one log step raises nothing.
STREAK_CHECKS = 3


@dataclass(frozen=True)
class _Window:
    grads: list[float]  # mean gradient norm over the interval, one per parameter
    norms: dict[int, float]  # weight norm after the log step's update, by parameter index
    updates: dict[int, float]  # ||dw|| of the log step's update (NaN when not measured)


class TrainingMonitor:
    """Watches gradient norms, update sizes and the loss of a run.

    Args:
        named_params (`Iterable[tuple[str, Parameter]]`): the unwrapped model's parameters, in
            ``model.parameters()`` order (the order of ``GradNorms.per_param``).
        log_every (`int`, *optional*, defaults to 10): optimizer steps between two checks.
        sharded (`bool`, *optional*, defaults to False): parameters are flat shards (FSDP1,
            DeepSpeed) that say nothing about one parameter; only the global-norm and plateau
            checks run.
        shard_count (`int`, *optional*): parameters are sharded over this many processes
            (FSDP2's DTensors, FSDP1's flat slices): ``record`` takes the norms of this
            process's gradient shards,
            ``measurements`` holds squared norms of shards (one row of gradient norms per step
            of the interval), and the values given back to
            ``check`` / ``tracker_values`` must be their mean over the ``shard_count``
            processes (what the trainer's metrics all-reduce computes).
        shapes (`Sequence[torch.Size]`, *optional*): the whole shape of each parameter, in
            ``named_params`` order, where a parameter's own shape is that of its local slice
            (FSDP1 with ``use_orig_params=True``, see ``ShardLayout.shapes``).
        measure_updates (`bool`, *optional*, defaults to True): measure ``||dw|| / ||w||`` on log
            steps (a copy of the weights of 2+ dims lives from ``before_update`` to
            ``after_update``).
        plateau_window (`int`, *optional*): log checks without improvement that make a plateau.

    Example:
        >>> monitor = TrainingMonitor(model.named_parameters(), log_every=10)
        >>> monitor.record(norms.per_param)  # every optimizer step, device only
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        log_every: int = 10,
        *,
        sharded: bool = False,
        shard_count: int | None = None,
        shapes: Sequence[torch.Size] | None = None,
        measure_updates: bool = True,
        plateau_window: int | None = None,
    ) -> None:
        named = list(named_params)
        # whole shapes: a DTensor's own, FSDP1's given ones. The same on every process, so every
        # process builds the same vector layout even where its own shard is empty
        self._shard_count = shard_count
        self.names = [name for name, _ in named]
        self._params = [param for _, param in named]
        if shapes is None:
            self._numels, dims = [p.numel() for p in self._params], [p.dim() for p in self._params]
        elif len(shapes) != len(self._params):
            raise ValueError(f"{len(shapes)} shapes for {len(self._params)} parameters")
        else:
            self._numels, dims = [torch.Size(s).numel() for s in shapes], [len(s) for s in shapes]
        self._trainable = [i for i, p in enumerate(self._params) if p.requires_grad and self._numels[i] > 0]
        self._weights = [i for i in self._trainable if dims[i] >= 2]
        self._per_param = not sharded and bool(self._trainable)
        self._measure_updates = measure_updates
        self._plateau = LossPlateau(log_every, plateau_window)
        self._sum: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []  # sharded: squared shard norms, one row per step
        self._count = 0
        self._snapshot: list[torch.Tensor] | None = None
        self._update: torch.Tensor | None = None
        self._pending: int | None = None  # steps summed in the vector last handed out
        self._checks = 0
        self._history: deque[float] = deque(maxlen=_HISTORY_STEPS)
        self._streaks: dict[str, int] = {}
        self._vanishing: dict[int, int] = {}
        self._reported: set[str] = set()
        self._updates = UpdateSize()
        self._vanishing_now: list[int] = []
        self._no_grad: list[int] = []
        self._found: list[Finding] = []  # this monitor's findings so far, causes of a later plateau

    # -- device side -----------------------------------------------------------------------

    def record(self, per_param: torch.Tensor | None, total: torch.Tensor | None = None) -> None:
        """Add one optimizer step's gradient norms to the interval's measurements, on the device.

        Args:
            per_param (`torch.Tensor | None`): ``GradNorms.per_param`` (norms of this process's
                shards with ``shard_count``); None where per-parameter norms are not available.
            total (`torch.Tensor`, *optional*): the global norm; not used, because the trainer's
                metrics buffer already reads every step's global norm.
        """
        del total
        if per_param is None or not self._per_param:
            return
        if per_param.numel() != len(self._params):  # not the parameters given: degrade, never misname
            self._per_param, self._sum, self._rows = False, None, []
            return
        # a skipped step's NaN/Inf norms would poison the whole interval; they count as 0 here
        clean = per_param.detach().float().nan_to_num(0.0, 0.0, 0.0)
        self._count += 1
        if self._shard_count is not None:
            # shard norms add up over processes only as squares, and a step's norm is the root of
            # that sum: keep the step's row (measurements(), every log_every steps, empties the list)
            self._rows.append(clean * clean)
            return
        self._sum = clean if self._sum is None else self._sum.add_(clean)

    def clear(self) -> None:
        """Drop the interval's unread measurements (its steps were undone by a rollback)."""
        self._sum, self._count, self._snapshot, self._update = None, 0, None, None
        self._rows = []

    def before_update(self) -> None:
        """Copy the weights of 2+ dims before ``optimizer.step()`` (log steps only)."""
        if self._measure_updates and self._per_param and self._weights:
            self._snapshot = [self._local(i).clone() for i in self._weights]

    def after_update(self) -> None:
        """Measure ``||dw||`` of each weight from the copy; the copy is freed, weights untouched."""
        if self._snapshot is None:
            return
        with torch.no_grad():
            torch._foreach_sub_(self._snapshot, [self._local(i) for i in self._weights])
            norms = torch._foreach_norm(self._snapshot)
        device = self._local(self._weights[0]).device
        self._update = self._squared_if_sharded(torch.stack([n.float().to(device) for n in norms]))
        self._snapshot = None

    def measurements(self) -> torch.Tensor | None:
        """The device vector to read at a log step, then the interval restarts.

        Layout: summed gradient norm per parameter, norm of each weight of 2+ dims, its last
        ``||dw||`` (NaN when not measured). With ``shard_count``, the first part is one row of
        gradient norms per step of the interval, and every entry is the square of this
        process's shard's norm, to be summed over processes. None where per-parameter norms
        are not available.
        """
        count, summed, rows, update = self._count, self._sum, self._rows, self._update
        self._count, self._sum, self._rows, self._update = 0, None, [], None
        if not self._per_param:
            self._pending = None
            return None
        self._pending = count
        device = self._local(self._trainable[0]).device
        nan = float("nan")
        if self._shard_count is not None:
            summed = torch.cat(rows) if rows else None
        parts = [
            torch.full((len(self._params),), nan, device=device) if summed is None else summed.to(device)
        ]
        if self._weights:
            with torch.no_grad():
                norms = torch._foreach_norm([self._local(i) for i in self._weights])
            parts.append(self._squared_if_sharded(torch.stack([n.float().to(device) for n in norms])))
            parts.append(torch.full((len(self._weights),), nan, device=device) if update is None else update)
        return torch.cat(parts)

    def _local(self, index: int) -> torch.Tensor:
        """This process's part of a parameter (its shard under FSDP2; FSDP1's is the parameter), detached."""
        param = self._params[index].detach()
        return param.to_local() if hasattr(param, "to_local") else param

    def _squared_if_sharded(self, norms: torch.Tensor) -> torch.Tensor:
        return norms * norms if self._shard_count is not None else norms

    # -- host side -------------------------------------------------------------------------

    def _decode(self, values: Sequence[float]) -> _Window | None:
        n, w, steps = len(self._params), len(self._weights), self._pending
        if not steps:
            return None
        if self._shard_count is not None:
            if len(values) != n * steps + 2 * w:
                return None
            # the values are means over processes of squared shard norms: times the shard count
            # they are squared norms of whole tensors (exact for 2, 4, 8... processes)
            k = self._shard_count
            whole = [v if math.isnan(v) else math.sqrt(max(v, 0.0) * k) for v in values]
            grads = [sum(whole[s * n + i] for s in range(steps)) / steps for i in range(n)]
            values = whole[n * steps :]
        else:
            if len(values) != n + 2 * w:
                return None
            grads = [v / steps for v in values[:n]]
            values = values[n:]
        norms = dict(zip(self._weights, values[:w], strict=True))
        return _Window(grads, norms, dict(zip(self._weights, values[w:], strict=True)))

    def tracker_values(self, values: Sequence[float]) -> dict[str, float]:
        """Tracker entries for ``accelerator.log``, from the host values of ``measurements()``.

        Returns:
            `dict[str, float]`: ``grad_norm/<name>`` (mean over the interval) for every
            trainable parameter and ``update_ratio/<name>``
            (``||dw|| / ||w||`` of the log step) for every weight of 2+ dims whose update was
            measured; empty without per-parameter values.
        """
        window = self._decode(values)
        if window is None:
            return {}
        out = {f"grad_norm/{self.names[i]}": window.grads[i] for i in self._trainable}
        for i in self._weights:
            norm, update = window.norms[i], window.updates[i]
            if norm > 0 and math.isfinite(update):
                out[f"update_ratio/{self.names[i]}"] = update / norm
        return out

    def check(
        self,
        step: int,
        values: Sequence[float],
        *,
        losses: Sequence[float] = (),
        grad_norms: Sequence[float] = (),
        lr: float | None = None,
        context: Sequence[Finding] = (),
    ) -> list[Finding]:
        """Turn one log interval's host values into new findings.

        Args:
            step (`int`): the global step of the log (steps done so far).
            values (`Sequence[float]`): host values of ``measurements()`` (empty when it gave None).
            losses (`Sequence[float]`): the interval's per-step losses, oldest first.
            grad_norms (`Sequence[float]`): the interval's per-step global norms, oldest first.
            lr (`float`, *optional*): the current learning rate, quoted in messages.
            context (`Sequence[Finding]`): findings of the other monitors so far, ranked as causes
                of a plateau.

        Returns:
            `list[Finding]`: findings not reported before.
        """
        window = self._decode(values)
        findings = [self._exploding(step, grad_norms, window)]
        if window is not None:
            findings += [self._layer_ratio(step, window), self._vanishing_grad(step, window)]
            self._no_grad = [i for i in self._trainable if window.grads[i] == 0.0]
            findings += self._updates.judge(step, self._ratios(window), losses, lr)
        self._checks += 1
        found = [f for f in findings if f is not None]
        self._found += found
        if self._plateau.update(losses):
            causes = self._causes(lr) if window is not None else []
            found.append(
                self._plateau.finding(step, causes, [*context, *self._found], measured=window is not None)
            )
        return found

    def _ratios(self, window: _Window) -> dict[str, float]:
        """``||dw|| / ||w||`` of the weights that say something about the learning rate."""
        ratios = {}
        for i in self._weights:
            norm, update = window.norms[i], window.updates[i]
            # NaN (not measured) fails `> 0`; a zero update is a skipped step or a frozen group;
            # a layer whose gradient vanished says nothing about the learning rate
            if window.grads[i] > 0 and norm > 0 and update > 0 and i not in self._vanishing_now:
                ratio = update / norm
                if math.isfinite(ratio):
                    ratios[self.names[i]] = ratio
        return ratios

    def _due(self, key: str, condition: bool) -> bool:
        """Count ``condition`` in a row; True once it held ``STREAK_CHECKS`` times, until reported."""
        self._streaks[key] = self._streaks.get(key, 0) + 1 if condition else 0
        return self._streaks[key] >= STREAK_CHECKS and key not in self._reported

    def _exploding(self, step: int, grad_norms: Sequence[float], window: _Window | None) -> Finding | None:
        finite = [(v, i) for i, v in enumerate(grad_norms) if math.isfinite(v)]
        warm = self._checks >= EXPLODE_WARMUP_CHECKS and len(self._history) >= EXPLODE_WARMUP_STEPS
        median = statistics.median(self._history) if warm else 0.0
        self._history.extend(v for v, _ in finite)
        if not finite or median <= 0 or "global" in self._reported:
            return None
        peak, at = max(finite)
        if peak <= EXPLODE_FACTOR * median:
            return None
        self._reported.add("global")
        top: list[tuple[str, float]] = []
        if window is not None:
            top = sorted(((self.names[i], window.grads[i]) for i in self._trainable), key=lambda t: -t[1])[:3]
        return Finding(
            code="exploding-grad",
            severity="warning",
            message=(
                f"The global gradient norm reached {peak:.3g} at step {step - len(grad_norms) + 1 + at}, "
                f"{peak / median:.0f}x its running median {median:.3g} (threshold {EXPLODE_FACTOR:.0f}x)"
                + (f"; largest mean gradient norms this interval: {listing(top)}" if top else "")
                + ". Likely a learning rate too high for the model, weights growing without "
                "normalisation, or a deep stack amplifying gradients."
            ),
            params=tuple(name for name, _ in top),
            step=step,
            suggestion="Clip gradients (clip_grad_norm=1.0), lower the learning rate, or add "
            "normalisation layers / a smaller initialisation.",
        )

    def _layer_ratio(self, step: int, window: _Window) -> Finding | None:
        live = [i for i in self._weights if window.grads[i] > 0]
        if len(live) < 2 or self._checks < EXPLODE_WARMUP_CHECKS:
            return None
        first, last = live[0], live[-1]
        ratio = window.grads[first] / window.grads[last]
        if not self._due("layer-ratio", ratio > LAYER_RATIO_LIMIT):
            return None
        self._reported.add("layer-ratio")
        return Finding(
            code="exploding-grad",
            severity="warning",
            message=(
                f"The gradient of the first layer `{self.names[first]}` ({window.grads[first]:.3g}) is "
                f"{ratio:.0f}x that of the last layer `{self.names[last]}` ({window.grads[last]:.3g}) at "
                f"{STREAK_CHECKS} log checks in a row (last at step {step}; threshold "
                f"{LAYER_RATIO_LIMIT:.0f}x): gradients grow as they flow back toward the input."
            ),
            params=(self.names[first], self.names[last]),
            step=step,
            suggestion="Use a smaller initialisation (Xavier/He), normalisation layers or residual "
            "connections, and clip gradients.",
        )

    def _vanishing_grad(self, step: int, window: _Window) -> Finding | None:
        relative = {
            i: window.grads[i] / window.norms[i]
            for i in self._weights
            if window.grads[i] > 0 and window.norms[i] > 0 and math.isfinite(window.norms[i])
        }  # no gradient at all, or an all-zero weight, is left to the checks made for it
        best = max(relative.values(), default=0.0)
        self._vanishing_now = [
            i for i, r in relative.items() if r < VANISH_RELATIVE and r < VANISH_SPREAD * best
        ]
        for i in self._weights:
            self._vanishing[i] = self._vanishing.get(i, 0) + 1 if i in self._vanishing_now else 0
        new = [
            i for i in self._weights if self._vanishing[i] >= STREAK_CHECKS and f"v{i}" not in self._reported
        ]
        if not new:
            return None
        self._reported.update(f"v{i}" for i in new)
        return Finding(
            code="vanishing-grad",
            severity="warning",
            message=(
                f"{len(new)} of {len(self._weights)} weights got a gradient norm below "
                f"{VANISH_RELATIVE:g} of their weight norm at {STREAK_CHECKS} log checks in a row (last "
                f"at step {step}): {listing([(self.names[i], relative[i]) for i in new])} (gradient/"
                f"weight), while the best-fed layer gets {best:.2g}. The gradient dies on its way back "
                "to these layers: saturating activations (sigmoid/tanh) in a deep stack, or a poor init."
            ),
            params=tuple(self.names[i] for i in new),
            step=step,
            suggestion="Use ReLU/GELU activations, Xavier/He initialisation, normalisation layers "
            "(BatchNorm/LayerNorm) or residual connections.",
        )

    def _causes(self, lr: float | None) -> list[Cause]:
        """Causes of a flat loss measured at this check; ``LossPlateau.finding`` ranks them."""
        causes = self._updates.causes(lr)
        if self._no_grad:
            total = sum(self._numels[i] for i in self._trainable)
            share = sum(self._numels[i] for i in self._no_grad) / total
            names = tuple(self.names[i] for i in self._no_grad)
            text = (
                f"{len(names)} trainable parameters ({share:.0%} of the elements) got no gradient this "
                f"interval: {', '.join(f'`{n}`' for n in names[:4])}"
            )
            fix = (
                "Find what cuts them off: dead ReLU units upstream, an unused module, or a detach "
                "(the dead-units, unused-params and detached-params findings name which)."
            )
            # most of the model not learning outranks everything after it; a few frozen-by-accident
            # parameters rank with the other structural faults
            causes.append(Cause(1 if share >= 0.5 else 4, "no-gradient", text, names, fix))
        if self._vanishing_now:
            names = tuple(self.names[i] for i in self._vanishing_now)
            text = f"gradients below {VANISH_RELATIVE:g} of the weight norm in " + ", ".join(
                f"`{n}`" for n in names[:4]
            )
            fix = "Use ReLU/GELU, Xavier/He init, normalisation layers or residual connections."
            causes.append(Cause(CONTEXT_RANKS["vanishing-grad"], "vanishing-grad", text, names, fix))
        return causes
