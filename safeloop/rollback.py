"""Divergence: what it leads to (``DivergencePolicy``), and the rollback itself (``Rollback``).

``DivergencePolicy`` is the one place that decides what a divergence leads to: a confirmed loss
spike is reported and, with rollback on, returned as a :class:`Divergence` for the loop; a run of
non-finite steps past ``max_consecutive_skips`` is returned likewise, or raises
``NonFiniteError`` without rollback. Divergences are found from values every process agrees on
(a log step's reduced metrics, the agreed NaN/Inf flags), so every process gets the same one at
the same step boundary. The run loop, the only place that handles one, calls
:meth:`Rollback.roll_back` on every process together.

Its ``norms`` (a ``NormTrail``, fed by the log step) say whether the global gradient norms
exploded before a refused step, a run of them or a spike: the ``exploding-grad`` finding then
goes in front of the findings it explains, and ``DivergenceError`` ranks it first.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from safeloop.checkpoint.checkpointer import Checkpointer
from safeloop.config import TrainerConfig
from safeloop.data_cursor import DataCursor
from safeloop.diagnostics.updates import find_lr_hint
from safeloop.errors import DivergenceError, NonFiniteError
from safeloop.findings import Reporter
from safeloop.guards.divergence import (
    EXPLAINED_BY_EXPLOSION,
    RISE_WINDOW,
    Divergence,
    Explosion,
    NormTrail,
    Spike,
)
from safeloop.guards.nonfinite import SkipRecord
from safeloop.results import Event, Finding
from safeloop.run_state import Progress, RunRecord

__all__ = ["DivergencePolicy", "Rollback", "scale_learning_rates"]

logger = logging.getLogger("safeloop")


class DivergencePolicy:
    """Decides what a divergence leads to: a rollback, an error, or a finding only.

    Args:
        config (`TrainerConfig`): ``max_consecutive_skips``.
        progress (`Progress`): the step of detection.
        reporter (`Reporter`): the ``loss-spike`` finding; all findings for an error.
        rollback_enabled (`bool`): ``rollback`` on, and checkpoints written.

    Attributes:
        norms (`NormTrail`): the recent global gradient norms (the log step feeds them).
    """

    def __init__(
        self, config: TrainerConfig, progress: Progress, reporter: Reporter, *, rollback_enabled: bool
    ) -> None:
        self.config = config
        self.progress = progress
        self.reporter = reporter
        self.rollback_enabled = rollback_enabled
        self.norms = NormTrail()

    def on_spike(self, spike: Spike) -> Divergence | None:
        """Report a confirmed loss spike; return the divergence to roll back from, if rollback is on."""
        rolling = self.rollback_enabled
        explosion = self.norms.explosion(spike.start_step, spike.step)
        if explosion is not None and not self._already_reported(explosion):
            found = self.norms.report(explosion, f"the loss spike of steps {spike.start_step}-{spike.step}")
            if found is not None:
                self.reporter.add(found, before=EXPLAINED_BY_EXPLOSION)
        self.reporter.add(
            Finding(
                code="loss-spike",
                severity="warning",
                message=f"Loss spike: {spike.describe()}."
                + (
                    " Rolling back to the newest healthy checkpoint." if rolling else " Nothing was restored."
                ),
                step=spike.start_step,
                suggestion=(
                    "Lower the learning rate or add warm-up, clip gradients (`clip_grad_norm=1.0`), and "
                    "look at the batches of those steps."
                ),
            )
        )
        if not rolling:
            return None
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
        if explosion is not None:
            detail["exploding"] = explosion.detail()
        # read at this log step: the steps up to here ran on the diverging branch
        return Divergence(
            "loss-spike", spike.start_step, self.progress.global_step, spike.describe(), detail, explosion
        )

    def on_skip_run(self, record: SkipRecord, run: int) -> Divergence:
        """A run of ``run`` skipped steps ending at ``record``, past ``max_consecutive_skips``.

        Raises:
            NonFiniteError: rollback is off (the run cannot go on with non-finite values).
        """
        start = record.step - run + 1
        explosion = self.norms.explosion(start)
        if not self.rollback_enabled:
            advice = (
                "where the values came from; lower the learning rate, clip gradients "
                "(`clip_grad_norm=1.0`) or clean the data."
                if explosion is None
                else f"the cause: before them {explosion.describe()} (exploding gradients). Clip "
                "gradients (`clip_grad_norm=1.0`), then lower the learning rate."
            )
            raise NonFiniteError(
                f"{run} optimizer steps in a row ended with a non-finite loss or gradients (the last "
                f"at step {record.step}, loss {record.loss}, gradient norm {record.grad_norm}); "
                f"`max_consecutive_skips={self.config.max_consecutive_skips}`. See the findings for "
                + advice,
                findings=self.reporter.findings,
            )
        text = (
            f"{run} non-finite steps in a row (last loss {record.loss:.4g}, grad norm {record.grad_norm:.4g})"
        )
        detail: dict[str, Any] = {"consecutive": run}
        if explosion is not None:  # the global norm before the run over the median before that
            detail.update(grad_norm_ratio=explosion.ratio, exploding=explosion.detail())
        # a skip decided on the device is learnt at the log step: the data was consumed up to now
        return Divergence("nonfinite", start, self.progress.global_step, text, detail, explosion)

    def _already_reported(self, explosion: Explosion) -> bool:
        """An ``exploding-grad`` finding made since the window of ``explosion`` began (a log check's)."""
        since = explosion.before - RISE_WINDOW
        return any(
            f.code == "exploding-grad" and f.step is not None and f.step >= since
            for f in self.reporter.findings
        )


class Rollback:
    """Restores the newest healthy checkpoint before a divergence, lowers the LR, skips the data.

    Args:
        config (`TrainerConfig`): ``max_rollbacks``, ``rollback_lr_factor``,
            ``rollback_skip_batches``, ``gradient_accumulation_steps``.
        checkpoints (`Checkpointer`): where the rollback targets are.
        optimizer (`torch.optim.Optimizer`): whose learning rates a rollback lowers.
        lr_scheduler (`LRScheduler`, *optional*): scaled alike, so the schedule keeps the scale.
        progress (`Progress`): the step of detection; its learning rate is set after a rollback.
        record (`RunRecord`): the run's record, which a rollback keeps (and counts itself in).
        cursor (`DataCursor`): told to skip the data between the checkpoint and the detection.
        reporter (`Reporter`): findings and events.
    """

    def __init__(
        self,
        config: TrainerConfig,
        checkpoints: Checkpointer,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        progress: Progress,
        record: RunRecord,
        cursor: DataCursor,
        reporter: Reporter,
    ) -> None:
        self.config = config
        self.checkpoints = checkpoints
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.progress = progress
        self.record = record
        self.cursor = cursor
        self.reporter = reporter

    def roll_back(self, divergence: Divergence) -> Event:
        """Restore the newest healthy checkpoint before ``divergence.start_step`` (every process).

        Everything the checkpoint holds comes back except the run's record, which goes on;
        the learning rates are lowered, and the data up to the detection is skipped.

        Returns:
            `Event`: the ``"rollback"`` event (already recorded; ``on_rollback`` not yet fired).

        Raises:
            DivergenceError: the rollback budget is spent, or no healthy checkpoint precedes it.
        """
        record = self.record
        lr_before = [float(group["lr"]) for group in self.optimizer.param_groups]
        record.divergences.append(
            {
                "reason": divergence.reason,
                "step": divergence.step,
                "text": divergence.description,
                "lr": lr_before[0],
                "exploding": None if divergence.explosion is None else divergence.explosion.describe(),
            }
        )
        if record.rollbacks >= self.config.max_rollbacks:
            raise self._divergence_error(f"{record.rollbacks} rollbacks were already made (max_rollbacks)")
        target = self.checkpoints.rollback_target(divergence.start_step)
        if target is None:
            raise self._divergence_error(f"no healthy checkpoint precedes step {divergence.start_step}")
        saved = self.checkpoints.restore_step(target, keep=(record,))
        total = record.note_rollback(self.config.rollback_lr_factor)
        # the restored rates carry the scale of their checkpoint: bring them to the new total
        scale_learning_rates(self.optimizer, self.lr_scheduler, total / float(saved.get("lr_scale", 1.0)))
        skip = self.config.rollback_skip_batches
        if skip is None:
            skip = (divergence.step - target) * self.config.gradient_accumulation_steps
        self.cursor.fast_forward(skip)
        self.optimizer.zero_grad(set_to_none=True)
        lr_after = [float(group["lr"]) for group in self.optimizer.param_groups]
        self.progress.step_lr = lr_after[0]
        path = str(self.checkpoints.path_of(target))
        event = Event(
            "rollback",
            target,
            {
                "path": path,
                "reason": divergence.reason,
                "detected_at": divergence.step,
                "anomaly_start": divergence.start_step,
                "skipped_batches": skip,
                "rollback": record.rollbacks,
                **divergence.detail,
            },
        )
        self.reporter.event(event)
        scale = {
            "factor": self.config.rollback_lr_factor,
            "lr_before": lr_before,
            "lr_after": lr_after,
            "total_scale": total,
        }
        self.reporter.event(Event("lr_scale", target, scale))
        logger.warning(
            "safeloop: %s; rolled back to step %d (%s), learning rate %.3g -> %.3g, skipping %d batches "
            "(rollback %d of %d)",
            divergence, target, path, lr_before[0], lr_after[0], skip,
            record.rollbacks, self.config.max_rollbacks,
        )  # fmt: skip
        return event

    def _divergence_error(self, why: str) -> DivergenceError:
        divergences = self.record.divergences
        lrs = [d["lr"] for d in divergences]
        lines = "\n".join(
            f"  - step {d['step']}: {d['reason']}: {d['text']} (lr {d['lr']:.3g})" for d in divergences
        )
        causes = self._likely_causes()
        self.reporter.add_all(causes, first={"exploding-grad": EXPLAINED_BY_EXPLOSION})
        ranked = "\n".join(f"  {i}. [{f.code}] {f.message}" for i, f in enumerate(causes, 1))
        return DivergenceError(
            f"training diverged {len(divergences)} time(s) and {why}:\n{lines}\n"
            f"Learning rates tried: {', '.join(f'{lr:.3g}' for lr in lrs)}.\nMost likely causes:\n{ranked}",
            findings=causes + self.reporter.of_code("loss-spike"),
        )

    def _likely_causes(self) -> list[Finding]:
        """The causes of the divergences, most likely first: exploding gradients, bad data, the LR."""
        step = self.progress.global_step
        bad_data = self.reporter.of_code("nonfinite-input")
        causes: list[Finding] = []
        exploded = [(d["step"], d["exploding"]) for d in self.record.divergences if d.get("exploding")]
        ratios = [event.detail.get("grad_norm_ratio") for event in self.record.events_of("rollback")]
        suggestion = (
            "Clip gradients (`clip_grad_norm=1.0`), then lower the learning rate; for recurrent nets "
            "(RNN/LSTM/GRU) clipping is the standard fix. Check the initialisation."
        )
        if exploded:
            causes.append(
                Finding(
                    "exploding-grad",
                    "warning",
                    f"the gradients exploded before {len(exploded)} of the {len(self.record.divergences)} "
                    "divergences: "
                    + "; ".join(f"{text} (divergence at step {at})" for at, text in exploded)
                    + ".",
                    step=step,
                    suggestion=suggestion,
                )
            )
        elif any(isinstance(r, float) and r > 10 for r in ratios):
            causes.append(
                Finding(
                    "exploding-grad",
                    "warning",
                    "the gradient norm rose more than 10x its running mean at the divergences "
                    f"({', '.join(f'{r:.3g}x' for r in ratios if isinstance(r, float))}).",
                    step=step,
                    suggestion=suggestion,
                )
            )
        causes += bad_data + self.reporter.of_code("no-target-tokens")
        lrs = [d["lr"] for d in self.record.divergences]
        if not self._updates_applied():
            # every step was refused from the first one: the weights are still the initial ones,
            # so no learning rate played a part; the first loss's own diagnosis says what did
            first = [f for f in self.reporter.of_code("nonfinite-loss") if f.step == 0]
            if not causes:
                causes += first or [self._before_any_update(step)]
            return causes
        causes.append(
            Finding(
                "lr-too-high",
                "warning",
                f"the run diverged at learning rates {', '.join(f'{lr:.3g}' for lr in lrs)}"
                + (" with clean data" if not bad_data else "")
                + ".",
                step=step,
                suggestion=f"Start from a learning rate below {min(lrs) * self.config.rollback_lr_factor:.3g}"
                ", with warm-up (e.g. `get_linear_schedule_with_warmup`) and gradient clipping; "
                f"{find_lr_hint(min(lrs), too_high=True)}.",
            )
        )
        return causes

    def _updates_applied(self) -> bool:
        """Whether any update reached the weights (a learning rate can only be blamed then).

        A loss spike is measured after ``warmup`` finite steps; a resumed run applied updates
        before its checkpoint.
        """
        record = self.record
        return (
            record.applied_steps > 0
            or any(d["reason"] == "loss-spike" for d in record.divergences)
            or bool(record.events_of("resume"))
        )

    def _before_any_update(self, step: int) -> Finding:
        return Finding(
            "nonfinite-loss",
            "warning",
            "every step was non-finite from the first one, before any update was applied: the "
            "weights are the initial ones, so the learning rate is not the cause; the model, the "
            "loss or the data make NaN/Inf on their own.",
            step=step,
            suggestion=(
                "Run one batch by hand and look where the first NaN/Inf appears: the inputs, a "
                "module's output, or the loss (a log of zero, a mean over an empty selection)."
            ),
        )


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
