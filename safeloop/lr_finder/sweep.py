"""The learning-rate range test's sweep: one optimizer step per learning rate, low to high.

Each step runs like a step of ``fit``: the trainer's own model, optimizer, data, accumulation,
mixed precision, clipping, and the NaN/Inf guard (a step whose loss or gradients are not finite
changes nothing, and is kept out of the curve). The window's loss is averaged over its
micro-batches and over processes, and read on the host once per step, so every process takes
the same decision on the same number. The sweep ends at ``max_lr``, when the smoothed loss passes
``stop_factor`` times its best, or after 3 non-finite steps in a row: a blow-up at a high learning
rate ends the sweep, never the run. The caller snapshots the state first and restores it after.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from safeloop.batching import LossComputer
from safeloop.diagnostics.baseline import Baseline, TargetSample, loss_form
from safeloop.distributed import agree_all_finite, reduce_across_processes
from safeloop.errors import ConfigError
from safeloop.guards.clipping import clip_and_measure
from safeloop.guards.nonfinite import finite_flag
from safeloop.lr_finder.curve import RULES, SIGNIFICANT, DebiasedEma, Fall, judge, suggest
from safeloop.lr_finder.result import LRFinderResult
from safeloop.lr_finder.snapshot import SNAPSHOT_PLACES, SnapshotCost, local_part
from safeloop.progress import ProgressBar
from safeloop.stepping import GatedStep

__all__ = ["RangeTest", "Sweep", "lr_finder_problems", "finish_result"]

logger = logging.getLogger("safeloop")

MIN_STEPS = 10


_NONFINITE_IN_A_ROW = 3  # one bad batch is kept out; three in a row is the blow-up


def lr_finder_problems(
    min_lr: Any, max_lr: Any, num_steps: Any, stop_factor: Any, smoothing: Any, rule: Any, snapshot: Any
) -> list[str]:
    """Every problem with ``find_lr``'s arguments, each with the value seen and the fix."""
    problems = []

    def positive_number(name: str, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"`{name}` must be a finite number, got {value!r}")
            return False
        if value <= 0:
            problems.append(f"`{name}` must be > 0 (a learning rate), got {value!r}")
            return False
        return True

    if positive_number("min_lr", min_lr) and positive_number("max_lr", max_lr) and min_lr >= max_lr:
        problems.append(
            f"`min_lr` ({min_lr!r}) must be below `max_lr` ({max_lr!r}): the sweep goes from low to high "
            "(the defaults are min_lr=1e-7, max_lr=10)"
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        problems.append(f"`num_steps` must be an int, got {num_steps!r}")
    elif num_steps < MIN_STEPS:
        problems.append(
            f"`num_steps` must be at least {MIN_STEPS} (a curve needs points to have a shape), got "
            f"{num_steps}; 100 is the usual"
        )
    if positive_number("stop_factor", stop_factor) and stop_factor <= 1:
        problems.append(f"`stop_factor` must be > 1 (a multiple of the best loss), got {stop_factor!r}")
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
        problems.append(
            f"`smoothing` must be in [0, 1) (the moving average's beta; 0.9 by default), got {smoothing!r}"
        )
    if rule not in RULES:
        problems.append(f"`rule` must be one of {', '.join(map(repr, RULES))}, got {rule!r}")
    if snapshot not in SNAPSHOT_PLACES:
        problems.append(
            f"`snapshot` must be one of {', '.join(map(repr, SNAPSHOT_PLACES))}, got {snapshot!r}"
        )
    return problems


@dataclass
class Sweep:
    """What the sweep measured (host values, the same on every process)."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stop_reason: str = "max_lr"
    steps: int = 0
    nonfinite_steps: int = 0
    loader_passes: int = 1
    baseline: float | None = None
    # every weight (2-D and more) that got no gradient at the first step, when none got one
    unreached: list[str] = field(default_factory=list)


class RangeTest:
    """Runs the sweep on the prepared training objects.

    Args:
        accelerator (`Accelerator`): the run's accelerator (accumulation, fp16 scaler, processes).
        model (`torch.nn.Module`): the prepared model.
        optimizer (`torch.optim.Optimizer`): the prepared optimizer.
        loader (`Any`): the prepared training dataloader (cycled when shorter than the sweep).
        losses (`LossComputer`): the batch conventions, as in ``fit``.
        clip_grad_norm (`float`, *optional*): the trainer's clipping.
        clip_grad_value (`float`, *optional*): the trainer's clipping.
        progress_bar (`bool`): show a bar (main process only).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: Any,
        losses: LossComputer,
        *,
        clip_grad_norm: float | None,
        clip_grad_value: float | None,
        progress_bar: bool,
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.loader = loader
        self.losses = losses
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.progress_bar = progress_bar and accelerator.is_main_process
        self.stepper = GatedStep(optimizer, accelerator.scaler)
        unwrapped = accelerator.unwrap_model(model)
        self._weights = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad and p.dim() >= 2]
        self._first = True
        form = None if losses.loss_fn is None or losses.training_step else loss_form(losses.loss_fn)
        self._sample = TargetSample(form) if form is not None and form.problem is None else None

    def run(self, lrs: list[float], *, stop_factor: float, smoothing: float) -> Sweep:
        """Take one optimizer step at each learning rate of ``lrs`` until the sweep ends."""
        sweep = Sweep()
        ema, best, bad_in_a_row = DebiasedEma(smoothing), math.inf, 0
        # each param group keeps its ratio to the first one (discriminative learning rates)
        groups = self.optimizer.param_groups
        first = float(groups[0]["lr"])
        ratios = [float(g["lr"]) / first if first > 0 else 1.0 for g in groups]
        bar = ProgressBar(len(lrs), enabled=self.progress_bar, desc="lr_find")
        batches = self._batches(sweep)
        try:
            for lr in lrs:
                for group, ratio in zip(groups, ratios, strict=True):
                    group["lr"] = lr * ratio
                loss = self._step(batches, sweep)
                sweep.steps += 1
                bar.advance()
                if loss is None:
                    sweep.stop_reason = "no-grad"
                    break
                if not math.isfinite(loss):
                    sweep.nonfinite_steps += 1
                    bad_in_a_row += 1
                    if bad_in_a_row >= _NONFINITE_IN_A_ROW:
                        sweep.stop_reason = "nonfinite"
                        break
                    continue
                bad_in_a_row = 0
                smoothed = ema.add(loss)
                sweep.lrs.append(lr)
                sweep.losses.append(loss)
                sweep.smoothed.append(smoothed)
                if len(sweep.smoothed) > 1 and smoothed > stop_factor * best:
                    sweep.stop_reason = "diverged"
                    break
                best = min(best, smoothed)
        finally:
            batches.close()
            bar.close()
        sweep.baseline = self._baseline()
        return sweep

    def _batches(self, sweep: Sweep) -> Iterator[Any]:
        """The loader's batches, started over as often as the sweep needs."""
        while True:
            yielded = False
            iterator = iter(self.loader)
            try:
                for batch in iterator:
                    yielded = True
                    yield batch
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
            if not yielded:
                raise ConfigError(
                    "find_lr: the training dataloader yielded no batch; give it a dataset with samples"
                )
            sweep.loader_passes += 1

    def _step(self, batches: Iterator[Any], sweep: Sweep) -> float | None:
        """One optimizer step over an accumulation window; its loss (None: no gradient to follow)."""
        acc, window = self.accelerator, []
        while True:
            batch = next(batches)
            with acc.accumulate(self.model):
                loss = self.losses.with_loss_fn(self.model, batch, self._loss_fn())
                if not loss.requires_grad:
                    return None
                acc.backward(loss)
                window.append(loss.detach())
                if acc.sync_gradients:
                    if self._first:
                        self._first = False
                        sweep.unreached = self._unreached()
                    return self._finish(window)

    def _unreached(self) -> list[str]:
        """Every weight, when none of them got a non-zero gradient at this first step (else none).

        One all-reduce and one host read, once per sweep: a model whose gradients reach no weight
        (all-zero weights, every layer's input cut) cannot respond to any learning rate.
        """
        if not self._weights:
            return []
        device = self.accelerator.device
        reached = torch.stack(
            [
                torch.zeros((), device=device)
                if p.grad is None
                else (local_part(p.grad) != 0).any().to(device=device, dtype=torch.float32)
                for _, p in self._weights
            ]
        )
        reached = reduce_across_processes(self.accelerator, reached, "max")  # any process's shard
        if any(v > 0 for v in reached.tolist()):
            return []
        return [name for name, _ in self._weights]

    def _loss_fn(self) -> Callable[[Any, Any], Any] | None:
        """The user's ``loss_fn``, wrapped to keep the first targets for the baseline loss."""
        sample, loss_fn = self._sample, self.losses.loss_fn
        if sample is None or loss_fn is None or not sample.wants:
            return loss_fn

        def sampled(outputs: Any, targets: Any) -> Any:
            sample.see(outputs, targets)
            return loss_fn(outputs, targets)

        return sampled

    def _finish(self, window: list[torch.Tensor]) -> float:
        acc = self.accelerator
        window_loss = window[0] if len(window) == 1 else torch.stack(window).mean()
        norms = clip_and_measure(
            acc, self.model.parameters(), max_norm=self.clip_grad_norm, max_value=self.clip_grad_value
        )
        flag = agree_all_finite(acc, finite_flag(window_loss, norms.total))
        self.stepper.step(flag)  # a non-finite step changes nothing
        self.optimizer.zero_grad(set_to_none=True)
        mean = reduce_across_processes(acc, window_loss.detach().float().reshape(1), "mean")
        return float(mean.item())  # the one host read of the step: the sweep decides on it

    def _baseline(self) -> float | None:
        """The loss of the best constant prediction on the first targets (every process calls it)."""
        sample, self._sample = self._sample, None
        if sample is None:
            return None
        acc = self.accelerator
        stats = sample.statistics()
        length = -1 if stats is None else stats.numel()
        bounds = torch.tensor([length, -length], dtype=torch.float64, device=acc.device)
        high, low = reduce_across_processes(acc, bounds, "max").tolist()
        if stats is None or high != -low:  # a process saw no targets, or another layout
            return None
        summed = reduce_across_processes(acc, stats.to(acc.device), "sum").tolist()
        baseline = Baseline.of(sample.form, summed, sample.layout)
        return None if baseline is None else baseline.value


_HOW = {
    "minimum": "a tenth of the learning rate where the smoothed loss was lowest",
    "steepest": "where the smoothed loss fell fastest per decade of learning rate",
    "valley": "halfway down the longest descent of the smoothed loss",
}


def finish_result(sweep: Sweep, cost: SnapshotCost, rule: str, smoothing: float) -> LRFinderResult:
    """The result of a sweep: the suggestion by ``rule``, or the verdict when the curve has none."""
    suggestions = suggest(sweep.lrs, sweep.smoothed)
    verdict = judge(
        sweep.lrs,
        sweep.losses,
        sweep.smoothed,
        stopped_early=sweep.stop_reason in ("diverged", "nonfinite"),
        baseline=sweep.baseline,
        smoothing=smoothing,
    )
    if sweep.stop_reason == "no-grad":
        message = (
            "the loss does not respond to the learning rate: it does not require a gradient "
            "(`loss.requires_grad` is False), so no update can change it. A `.detach()`, a "
            "`torch.no_grad()` block, `requires_grad=False` on every weight, or a loss built from "
            "`.item()` values cuts it from the weights; `fit()` names where"
        )
        return _result(sweep, cost, rule, {}, None, "no-response", message)
    if sweep.unreached:
        shown = ", ".join(f"`{name}`" for name in sweep.unreached[:5])
        more = f" and {len(sweep.unreached) - 5} more" if len(sweep.unreached) > 5 else ""
        message = (
            f"the loss does not respond to the learning rate: at the first step no weight got a non-zero "
            f"gradient ({shown}{more}), so only biases, if anything, can move. All-zero weights (an "
            "init that zeroed them: the trainer's `reinit_zero_params` re-initialises them in `fit()`), "
            "or every layer's input cut from the graph; `fit()` with `diagnostics=True` names which"
        )
        return _result(sweep, cost, rule, suggestions, None, "no-response", message)
    suggestion = None if verdict is not None else suggestions.get(rule)
    if verdict is not None:
        return _result(sweep, cost, rule, suggestions, None, verdict.code, verdict.message)
    if suggestion is None:
        message = f"the `{rule}` rule finds no learning rate on this curve; the others: " + ", ".join(
            f"{name} {value:.3g}" for name, value in suggestions.items() if value is not None
        )
        return _result(sweep, cost, rule, suggestions, None, "no-descent", message)
    others = ", ".join(
        f"{name} {value:.3g}" for name, value in suggestions.items() if name != rule and value is not None
    )
    message = (
        f"suggested learning rate {suggestion:.3g} ({rule}: {_HOW[rule]}; {sweep.steps} steps over "
        f"{sweep.lrs[0]:.3g}..{sweep.lrs[-1]:.3g}, ended: {sweep.stop_reason})"
    )
    if others:
        message += f"; other rules: {others}"
    fall = Fall.of(sweep.losses, sweep.smoothed, smoothing)
    if fall.significance < SIGNIFICANT:
        message += (
            f". The fall before the blow-up is within the noise ({fall.start - fall.best:.3g} against a "
            f"scatter of {fall.noise:.3g} per step, {fall.significance:.1f} standard errors): the "
            "suggestion rests on where the loss blew up; a sweep with larger batches or more steps "
            "measures it better"
        )
    if sweep.loader_passes > 1:
        message += (
            f". The training loader is shorter than the sweep: it was started over "
            f"{sweep.loader_passes - 1} time(s)"
        )
    return _result(sweep, cost, rule, suggestions, suggestion, None, message)


def _result(
    sweep: Sweep,
    cost: SnapshotCost,
    rule: str,
    suggestions: dict[str, float | None],
    suggestion: float | None,
    verdict: str | None,
    message: str,
) -> LRFinderResult:
    return LRFinderResult(
        lrs=sweep.lrs,
        losses=sweep.losses,
        smoothed_losses=sweep.smoothed,
        suggestion=suggestion,
        rule=rule,
        suggestions=suggestions,
        verdict=verdict,
        message=message,
        stop_reason=sweep.stop_reason,
        steps=sweep.steps,
        nonfinite_steps=sweep.nonfinite_steps,
        loader_passes=sweep.loader_passes,
        baseline_loss=sweep.baseline,
        snapshot=cost.where,
        snapshot_bytes=cost.bytes,
        restore_seconds=cost.capture_seconds + cost.restore_seconds,
    )
