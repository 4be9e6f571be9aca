"""The run loop: iterate epochs and micro-batches, restart after a rollback, stop on preemption.

A friend of ``SafeTrainer`` (it reads and sets the trainer's run state: ``epoch``, the position
in the epoch, the preemption flag). This module says which micro-batches run, when an optimizer
step is taken, what happens at each step boundary, when an epoch ends and when the run is over;
the trainer says what one optimizer step does (``_optimizer_step``). What a checkpoint holds is
``checkpoint.trainer_state``'s business and what a rollback restores is ``rollback``'s: here is
only *when* they happen.

The loop, as :func:`run_epochs` drives it::

    save the state before the first step (a healthy rollback target)
    until done (max_steps, max_epochs or a preemption):
        per epoch: start_epoch (RNG, micro-batches to skip) -> skip them
                   -> per micro-batch: loss, backward; on the sync step: the optimizer step,
                      then after_step (progress, checkpoint, preemption stop, log)
                   -> evaluate -> next epoch
    log the steps since the last log step
    on RollbackRequest (every process, same step): roll_back, then run the loop again
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from safeloop.checkpoint.lifecycle import poll_checkpoints, save_checkpoint, start_epoch, stop_for_preemption
from safeloop.checkpoint.trainer_state import RngSnapshot
from safeloop.rollback import RollbackRequest, roll_back

if TYPE_CHECKING:
    from safeloop.trainer import SafeTrainer

__all__ = ["run_epochs", "train_epochs", "run_epoch", "run_micro_batch", "after_step", "is_done"]


def run_epochs(trainer: SafeTrainer) -> None:
    """Train until the run is done, restarting the epoch loop after each rollback.

    Signal handlers for preemption are installed for the loop's duration (``trainer._preemption``,
    a fresh watch each ``fit``). The steps since the last log step are logged once the epochs
    are over; that log may itself detect a divergence, so it sits inside the rollback handling.

    Args:
        trainer (`SafeTrainer`): the trainer, set up for ``fit`` (resumed, bar and trackers on).

    Raises:
        DivergenceError: a rollback was needed past ``max_rollbacks``, or no healthy
            checkpoint precedes the divergence.
    """
    with trainer._preemption:
        manager = trainer._checkpoints
        if trainer.config.rollback and manager is not None and manager.last_saved_step != trainer.global_step:
            save_checkpoint(trainer)  # the state before the first step: a healthy rollback target
        while True:
            try:
                train_epochs(trainer)
                trainer._log()  # the steps since the last log step, if any
                break
            except RollbackRequest as request:  # raised on every process at the same step
                # roll_back restores the step, epoch and position in it; the loop starts again there
                roll_back(trainer, request)


def train_epochs(trainer: SafeTrainer) -> None:
    """Run epochs, evaluating after each, until the run is done or the data runs out.

    Args:
        trainer (`SafeTrainer`): the trainer whose ``epoch`` advances.
    """
    while not is_done(trainer):
        finished_epoch = run_epoch(trainer)
        if trainer._preempted:
            return
        if not finished_epoch and not is_done(trainer):
            return  # the dataloader yielded nothing this epoch: nothing more will come
        if trainer.eval_dataloader is not None:
            trainer._evaluate()
        if finished_epoch:
            trainer.epoch += 1
            trainer._batch_in_epoch = 0


def is_done(trainer: SafeTrainer) -> bool:
    """Whether the run is over: preempted, or ``max_steps`` steps or ``max_epochs`` epochs run.

    Args:
        trainer (`SafeTrainer`): the trainer whose counters are read.

    Returns:
        `bool`: True when no more micro-batch should run.
    """
    if trainer._preempted:
        return True
    if trainer.config.max_steps is not None:
        return trainer.global_step >= trainer.config.max_steps
    return trainer.epoch >= trainer.config.max_epochs


def run_epoch(trainer: SafeTrainer) -> bool:
    """Run the batches of one epoch, skipping those a resume or a rollback asks to skip.

    Skipped micro-batches are still drawn from the dataloader, so the shuffle order and the
    position in the epoch match the run they continue. The RNG saved with the checkpoint is put
    back once the last skipped batch is drawn; a skip longer than the epoch goes on in the next.

    Args:
        trainer (`SafeTrainer`): the trainer whose micro-batches run.

    Returns:
        `bool`: True when the dataloader was exhausted (the epoch is complete).
    """
    skip, now_rng = start_epoch(trainer)
    batches = iter(trainer.train_dataloader)
    seen = 0
    try:
        for batch_idx, batch in enumerate(batches):
            seen = batch_idx + 1
            trainer._batch_in_epoch = batch_idx + 1
            if batch_idx < skip:
                if batch_idx + 1 == skip and now_rng is not None:
                    RngSnapshot.restore(now_rng, trainer.train_dataloader)
                continue
            run_micro_batch(trainer, batch, batch_idx)
            if is_done(trainer):
                # stopped by max_steps: the epoch is complete only if that was its last batch
                return bool(trainer.accelerator.gradient_state.end_of_dataloader)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:  # ends the loader's iterator (and its workers) now, not at collection
            close()
    if skip > seen:  # a rollback's skip runs past the epoch's end: it goes on in the next one
        if now_rng is not None:
            RngSnapshot.restore(now_rng, trainer.train_dataloader)
        trainer._carry_skip = skip - seen
    return seen > 0


def run_micro_batch(trainer: SafeTrainer, batch: Any, batch_idx: int) -> None:
    """Forward and backward one micro-batch; on the accumulation's sync step, step and log.

    Accelerate's ``accumulate`` decides whether this micro-batch ends an accumulation window
    (``sync_gradients``); only then does the optimizer step run, inside the context, as in the
    hand-written Accelerate loop whose updates ``fit`` must match bitwise.

    Args:
        trainer (`SafeTrainer`): the trainer to run the micro-batch on.
        batch (`Any`): the batch, as the dataloader yields it (see the batch conventions).
        batch_idx (`int`): its index in the epoch, skipped micro-batches included.

    Raises:
        RollbackRequest: the step or its log step found a divergence and ``rollback`` is on.
    """
    trainer._callbacks.call("on_train_batch_start", trainer, batch, batch_idx)
    if trainer._guarded:
        trainer._skips.remember(trainer.global_step + 1, batch_idx, batch)
    stepped = False
    diagnostics = trainer._diagnostics
    if diagnostics is not None:
        diagnostics.see_train_batch(batch)
    with trainer.accelerator.accumulate(trainer.model):
        if diagnostics is not None and not diagnostics.first_done:
            loss = diagnostics.first_loss(batch, lambda: trainer._loss_of(trainer.model, batch))
        else:
            loss = trainer._loss_of(trainer.model, batch)
        trainer._backward(loss)
        if diagnostics is not None:
            diagnostics.after_first_backward()
        trainer._callbacks.call("on_after_backward", trainer)
        trainer._window_losses.append(loss.detach())
        if trainer.accelerator.sync_gradients:
            trainer._optimizer_step()
            stepped = True
    trainer._callbacks.call("on_train_batch_end", trainer, loss, batch, batch_idx)
    if stepped:
        after_step(trainer)


def after_step(trainer: SafeTrainer) -> None:
    """The step boundary after an optimizer step: progress, checkpoints, preemption, logging.

    Called on every process at the same boundary. The order matters: the log step comes first,
    so that a checkpoint of this step holds its history entry and the spike detector's view of
    its interval (a resumed run then logs what an uninterrupted one does), and so that a
    divergence it confirms (`RollbackRequest`) leaves no checkpoint of the diverging step and
    pre-empts a preemption stop (the signal is still honoured at a later boundary). A due
    checkpoint is written before a preemption stop, which then needs no second one.

    Args:
        trainer (`SafeTrainer`): the trainer that just took an optimizer step.

    Raises:
        RollbackRequest: the log step confirmed a divergence and ``rollback`` is on.
    """
    trainer._bar.advance()  # type: ignore[union-attr]
    poll_checkpoints(trainer)
    if trainer.global_step % trainer.config.log_every == 0:
        trainer._log()
    if trainer._checkpoints is not None and trainer._checkpoints.due(trainer.global_step):
        save_checkpoint(trainer)
    # the signal is agreed across processes (at log steps under several), so all stop together
    if not trainer._preempted and trainer._preemption.agreed(
        trainer.accelerator, trainer.global_step, trainer.config.log_every
    ):
        if trainer.global_step % trainer.config.log_every:
            trainer._log()  # the partial interval, so that the checkpoint's history holds it
        stop_for_preemption(trainer)
