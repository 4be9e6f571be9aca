"""Divergence under Lightning: safeloop's checkpoints, and a rollback made in place at a batch's end.

``SafeTrainer``'s run loop turns a divergence into a rollback and runs its loop again from the
restored step. Under Lightning the loop, its step counters and the data iterator are
Lightning's, and a callback can neither rewind them nor veto a batch (only a
``LightningModule``'s own ``on_train_batch_start`` returning -1 ends an epoch early; a callback's
return value is ignored). So the rollback is made in place, at ``on_train_batch_end`` (after the
optimizer and the LR schedulers stepped, before the next batch), with ``SafeTrainer``'s own
components: ``Checkpointer`` (safetensors and JSON, never pickle), ``Rollback`` (the target, the
budget, the LR cut, the ``DivergenceError`` with the causes ranked) and the guards' state.

Under FSDP2 (``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy``) the module's and optimizer's
state are written by every process as its own safetensors shards (``checkpoint/sharded.py``, no
pickle) and read back into the same DTensors, or FSDP1's same flat parameters. Under DeepSpeed
each process writes its share of the whole tensors (``checkpoint/zero_state.py``), read back into
the engine's partitions.

What a rollback restores, from the newest healthy checkpoint before the divergence: the module's
parameters and buffers, copied into the same tensors (``load_state_dict``: the strategy's
references, DDP's buckets among them, stay valid); the optimizer's state and param groups; the LR
scheduler; the fp16 scaler; the guards' state (spike detector, the run of skips, adaptive
clipping, the first-step check). Then the learning rates are multiplied by ``rollback_lr_factor``.

What it does not: Lightning's counters (``global_step``, epoch, batch index: ``max_steps``, the
loggers' steps and ``ModelCheckpoint`` count on); the data iterator (the fit goes on with the
batch after the detection, so the batches since the checkpoint are not replayed: what
``SafeTrainer`` does with ``rollback_skip_batches=None``); the RNG states; what the
``LightningModule`` keeps outside its ``state_dict`` (a plain attribute, a counter).

When no rollback can be made (past ``max_rollbacks``, or no healthy checkpoint before the
anomaly) the fit stops with ``SafeTrainer``'s ``DivergenceError``, which here also names the
newest healthy checkpoint to start a new fit from (kept with ``checkpoint_dir``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from accelerate.utils import DistributedType

from safeloop.checkpoint.checkpointer import ENGINE_NAMES, Checkpointer, build_manager
from safeloop.checkpoint.sharded import ShardedState, dcp_support_problem
from safeloop.checkpoint.zero_state import ZeroState, zero_checkpoint_problem
from safeloop.config import TrainerConfig
from safeloop.errors import DivergenceError
from safeloop.findings import Reporter
from safeloop.guards.divergence import Divergence
from safeloop.lightning.fsdp import is_fsdp1
from safeloop.lightning.processes import LightningProcesses
from safeloop.log_step import LogOutcome, LogStep
from safeloop.rollback import Rollback
from safeloop.run_state import Progress, RunRecord, Stateful
from safeloop.skips import SkipHandler
from safeloop.zero import ZeroEngine

__all__ = ["InPlaceRollback", "NOT_REPLAYED"]

# said in every rollback event: Lightning goes on with its next batch, nothing is drawn again
NOT_REPLAYED = (
    "not replayed: Lightning's loop owns the data iterator, so the fit goes on with the batch after "
    "the detection"
)


class _NoRankState:
    """Each process's part of a checkpoint under Lightning: empty.

    ``SafeTrainer`` saves every process's RNG states to replay its data exactly; a Lightning
    rollback draws no batch again, and its generators are Lightning's and the user's.
    """

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


class _DataNotReplayed:
    """What ``Rollback`` calls the data cursor: under Lightning the batches since go by anyway.

    ``Rollback`` asks it to skip the micro-batches between the checkpoint and the detection; they
    were drawn already, and Lightning's iterator goes on after them, so nothing is to be done.
    """

    def fast_forward(self, batches: int) -> None:
        """Nothing to do: the iterator is already past them (the event holds the count)."""


class InPlaceRollback:
    """The checkpoints of a Lightning fit, and its rollbacks, at step and batch boundaries.

    Every process calls it at the same boundaries (the divergences and the healthy flag come from
    values agreed over the processes), so every process saves, and rolls back to, the same step.

    Args:
        config (`TrainerConfig`): ``rollback``, ``checkpoint_*``, ``max_rollbacks``,
            ``rollback_lr_factor``.
        processes (`LightningProcesses`): the run's processes.
        module (`LightningModule`): the module being fitted (unwrapped).
        optimizer (`torch.optim.Optimizer`): its one optimizer.
        scheduler (`LRScheduler`, *optional*): the LR scheduler of ``configure_optimizers``.
        progress (`Progress`): the step checkpoints are named by (Lightning's ``global_step``).
        record (`RunRecord`): the run's record (saved for its LR scale; never restored).
        reporter (`Reporter`): checkpoint and rollback events, the causes of a ``DivergenceError``.
        skips (`SkipHandler`): its run of skips is saved, and ended by a rollback.
        log (`LogStep`): its spike detector is saved; a rollback drops its unread measurements.
        guard_state (`Sequence[Stateful]`): the other guards' JSON state (first-step check,
            adaptive clipping), saved and restored.
        after_rollback (`Sequence[Any]`): components whose ``after_rollback()`` is called after a
            rollback, besides ``skips`` and ``log``.
    """

    def __init__(
        self,
        config: TrainerConfig,
        processes: LightningProcesses,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        progress: Progress,
        record: RunRecord,
        reporter: Reporter,
        skips: SkipHandler,
        log: LogStep,
        guard_state: Sequence[Stateful],
        after_rollback: Sequence[Any] = (),
        zero: ZeroEngine | None = None,
    ) -> None:
        # FSDP: each process writes and reads its own shards of the module and the optimizer,
        # through the root FSDP module under FSDP1 (its sharded state dict), the module under FSDP2;
        # DeepSpeed: whole tensors, each process its share (ZeroState)
        self.sharded = processes.distributed_type == DistributedType.FSDP or zero is not None
        fsdp1 = is_fsdp1(processes.trainer.strategy)
        engine = None
        shards: ShardedState | ZeroState | None = None
        problem = None
        if zero is not None:
            engine, problem = "deepspeed", zero_checkpoint_problem(zero.engine)
            shards = ZeroState(zero.engine, module, processes.process_index, processes.num_processes)
        elif self.sharded:
            engine, problem = ("fsdp1" if fsdp1 else "fsdp2"), dcp_support_problem()
            shards = ShardedState(processes.trainer.strategy.model if fsdp1 else module, optimizer)
        self._engine = engine
        # with checkpoint_dir and a torch that cannot write shards: ConfigError; without, a note
        manager, note = build_manager(config, processes, engine, problem)  # type: ignore[arg-type]
        if note is not None:
            reporter.keep(note)
        shared = {"lr_scheduler": scheduler, "scaler": processes.scaler}
        if not self.sharded:  # else the optimizer's state is in the shards, with the module's
            shared = {"optimizer": optimizer, **shared}
        self.checkpoints = Checkpointer(
            manager, processes,  # type: ignore[arg-type]
            model=None if self.sharded else module,
            shared=shared,
            run_state=[record, skips.tracker, *guard_state],
            rank_state=_NoRankState(),
            progress=progress,
            reporter=reporter,
            shards=shards,
            shard_engine=engine,
        )  # fmt: skip
        self._data = _DataNotReplayed()
        self.rollback: Rollback | None = None
        if manager is not None and config.rollback:
            # Rollback counts the batches since the checkpoint in micro-batches
            accumulation = processes.gradient_accumulation_steps
            self.rollback = Rollback(
                dataclasses.replace(config, gradient_accumulation_steps=accumulation),
                self.checkpoints, optimizer, scheduler, progress, record,
                self._data, reporter,  # type: ignore[arg-type]
            )  # fmt: skip
        self.progress = progress
        self.skips = skips
        self.log = log
        self._after = (skips, log, *after_rollback)
        self._pending: Divergence | None = None

    @property
    def enabled(self) -> bool:
        """Whether divergences roll back (checkpoints are written)."""
        return self.rollback is not None

    def start(self) -> None:
        """At the start of training: the state before the first step, a healthy rollback target."""
        if self.enabled and self.checkpoints.last_saved_step != self.progress.global_step:
            self.checkpoints.save(healthy=True)

    def step_ended(self, outcome: LogOutcome | None, *, in_step: bool) -> None:
        """What a step boundary found: mark checkpoints healthy, save one when due, or roll back.

        Args:
            outcome (`LogOutcome`, *optional*): the log step's (or a skip run's) outcome at this
                boundary; None when no step ended here (nothing to do).
            in_step (`bool`): the boundary is met inside the next step (a second ``opt.step()`` in
                one ``training_step``): a divergence waits for :meth:`batch_ended`, since the
                next step's gradients are already computed from the weights it would replace.

        Raises:
            DivergenceError: the rollback budget is spent, or no healthy checkpoint precedes it.
        """
        if outcome is None or not self.enabled or self._pending is not None:
            return  # no step ended, rollback off, or a branch to be abandoned at the batch's end
        if outcome.divergence is not None:
            self._pending = outcome.divergence
            if not in_step:
                self.batch_ended()
            return
        due = self.checkpoints.due(self.progress.global_step)
        if outcome.window_start is None and not due:
            return  # most steps: not a log step, no checkpoint due
        healthy = self.skips.healthy and not self.log.spikes.suspicious
        if outcome.window_start is not None and healthy:
            self.checkpoints.mark_healthy(outcome.window_start)
        if due:
            self.checkpoints.save(healthy=healthy)

    def batch_ended(self) -> None:
        """At ``on_train_batch_end``: roll back in place from a divergence met in this batch.

        Raises:
            DivergenceError: the rollback budget is spent, or no healthy checkpoint precedes it.
        """
        divergence, self._pending = self._pending, None
        if divergence is None or self.rollback is None:
            return
        try:
            event = self.rollback.roll_back(divergence)  # restored in place; the LR lowered
        except DivergenceError as error:
            raise self._stop(error, divergence) from None  # the same error, with where to go on from
        for component in self._after:
            component.after_rollback()  # what they held belongs to the abandoned branch
        # Lightning's step count goes on, so the abandoned branch's norms are dropped by step here
        self.log.divergences.norms.forget_after(event.step)
        event.detail["data"] = NOT_REPLAYED  # the event is this fit's own: no hook has seen it yet

    def _stop(self, error: DivergenceError, divergence: Divergence) -> DivergenceError:
        """``error`` (``SafeTrainer``'s message and causes), naming the checkpoint to start again from.

        Lightning resumes from its own checkpoints, not from these: the sentence says what the
        newest healthy one holds and how to load it (every process together: a collective).
        """
        target = self.checkpoints.rollback_target(divergence.start_step)
        lasting = None if target is None else self.checkpoints.lasting_path_of(target)
        if lasting is not None and self._engine == "deepspeed":
            then = (
                f"The newest healthy checkpoint before it is {lasting} (step {target}): its "
                "shards/ folder holds the module's and optimizer's whole tensors as safetensors, each "
                "process's share in its own `whole-*.safetensors` (DeepSpeed); start a new fit from it, "
                "at a lower learning rate: the `model.*` tensors of every file "
                "(`safetensors.torch.load_file`) are the module's `state_dict`, to load before `trainer.fit`."
            )
        elif lasting is not None and self._engine is not None:
            then = (
                f"The newest healthy checkpoint before it is {lasting} (step {target}): its "
                "shards/ folder holds each process's safetensors shards of the module and optimizer "
                f"({ENGINE_NAMES[self._engine]}); start a new fit from it, at a lower learning rate: "
                "`torch.distributed.checkpoint.load(..., storage_reader=HuggingFaceStorageReader(...))` "
                "into the sharded module on every process."
            )
        elif lasting is not None:
            then = (
                f"The newest healthy checkpoint before it is {lasting} (step {target}): its "
                "model.safetensors holds the module's state_dict; start a new fit from it, at a lower "
                "learning rate: `module.load_state_dict(safetensors.torch.load_file(...))`."
            )
        elif target is not None:
            then = (
                f"The newest healthy checkpoint before it (step {target}) was in a temporary folder, "
                "removed now: pass `SafeLoopCallback(checkpoint_dir=...)` to keep the checkpoints."
            )
        else:
            then = "No healthy checkpoint of this fit precedes it."
        return DivergenceError(f"{error}\n{then}", findings=error.findings)

    def end(self) -> None:
        """At the end of training (every process): the last save finished."""
        self.checkpoints.close()

    def remove_temporary(self) -> None:
        """Delete a temporary checkpoint folder (no collective: safe after an error)."""
        self.checkpoints.remove_temporary()
