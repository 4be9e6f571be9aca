"""Judging a run's gradients and updates: exploding or vanishing gradients, a learning rate off.

``TrainingMonitor`` is what the trainer drives. It hands the device-side work (per-step gradient
norms, update sizes around ``optimizer.step()``, the log step's vector and reading it back,
sharded or not) to ``GradientStats`` in ``gradient_stats.py``, and owns the host-side judging:
``check`` turns one interval's ``GradientWindow``, with the per-step losses and global norms the
trainer already read, into findings (exploding global norm, first/last layer ratio, vanishing
gradients, parameters without a gradient). The update sizes are judged, and a flat loss is
reported with these measurements as its causes, in ``plateau.py``. ``check`` is deterministic:
every process sees the same means and decides the same. Nothing here changes the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from safeloop.diagnostics.gradient_stats import GradientStats, GradientWindow
from safeloop.diagnostics.layer_rise import LayerRise
from safeloop.diagnostics.no_learning import NoLearning
from safeloop.diagnostics.oscillation import Oscillation
from safeloop.diagnostics.plateau import LossPlateau
from safeloop.diagnostics.updates import CONTEXT_RANKS, Cause, UpdateSize, listing
from safeloop.diagnostics.window_stats import WindowMedian
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

# "exploding-grad": a global norm > 100x its running median. The median of the last
# 1000 step norms, taken only after 3 log checks and 20 steps, so the large norms of the very
# first steps neither raise an alarm nor hide a later explosion for long.
EXPLODE_FACTOR = 100.0
EXPLODE_WARMUP_CHECKS = 3
EXPLODE_WARMUP_STEPS = 20
_HISTORY_STEPS = 1000
# First/last layer gradient-norm ratio > 70 (AUTOTRAINER's exploding rule).
LAYER_RATIO_LIMIT = 70.0
# "vanishing-grad": gradient norm below 1e-7 of the weight norm. A layer must also be
# 1000x below the best-fed layer: when every layer is that small the loss is simply near zero.
VANISH_RELATIVE = 1e-7
VANISH_SPREAD = 1e-3
# Log checks in a row a condition must hold, so one odd batch or one log step raises nothing.
STREAK_CHECKS = 3


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
            (FSDP2's DTensors, FSDP1's flat slices): the values given back to ``check`` /
            ``tracker_values`` must be the mean over the ``shard_count`` processes of
            ``measurements()`` (what the trainer's metrics all-reduce computes); see
            ``GradientStats``.
        shapes (`Sequence[torch.Size]`, *optional*): the whole shape of each parameter, in
            ``named_params`` order, where a parameter's own shape is that of its local slice
            (FSDP1 with ``use_orig_params=True``, see ``ShardLayout.shapes``).
        measure_updates (`bool`, *optional*, defaults to True): measure ``||dw|| / ||w||`` on log
            steps (a copy of the weights of 2+ dims lives from ``before_update`` to
            ``after_update``).
        plateau_window (`int`, *optional*): log checks without improvement that make a plateau.

    Raises:
        ValueError: when ``shapes`` does not give one shape per parameter.

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
        local: Callable[[torch.nn.Parameter], torch.Tensor] | None = None,
        measure_updates: bool = True,
        plateau_window: int | None = None,
    ) -> None:
        self._stats = GradientStats(
            named_params,
            sharded=sharded,
            shard_count=shard_count,
            shapes=shapes,
            local=local,
            measure_updates=measure_updates,
        )
        self.names = self._stats.names  # the parameter names the findings quote
        self._plateau = LossPlateau(log_every, plateau_window)
        self.no_learning = NoLearning(self._plateau.window)  # judged once its baseline is set
        self._oscillation = Oscillation(self._plateau.window)
        self._rise = LayerRise(self.names)
        self._checks = 0
        self._history = WindowMedian(_HISTORY_STEPS)
        self._streaks: dict[str, int] = {}
        self._vanishing: dict[int, int] = {}
        self._reported: set[str] = set()
        self._updates = UpdateSize()
        self._vanishing_now: list[int] = []
        self._no_grad: list[int] = []
        self._found: list[Finding] = []  # this monitor's findings so far, causes of a later plateau
        self._last_lr: float | None = None
        self._measured = False  # per-parameter values were read at the last check

    # -- device side: GradientStats measures ------------------------------------------------

    def record(self, per_param: torch.Tensor | None, total: torch.Tensor | None = None) -> None:
        """Add one optimizer step's gradient norms to the interval's measurements, on the device.

        Args:
            per_param (`torch.Tensor | None`): ``GradNorms.per_param`` (norms of this process's
                shards with ``shard_count``); None where per-parameter norms are not available.
            total (`torch.Tensor`, *optional*): the global norm; not used, because the trainer's
                metrics buffer already reads every step's global norm.
        """
        del total
        self._stats.record(per_param)

    def clear(self) -> None:
        """Drop the interval's unread measurements (its steps were undone by a rollback)."""
        self._stats.clear()

    def after_rollback(self) -> None:
        """Forget the abandoned branch: the interval's measurements and the plateau's history."""
        self.clear()
        self._plateau.restart()
        self.no_learning.restart()
        self._oscillation.restart()
        self._updates.restart()
        self._rise.restart()
        # the norms and streaks of the abandoned branch (rising toward the divergence) are no
        # reference for the restored state's
        self._history.clear()
        self._streaks.clear()
        self._vanishing.clear()

    def before_update(self) -> None:
        """Copy the weights of 2+ dims before ``optimizer.step()`` (log steps only)."""
        self._stats.before_update()

    def after_update(self) -> None:
        """Measure ``||dw||`` of each weight from the copy; the copy is freed, weights untouched."""
        self._stats.after_update()

    def measurements(self) -> torch.Tensor | None:
        """The device vector to read at a log step, then the interval restarts.

        Returns:
            `torch.Tensor | None`: see ``GradientStats.measurements``; None where per-parameter
            norms are not available.
        """
        return self._stats.measurements()

    @property
    def weight_names(self) -> list[str]:
        """The names of the weights (2+ dims) whose norms ``measurements()`` holds."""
        return [self.names[i] for i in self._stats.weights]

    @property
    def measures_weight_norms(self) -> bool:
        """Whether the next ``measurements()`` holds each whole weight's norm."""
        return self._stats.measures_weight_norms

    def weight_norms(self, values: Sequence[float]) -> dict[str, float] | None:
        """Each weight's norm by name, from the host values of ``measurements()`` (or None)."""
        return self._stats.weight_norms(values)

    def tracker_values(self, values: Sequence[float]) -> dict[str, float]:
        """Tracker entries for ``accelerator.log``, from the host values of ``measurements()``.

        Args:
            values (`Sequence[float]`): host values of ``measurements()`` (empty when it gave None).

        Returns:
            `dict[str, float]`: see ``GradientStats.tracker_values``; empty without per-parameter
            values.
        """
        return self._stats.tracker_values(values)

    # -- host side: judging ----------------------------------------------------------------

    def check(
        self,
        step: int,
        values: Sequence[float],
        *,
        losses: Sequence[float] = (),
        grad_norms: Sequence[float] = (),
        lr: float | None = None,
        context: Sequence[Finding] = (),
        eval_loss: float | None = None,
        applied: bool = True,
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
            eval_loss (`float`, *optional*): the last evaluation loss, quoted by ``no-learning``.
            applied (`bool`, *optional*, defaults to True): the log step's update was applied (not
                skipped), so a weight that did not move at all tells of the learning rate.

        Returns:
            `list[Finding]`: findings not reported before.
        """
        window = self._stats.decode(values)
        self._last_lr, self._measured = lr, window is not None
        findings = [self._exploding(step, grad_norms, window)]
        if window is not None:
            findings += [self._layer_ratio(step, window), self._vanishing_grad(step, window)]
            self._no_grad = [i for i in self._stats.trainable if window.grads[i] == 0.0]
            ratios = self._ratios(window, applied)
            findings += self._updates.judge(step, ratios, losses, lr)
            findings.append(self._oscillation.check(step, losses, self._updates.median, ratios, lr))
        self._checks += 1
        found = [f for f in findings if f is not None]
        self._found += found
        if self.no_learning.update(step, losses, lr):
            causes = self._causes(lr) if window is not None else []
            found.append(
                self.no_learning.finding(step, causes, [*context, *self._found], eval_loss=eval_loss)
            )
        if self._plateau.update(losses):
            causes = self._causes(lr) if window is not None else []
            found.append(
                self._plateau.finding(step, causes, [*context, *self._found], measured=window is not None)
            )
        return found

    def causes_now(self) -> list[Cause]:
        """The causes of a flat loss measured at the last check (none where nothing is measured)."""
        return self._causes(self._last_lr) if self._measured else []

    def plan(self, planned: int | None, steps_per_epoch: int | None) -> None:
        """The run's planned optimizer steps and steps per epoch (None: unknown), for the lr checks."""
        self._updates.planned, self._updates.steps_per_epoch = planned, steps_per_epoch

    def _ratios(self, window: GradientWindow, applied: bool) -> dict[str, float]:
        """``||dw|| / ||w||`` of the weights that say something about the learning rate."""
        ratios, unmoved = {}, {}
        for i in self._stats.weights:
            norm, update = window.norms[i], window.updates[i]
            # NaN (not measured) fails both tests; a layer whose gradient vanished says nothing
            # about the learning rate
            if not (window.grads[i] > 0 and norm > 0) or i in self._vanishing_now:
                continue
            if update > 0 and math.isfinite(update / norm):
                ratios[self.names[i]] = update / norm
            elif update == 0.0:
                unmoved[self.names[i]] = 0.0
        # an applied update that moved none of the weights that got a gradient: every learning
        # rate is 0 (a ratio of 0, lr-too-low); weights that stay put beside others that move
        # are a group frozen on purpose (lr 0 for a backbone) and say nothing
        return unmoved if applied and unmoved and not ratios else ratios

    def _due(self, key: str, condition: bool) -> bool:
        """Count ``condition`` in a row; True once it held ``STREAK_CHECKS`` times, until reported."""
        self._streaks[key] = self._streaks.get(key, 0) + 1 if condition else 0
        return self._streaks[key] >= STREAK_CHECKS and key not in self._reported

    @property
    def layer_rise(self) -> tuple[str, tuple[str, ...]]:
        """The layers whose gradient norms rose most at the last log check: (message text, names).

        For the ``exploding-grad`` finding of a refused step or a divergence.
        """
        return self._rise.last

    def _exploding(
        self, step: int, grad_norms: Sequence[float], window: GradientWindow | None
    ) -> Finding | None:
        self._rise.update(step, None if window is None else window.grads, self._stats.trainable)
        finite = [(v, i) for i, v in enumerate(grad_norms) if math.isfinite(v)]
        warm = self._checks >= EXPLODE_WARMUP_CHECKS and len(self._history) >= EXPLODE_WARMUP_STEPS
        median = self._history.median() if warm else 0.0
        self._history.extend(v for v, _ in finite)
        if not finite or median <= 0 or "global" in self._reported:
            return None
        peak, at = max(finite)
        if peak <= EXPLODE_FACTOR * median:
            return None
        self._reported.add("global")
        top: list[tuple[str, float]] = []
        if window is not None:
            top = sorted(
                ((self.names[i], window.grads[i]) for i in self._stats.trainable), key=lambda t: -t[1]
            )[:3]
        return Finding(
            code="exploding-grad",
            severity="warning",
            message=(
                f"The global gradient norm reached {peak:.3g} at step {step - len(grad_norms) + 1 + at}, "
                f"{peak / median:.0f}x its running median {median:.3g} (threshold {EXPLODE_FACTOR:.0f}x)"
                + (f"; largest mean gradient norms this interval: {listing(top)}" if top else "")
                + (f"; {self.layer_rise[0]}" if "rose most" in self.layer_rise[0] else "")
                + ". Likely a learning rate too high for the model, weights growing without "
                "normalisation, or a deep stack amplifying gradients."
            ),
            params=tuple(name for name, _ in top),
            step=step,
            suggestion="Clip gradients (clip_grad_norm=1.0), lower the learning rate, or add "
            "normalisation layers / a smaller initialisation.",
        )

    def _layer_ratio(self, step: int, window: GradientWindow) -> Finding | None:
        live = [i for i in self._stats.weights if window.grads[i] > 0]
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

    def _vanishing_grad(self, step: int, window: GradientWindow) -> Finding | None:
        relative = {
            i: window.grads[i] / window.norms[i]
            for i in self._stats.weights
            if window.grads[i] > 0 and window.norms[i] > 0 and math.isfinite(window.norms[i])
        }  # no gradient at all, or an all-zero weight, is left to the checks made for it
        best = max(relative.values(), default=0.0)
        self._vanishing_now = [
            i for i, r in relative.items() if r < VANISH_RELATIVE and r < VANISH_SPREAD * best
        ]
        for i in self._stats.weights:
            self._vanishing[i] = self._vanishing.get(i, 0) + 1 if i in self._vanishing_now else 0
        new = [
            i
            for i in self._stats.weights
            if self._vanishing[i] >= STREAK_CHECKS and f"v{i}" not in self._reported
        ]
        if not new:
            return None
        self._reported.update(f"v{i}" for i in new)
        return Finding(
            code="vanishing-grad",
            severity="warning",
            message=(
                f"{len(new)} of {len(self._stats.weights)} weights got a gradient norm below "
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
            total = sum(self._stats.numels[i] for i in self._stats.trainable)
            share = sum(self._stats.numels[i] for i in self._no_grad) / total
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
