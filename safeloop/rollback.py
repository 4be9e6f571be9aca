"""Divergence and rollback: restore the newest healthy checkpoint, lower the LR, skip the data.

A friend of ``SafeTrainer``. Divergence is decided from values every process agrees on (the
reduced metrics of a log step, or the agreed NaN/Inf flags), so every process raises
`RollbackRequest` at the same step boundary; ``run_loop.run_epochs`` catches it and calls
:func:`roll_back` on every process together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from safeloop.checkpoint.manifest import verify_checkpoint
from safeloop.checkpoint.store import checkpoint_name, discard_checkpoint, list_checkpoints
from safeloop.checkpoint.trainer_state import apply_trainer
from safeloop.distributed import broadcast_int
from safeloop.errors import DivergenceError
from safeloop.guards.divergence import Spike
from safeloop.metrics import LogRecord
from safeloop.results import Event, Finding

if TYPE_CHECKING:
    from safeloop.trainer import SafeTrainer

__all__ = [
    "RollbackRequest",
    "check_spikes",
    "roll_back",
    "scale_learning_rates",
    "checkpoint_health",
    "can_roll_back",
]

logger = logging.getLogger("safeloop")
_NONE = -1


@dataclass
class RollbackRequest(Exception):
    """Raised inside the loop when the run diverged; caught by ``run_loop.run_epochs``.

    Attributes:
        reason (`str`): ``"loss-spike"`` or ``"nonfinite"``.
        start_step (`int`): the first step of the anomaly.
        step (`int`): the step at which it was detected (the data since the checkpoint was
            consumed up to here).
        description (`str`): the measured numbers, for events and messages.
        detail (`dict`): JSON numbers for the rollback event.
    """

    reason: str
    start_step: int
    step: int
    description: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.reason} at step {self.step}: {self.description}"


def can_roll_back(trainer: SafeTrainer) -> bool:
    """Whether a divergence restores a checkpoint (``rollback`` on, and checkpoints written)."""
    return trainer.config.rollback and trainer._checkpoints is not None


def checkpoint_health(trainer: SafeTrainer) -> bool:
    """Whether the run looks healthy now (no suspected spike, no skip run under way)."""
    spike = trainer._spikes is not None and trainer._spikes.suspicious
    return not spike and trainer._skips.tracker.consecutive == 0


def check_spikes(trainer: SafeTrainer, record: LogRecord) -> None:
    """Feed a log interval's steps to the spike detector; report or roll back on a spike.

    Raises:
        RollbackRequest: a spike was confirmed and ``rollback`` is on.
    """
    detector = trainer._spikes
    if detector is None:
        return
    first = trainer.global_step - len(record.per_step) + 1
    for offset, values in enumerate(record.per_step):
        if values.finite is False or values.overflow:
            continue
        spike = detector.update(first + offset, values.loss, values.grad_norm)
        if spike is not None:
            _on_spike(trainer, spike)
    manager = trainer._checkpoints
    if manager is not None and checkpoint_health(trainer):
        # every checkpoint up to the start of this clean window is known healthy now
        window_start = first - 1
        known = [step for step in manager.saved_steps if step <= window_start]
        if known:
            manager.protected_step = max(known)


def _on_spike(trainer: SafeTrainer, spike: Spike) -> None:
    rolling = can_roll_back(trainer)
    trainer._add_finding(
        Finding(
            code="loss-spike",
            severity="warning",
            message=f"Loss spike: {spike.describe()}."
            + (" Rolling back to the newest healthy checkpoint." if rolling else " Nothing was restored."),
            step=spike.start_step,
            suggestion=(
                "Lower the learning rate or add warm-up, clip gradients (`clip_grad_norm=1.0`), and look "
                "at the batches of those steps."
            ),
        )
    )
    if rolling:
        detail = {
            "confirmed_at": spike.step,
            "loss": spike.loss,
            "mean": spike.mean,
            "std": spike.std,
            "zscore": spike.zscore,
            "grad_norm_ratio": None
            if spike.grad_norm_ratio != spike.grad_norm_ratio
            else spike.grad_norm_ratio,
        }
        # read at this log step: the steps up to here ran on the diverging branch
        raise RollbackRequest("loss-spike", spike.start_step, trainer.global_step, spike.describe(), detail)


def roll_back(trainer: SafeTrainer, request: RollbackRequest) -> None:
    """Restore the newest healthy checkpoint before ``request.start_step`` (every process).

    Raises:
        DivergenceError: the rollback budget is spent, or no healthy checkpoint precedes it.
    """
    lr_before = [float(group["lr"]) for group in trainer.optimizer.param_groups]
    trainer._divergences.append(
        {"reason": request.reason, "step": request.step, "text": request.description, "lr": lr_before[0]}
    )
    if trainer._rollbacks >= trainer.config.max_rollbacks:
        raise _divergence_error(trainer, f"{trainer._rollbacks} rollbacks were already made (max_rollbacks)")
    manager = trainer._checkpoints
    assert manager is not None  # invariant: rollback on means checkpoints on
    target = _choose_target(trainer, request.start_step)
    if target == _NONE:
        raise _divergence_error(trainer, f"no healthy checkpoint precedes step {request.start_step}")
    saved = manager.load_step(target)
    kept = {
        "history": trainer._history,
        "events": trainer._events,
        "skipped": trainer._skips.tracker.skipped,
        "overflow": trainer._skips.overflow_skips,
        "eval_loss": trainer._eval_loss,
        "rollbacks": trainer._rollbacks,
        "lr_scale": trainer._lr_scale,
    }
    scale_before = float(saved.trainer.get("lr_scale", 1.0))
    apply_trainer(trainer, saved)
    # the run's record goes on: only the model, optimizer, data position and RNG go back
    trainer._history, trainer._events = kept["history"], kept["events"]
    trainer._skips.tracker.skipped, trainer._skips.overflow_skips = kept["skipped"], kept["overflow"]
    trainer._skips.tracker.consecutive = 0
    trainer._eval_loss = kept["eval_loss"]
    trainer._rollbacks = kept["rollbacks"] + 1
    trainer._lr_scale = kept["lr_scale"] * trainer.config.rollback_lr_factor
    scale_learning_rates(trainer.optimizer, trainer.lr_scheduler, trainer._lr_scale / scale_before)
    skip = trainer.config.rollback_skip_batches
    if skip is None:
        skip = (request.step - target) * trainer.config.gradient_accumulation_steps
    trainer._resume_position = (trainer._resume_position or 0) + skip
    trainer._metrics.clear()
    if trainer._diagnostics is not None:
        trainer._diagnostics.forget_interval()
    trainer._window_losses = []
    trainer._skips.forget()
    if trainer._spikes is not None:
        trainer._spikes.reset_run()
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.accelerator.is_main_process:  # the diverged branch's checkpoints must never be resumed
        _drop_after(manager.directory, target)
    manager.saved_steps = [s for s in manager.saved_steps if s <= target]
    manager.last_saved_step = target
    lr_after = [float(group["lr"]) for group in trainer.optimizer.param_groups]
    path = str(manager.directory / checkpoint_name(target))
    event = Event(
        "rollback",
        target,
        {
            "path": path,
            "reason": request.reason,
            "detected_at": request.step,
            "anomaly_start": request.start_step,
            "skipped_batches": skip,
            "rollback": trainer._rollbacks,
            **request.detail,
        },
    )
    trainer._events.append(event)
    trainer._events.append(
        Event(
            "lr_scale",
            target,
            {
                "factor": trainer.config.rollback_lr_factor,
                "lr_before": lr_before,
                "lr_after": lr_after,
                "total_scale": trainer._lr_scale,
            },
        )
    )
    trainer._step_lr = lr_after[0]
    logger.warning(
        "safeloop: %s; rolled back to step %d (%s), learning rate %.3g -> %.3g, skipping %d batches "
        "(rollback %d of %d)",
        request,
        target,
        path,
        lr_before[0],
        lr_after[0],
        skip,
        trainer._rollbacks,
        trainer.config.max_rollbacks,
    )
    trainer._callbacks.call("on_rollback", trainer, event)


def scale_learning_rates(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None, factor: float
) -> None:
    """Multiply every learning rate by ``factor`` so that the schedule keeps the scale.

    Schedulers compute the rate from ``base_lrs`` (closed forms, ``LambdaLR``) or from the
    group's current ``lr`` (chained forms such as ``StepLR``); both are scaled, with the group
    keys schedulers read (``initial_lr``, ``max_lr``, ``min_lr``) and the last rate reported.
    """
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            value = group.get(key)
            if isinstance(value, float | int) and not isinstance(value, bool):
                group[key] = value * factor
            elif isinstance(value, torch.Tensor):
                value.mul_(factor)
    if scheduler is not None:
        _scale_scheduler(scheduler, factor)


def _scale_scheduler(scheduler: Any, factor: float) -> None:
    # the rates a scheduler computes from: its base rates, cyclic peaks, floors (eta_min...);
    # SequentialLR and ChainedScheduler hold inner schedulers that compute the actual rates
    for name in ("base_lrs", "_last_lr", "max_lrs", "min_lrs"):
        values = getattr(scheduler, name, None)
        if isinstance(values, list):
            setattr(scheduler, name, [v * factor if isinstance(v, float | int) else v for v in values])
    eta_min = getattr(scheduler, "eta_min", None)
    if isinstance(eta_min, float | int) and not isinstance(eta_min, bool):
        scheduler.eta_min = eta_min * factor
    for inner in getattr(scheduler, "_schedulers", None) or ():
        _scale_scheduler(inner, factor)


def _choose_target(trainer: SafeTrainer, start_step: int) -> int:
    manager = trainer._checkpoints
    assert manager is not None
    manager.durable.extend(manager.poll(wait=True))  # an asynchronous save must be whole first
    target = _NONE
    if trainer.accelerator.is_main_process:
        for step, path in reversed(list_checkpoints(manager.directory)):
            if step >= start_step or not manager.in_lineage(step):
                continue  # after the anomaly, or another run's (a stale folder in checkpoint_dir)
            check = verify_checkpoint(path)
            if check.ok and (check.manifest or {}).get("meta", {}).get("healthy", True):
                target = step
                break
            if check.complete:
                logger.warning(
                    "safeloop: rollback passes over %s: %s", path.name, check.problem or "unhealthy"
                )
    return broadcast_int(trainer.accelerator, target)


def _drop_after(directory: Any, target: int) -> None:
    for step, path in list_checkpoints(directory):
        if step > target:
            discard_checkpoint(path)


def _divergence_error(trainer: SafeTrainer, why: str) -> DivergenceError:
    lrs = [d["lr"] for d in trainer._divergences]
    lines = "\n".join(
        f"  - step {d['step']}: {d['reason']}: {d['text']} (lr {d['lr']:.3g})" for d in trainer._divergences
    )
    causes = _likely_causes(trainer)
    for finding in causes:
        trainer._add_finding(finding)
    ranked = "\n".join(f"  {i}. [{f.code}] {f.message}" for i, f in enumerate(causes, 1))
    return DivergenceError(
        f"training diverged {len(trainer._divergences)} time(s) and {why}:\n{lines}\n"
        f"Learning rates tried: {', '.join(f'{lr:.3g}' for lr in lrs)}.\nMost likely causes:\n{ranked}",
        findings=causes + [f for f in trainer._findings if f.code == "loss-spike"],
    )


def _likely_causes(trainer: SafeTrainer) -> list[Finding]:
    causes: list[Finding] = []
    bad_data = [f for f in trainer._findings if f.code == "nonfinite-input"]
    causes.extend(bad_data)
    ratios = [d.get("grad_norm_ratio") for d in (e.detail for e in trainer._events if e.kind == "rollback")]
    if any(isinstance(r, float) and r > 10 for r in ratios):
        causes.append(
            Finding(
                "exploding-grad",
                "warning",
                "the gradient norm rose more than 10x its running mean at the divergences "
                f"({', '.join(f'{r:.3g}x' for r in ratios if isinstance(r, float))}).",
                step=trainer.global_step,
                suggestion="Clip gradients (`clip_grad_norm=1.0`) and check the initialisation.",
            )
        )
    lrs = [d["lr"] for d in trainer._divergences]
    causes.append(
        Finding(
            "lr-too-high",
            "warning",
            f"the run diverged at learning rates {', '.join(f'{lr:.3g}' for lr in lrs)}"
            + (" with clean data" if not bad_data else "")
            + ".",
            step=trainer.global_step,
            suggestion=f"Start from a learning rate below {min(lrs) * trainer.config.rollback_lr_factor:.3g}"
            ", "
            "with warm-up (e.g. `get_linear_schedule_with_warmup`) and gradient clipping.",
        )
    )
    return causes
