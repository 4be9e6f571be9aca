"""Callbacks: code that observes a run at fixed points of the loop.

Callbacks observe; they do not decide. Guards (skip, rollback, re-initialisation) are not
callbacks, so the order of user callbacks can never change what training does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from safeloop.results import Event, Finding, FitResult
    from safeloop.trainer import SafeTrainer

__all__ = ["Callback"]


class Callback:
    """Base class with a no-op method per hook; override the ones you need.

    The loop of ``SafeTrainer.fit``, with each hook where it fires::

        on_fit_start(trainer)
        for epoch in epochs:
            for batch_idx, batch in enumerate(train_dataloader):
                on_train_batch_start(trainer, batch, batch_idx)
                loss = forward(batch); backward(loss)
                on_after_backward(trainer)
                if last micro-batch of the accumulation window:
                    clip gradients, measure the global norm
                    on_before_optimizer_step(trainer, optimizer)
                    optimizer.step(); optimizer.zero_grad(); lr_scheduler.step()
                    trainer.global_step += 1
                on_train_batch_end(trainer, outputs=loss, batch, batch_idx)
                if a step ended and it is a log step:    # the one host read of metrics
                    history, trackers, progress bar
            if eval_dataloader:                          # also when max_steps ends the
                on_validation_end(trainer, eval_loss)    # run in the middle of an epoch
        on_fit_end(trainer, result)

    How often each fires:

    - ``on_fit_start`` / ``on_fit_end``: once per ``fit``.
    - ``on_train_batch_start``, ``on_after_backward``, ``on_train_batch_end``: once per
      micro-batch, so ``gradient_accumulation_steps`` times per optimizer step (as in Lightning).
      ``outputs`` is the loss tensor; reading it on the host (``.item()``) costs a device sync.
    - ``on_before_optimizer_step``: once per optimizer step, after clipping, gradients in place.
    - ``on_validation_end``: once per evaluation: at the end of each epoch with an
      ``eval_dataloader``, and once more when ``max_steps`` stops the run mid-epoch.
    - ``on_skip``, ``on_rollback``, ``on_checkpoint``, ``on_finding``: when the trainer learns of
      the event; a skip decided on the device is learnt at the next log step.

    ``trainer.global_step`` counts optimizer steps whether the guard applied or skipped them,
    and the learning-rate schedule counts the same steps. Counting skipped steps keeps the
    schedule, ``max_steps`` and checkpoint numbering aligned with the data, and needs no host
    read of a device flag; a schedule that silently stops advancing on skipped steps was
    reported as a bug in Lightning (Lightning-AI/pytorch-lightning#18828).
    """

    def on_fit_start(self, trainer: SafeTrainer) -> None:
        """Called once, after ``prepare`` and before the first batch."""

    def on_train_batch_start(self, trainer: SafeTrainer, batch: Any, batch_idx: int) -> None:
        """Called before the forward pass of every micro-batch."""

    def on_after_backward(self, trainer: SafeTrainer) -> None:
        """Called after the backward pass of every micro-batch."""

    def on_before_optimizer_step(self, trainer: SafeTrainer, optimizer: torch.optim.Optimizer) -> None:
        """Called once per optimizer step, after clipping and before the update."""

    def on_train_batch_end(
        self, trainer: SafeTrainer, outputs: torch.Tensor, batch: Any, batch_idx: int
    ) -> None:
        """Called after every micro-batch (after the step on the last one of a window)."""

    def on_validation_end(self, trainer: SafeTrainer, eval_loss: float) -> None:
        """Called after each evaluation with the mean evaluation loss over all processes."""

    def on_fit_end(self, trainer: SafeTrainer, result: FitResult) -> None:
        """Called once at the end of ``fit`` with its result."""

    def on_skip(self, trainer: SafeTrainer, event: Event) -> None:
        """Called when the trainer learns that a step was skipped."""

    def on_rollback(self, trainer: SafeTrainer, event: Event) -> None:
        """Called after a rollback restored a checkpoint."""

    def on_checkpoint(self, trainer: SafeTrainer, event: Event) -> None:
        """Called once a checkpoint is complete and durable."""

    def on_finding(self, trainer: SafeTrainer, finding: Finding) -> None:
        """Called once per new finding."""
