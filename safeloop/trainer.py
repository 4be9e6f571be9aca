"""``SafeTrainer``: builds the run's components, wires them, and keeps the public attributes.

The trainer wires; it holds no thresholds and no loop. ``__init__`` builds the components, each
handed the state objects and collaborators it needs (none holds the trainer); ``fit`` reads as
the outline of a run (resume, start, run the loop, finish). The loop itself is ``RunLoop``;
docs/architecture.md walks one optimizer step through the components.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader

from safeloop.batching import LossComputer
from safeloop.callbacks import Callback
from safeloop.checkpoint.checkpointer import Checkpointer, NamedState, build_manager
from safeloop.checkpoint.sharded import ShardedState, dcp_support_problem, sharded_engine
from safeloop.checkpoint.zero_state import ZeroState, zero_checkpoint_problem
from safeloop.config import TrainerConfig, build_config
from safeloop.data_cursor import DataCursor
from safeloop.diagnostics.advice import check_lr_advice
from safeloop.diagnostics.session import Diagnostics, check_optimizer_before_prepare
from safeloop.distributed import settle_collectives
from safeloop.errors import ConfigError
from safeloop.findings import Reporter
from safeloop.guards.adaptive_clip import AdaptiveClip
from safeloop.guards.divergence import DEFAULT_PATIENCE, DEFAULT_WARMUP, DEFAULT_ZSCORE, SpikeDetector
from safeloop.hooks import CallbackList
from safeloop.launch import build_accelerator
from safeloop.log_step import LogStep
from safeloop.lr_finder.curve import DEFAULT_RULE, log_spaced
from safeloop.lr_finder.result import LRFinderResult
from safeloop.lr_finder.snapshot import TrainingSnapshot
from safeloop.lr_finder.sweep import RangeTest, finish_result, lr_finder_problems
from safeloop.metrics import MetricBuffer
from safeloop.optimizer_step import OptimizerStep
from safeloop.preemption import PreemptionWatch
from safeloop.progress import ProgressBar, bar_safe_logging, planned_steps, steps_per_epoch
from safeloop.report.record import RecordWriter
from safeloop.results import Finding, FitResult, NoiseScaleEstimate, Status
from safeloop.rollback import DivergencePolicy, Rollback
from safeloop.run_loop import RunLoop
from safeloop.run_state import Progress, RunRecord
from safeloop.sample_indices import SampleIndices
from safeloop.skips import SkipHandler
from safeloop.stepping import decides_on_device
from safeloop.summary import fit_summary
from safeloop.validation import name_unknown_keywords
from safeloop.zero import check_deepspeed_clipping, zero_engine

__all__ = ["SafeTrainer"]

logger = logging.getLogger("safeloop")


class SafeTrainer:
    """A drop-in replacement for a hand-written Accelerate training loop.

    With no guard acting, ``fit`` applies exactly the updates of the equivalent hand-written
    loop (``accumulate``, ``backward``, ``clip_grad_norm_``, ``step``, ``zero_grad``); on CPU
    with a fixed seed the parameters are bitwise equal. The user never calls ``backward``,
    ``step`` or ``zero_grad``.

    Args:
        model (`torch.nn.Module`): the model, not yet prepared by Accelerate.
        optimizer (`torch.optim.Optimizer`): over the model's parameters.
        train_dataloader (`DataLoader`): training batches (see the batch conventions).
        loss_fn (`Callable`, *optional*): ``loss_fn(outputs, targets) -> loss``.
        training_step (`Callable`, *optional*): ``training_step(model, batch) -> loss``; wins.
        eval_dataloader (`DataLoader`, *optional*): evaluated at the end of each epoch.
        lr_scheduler (`LRScheduler`, *optional*): stepped once per optimizer step.
        max_epochs (`int`, *optional*, defaults to 1): epochs when ``max_steps`` is None.
        max_steps (`int`, *optional*): optimizer steps in the run; wins over ``max_epochs``.
        gradient_accumulation_steps (`int`, *optional*, defaults to 1, or the accelerator's).
        mixed_precision (`str`, *optional*): ``"no"``, ``"fp16"`` or ``"bf16"``.
        accelerator (`Accelerator`, *optional*): an existing Accelerator to use.
        seed (`int`, *optional*): seeds Python, NumPy and torch on every process in ``fit``.
        clip_grad_norm (`float`, *optional*): max global gradient norm.
        clip_grad_value (`float`, *optional*): clamp every gradient element to ``±value``.
        adaptive_clip (`float`, *optional*): clip the global gradient norm when its z-score
            against its running mean and deviation exceeds this (ZClip; 2.5 is ZClip's default).
        nan_guard (`str`, *optional*, defaults to ``"skip"``): a step whose loss or gradients
            are not finite changes nothing (``"skip"``), raises ``NonFiniteError`` (``"raise"``),
            or the guard is ``"off"``.
        max_consecutive_skips (`int`, *optional*, defaults to 5): more skips in a row raise
            ``NonFiniteError``.
        reinit_zero_params (`str`, *optional*, defaults to ``"xavier"``): re-initialise
            all-zero weights whose first gradient is all zero too (``"xavier"``, ``"normal"``),
            or only report them (None).
        reinit_std (`float`, *optional*, defaults to 0.02): standard deviation for ``"normal"``.
        reinit_scope (`str`, *optional*, defaults to ``"weights"``): ``"weights"`` (2-D and
            more) or ``"all"`` (stuck 1-D tensors too).
        rollback (`bool`, *optional*, defaults to True): on divergence (a sustained loss spike,
            or more than ``max_consecutive_skips`` non-finite steps in a row) restore the newest
            healthy checkpoint, lower the learning rates, skip the data since, and go on.
        max_rollbacks (`int`, *optional*, defaults to 3): one more divergence raises
            ``DivergenceError``.
        rollback_lr_factor (`float`, *optional*, defaults to 0.5): learning rates are multiplied
            by it at each rollback (the schedule keeps the scale).
        rollback_skip_batches (`int`, *optional*): micro-batches skipped after a rollback; None:
            those between the checkpoint and the detection.
        spike_zscore (`float`, *optional*, defaults to 6.0): running standard deviations above
            the running mean of the loss that count as a spike.
        spike_patience (`int`, *optional*, defaults to 3): spiking steps in a row that confirm it.
        spike_warmup (`int`, *optional*, defaults to 20): steps observed before any spike.
        checkpoint_dir (`str`, *optional*): where checkpoints go (``step-00000500/`` folders);
            None: a temporary folder removed after ``fit`` when ``rollback`` needs one, else none.
        checkpoint_every (`int`, *optional*, defaults to 500): global steps between checkpoints.
        keep_checkpoints (`int`, *optional*, defaults to 3): newest checkpoints kept.
        async_checkpoint (`bool`, *optional*, defaults to False): tensors are copied at the
            step boundary and the main process writes them in a background thread (one save in
            flight; ``on_checkpoint`` fires once it is durable; an error surfaces at the next step).
        diagnostics (`bool`, *optional*, defaults to True): run the checks of
            ``docs/diagnostics.md`` (first batch, data, gradients, learning rate, plateau) and
            report findings; False costs nothing.
        gradient_noise_scale (`str`, *optional*, defaults to ``"auto"``): measure the gradient
            noise scale (the ``batch-size`` advice) where gradient accumulation or several DDP or
            FSDP2 processes give two batch sizes for free; ``"split"`` also on one process without
            accumulation, by running each batch as two halves (a second forward and backward
            per step, not bitwise equal to the unsplit run); ``"off"``. Needs ``diagnostics``.
        callbacks (`Sequence[Callback]`, *optional*): observers of the loop.
        log_every (`int`, *optional*, defaults to 10): optimizer steps between metric logs.
        progress_bar (`bool`, *optional*, defaults to True): tqdm bar on the main process.
        summary (`bool`, *optional*, defaults to True): print a short summary at the end of ``fit``
            on the main process (how the run ended, loss first -> last, findings, checkpoints).
        log_with (`str | list`, *optional*): Accelerate trackers (``"tensorboard"``, ...) to start.
        project_dir (`str`, *optional*): where those trackers write.

    Raises:
        ConfigError: listing every invalid argument.
        TypeError: for an argument not in this list, naming the closest accepted ones.

    Example:
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> trainer = SafeTrainer(model, optimizer, loader, loss_fn=loss_fn)  # doctest: +SKIP
        >>> result = trainer.fit()  # doctest: +SKIP
    """

    @name_unknown_keywords
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_dataloader: DataLoader,
        *,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        training_step: Callable[[torch.nn.Module, Any], Any] | None = None,
        eval_dataloader: DataLoader | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_epochs: int = 1,
        max_steps: int | None = None,
        gradient_accumulation_steps: int | None = None,
        mixed_precision: str | None = None,
        accelerator: Accelerator | None = None,
        seed: int | None = None,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        adaptive_clip: float | None = None,
        nan_guard: str = "skip",
        max_consecutive_skips: int = 5,
        reinit_zero_params: str | None = "xavier",
        reinit_std: float = 0.02,
        reinit_scope: str = "weights",
        rollback: bool = True,
        max_rollbacks: int = 3,
        rollback_lr_factor: float = 0.5,
        rollback_skip_batches: int | None = None,
        spike_zscore: float = DEFAULT_ZSCORE,
        spike_patience: int = DEFAULT_PATIENCE,
        spike_warmup: int = DEFAULT_WARMUP,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 500,
        keep_checkpoints: int = 3,
        async_checkpoint: bool = False,
        diagnostics: bool = True,
        gradient_noise_scale: str = "auto",
        callbacks: Sequence[Callback] = (),
        log_every: int = 10,
        progress_bar: bool = True,
        summary: bool = True,
        log_with: str | Sequence[Any] | None = None,
        project_dir: str | None = None,
    ) -> None:
        self.config: TrainerConfig
        # every keyword argument, by name, exactly as given (validated together, all problems at once)
        arguments = {
            k: v for k, v in locals().items() if k not in ("self", "model", "optimizer", "train_dataloader")
        }
        self.config, callback_items = build_config(
            model, optimizer, train_dataloader, arguments, callback_base=Callback
        )
        config = self.config
        self._callbacks = CallbackList(callback_items, self)
        self._owns_accelerator = accelerator is None
        if config.seed is not None:
            # before prepare: Accelerate seeds its shuffling generator from torch's global RNG there
            set_seed(config.seed)
        self.accelerator = build_accelerator(config, accelerator)
        # The scheduler is not prepared: Accelerate would step it once per process, and the API
        # promises one step per optimizer step on any number of processes.
        self.lr_scheduler = lr_scheduler
        objects: list[Any] = [model, optimizer, train_dataloader]
        if eval_dataloader is not None:
            objects.append(eval_dataloader)
        early: list[Finding] = []
        if config.diagnostics and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed replaces the optimizer's param groups with flat partitions in `prepare`
            # (and fails there with a bare KeyError on a tensor that is not the model's)
            early = check_optimizer_before_prepare(model, optimizer)
        prepared = self.accelerator.prepare(*objects)
        self.model: torch.nn.Module = prepared[0]
        self.optimizer: torch.optim.Optimizer = prepared[1]
        self.train_dataloader = prepared[2]
        self.eval_dataloader = prepared[3] if eval_dataloader is not None else None
        self._build(loss_fn, training_step, initial_lr=optimizer.param_groups[0]["lr"])
        self._reporter.add_all(early)  # the optimizer check made before `prepare` (DeepSpeed)

    def _build(
        self,
        loss_fn: Callable[[Any, Any], Any] | None,
        training_step: Callable[[torch.nn.Module, Any], Any] | None,
        *,
        initial_lr: float,
    ) -> None:
        """Build the run's state objects and components, each handed what it needs."""
        config, acc = self.config, self.accelerator
        unwrapped = acc.unwrap_model(self.model)
        self._progress = Progress(step_lr=initial_lr)
        self._record = RunRecord()
        self._reporter = Reporter(acc, self._progress, self._record, self._callbacks)
        # the run's record, metrics.jsonl in checkpoint_dir (off without one, or off the main process)
        self._run_file = RecordWriter.for_run(config, acc, self._progress, self._record, self._reporter)
        self._callbacks.callbacks += self._run_file.hooks  # evaluations and rollbacks, when they happen
        engine = sharded_engine(acc, self.model)
        # under DeepSpeed the engine's backward and step are called apart (see zero.py)
        zero = zero_engine(acc, self.model)
        if zero is not None:
            check_deepspeed_clipping(config, zero)
            engine_problem = zero_checkpoint_problem(zero.engine)
        else:
            engine_problem = dcp_support_problem() if engine else None
        manager, note = build_manager(config, acc, engine, engine_problem)
        if note is not None:
            self._reporter.keep(note)
        losses = self._losses = LossComputer(loss_fn, training_step)
        self._zero, self._fitting = zero, False
        self._diagnostics = None
        if config.diagnostics:
            self._diagnostics = Diagnostics(
                acc, self.model, self.optimizer, self._reporter, log_every=config.log_every,
                loss_fn=loss_fn, eval_dataloader=self.eval_dataloader, zero=zero,
                custom_step=training_step is not None, noise_scale=config.gradient_noise_scale,
            )  # fmt: skip
        adaptive = None if config.adaptive_clip is None else AdaptiveClip(config.adaptive_clip)
        spikes = SpikeDetector(config.spike_zscore, config.spike_patience, config.spike_warmup)
        cursor = DataCursor(self.train_dataloader, keep_epoch_rng=manager is not None)
        rollback_on = config.rollback and manager is not None
        policy = DivergencePolicy(config, self._progress, self._reporter, rollback_enabled=rollback_on)
        on_device = decides_on_device(self.optimizer, acc.scaler, zero)
        skips = SkipHandler(
            policy=config.nan_guard,
            max_consecutive_skips=config.max_consecutive_skips,
            param_names=[name for name, _ in unwrapped.named_parameters()],
            # a skip read on the host each step is replayed at once; a device-side one at the log step
            history_steps=config.log_every if on_device else 1,
            accumulation=config.gradient_accumulation_steps,
            model=unwrapped,
            loss_of=losses,
            record=self._record,
            reporter=self._reporter,
            divergences=policy,
            # the dataset indices of each micro-batch (a tuple of ints per batch), for a bad input
            sample_indices=None if config.nan_guard == "off" else SampleIndices(self.train_dataloader),
        )
        step = OptimizerStep(
            config, acc, self.model, self.optimizer, self.lr_scheduler, losses=losses,
            callbacks=self._callbacks, reporter=self._reporter, skips=skips,
            diagnostics=self._diagnostics, zero=zero, adaptive=adaptive,
        )  # fmt: skip
        sharded = engine is not None  # the model and optimizer are saved in shards
        shards: ShardedState | ZeroState | None = None
        if zero is not None:  # whole tensors, each process its share
            shards = ZeroState(zero.engine, unwrapped, acc.process_index, acc.num_processes)
        elif dcp_support_problem() is None:
            shards = ShardedState(self.model, self.optimizer)
        shared = {"lr_scheduler": self.lr_scheduler, "scaler": acc.scaler}
        if not sharded:  # else the optimizer's state is in the shards, with the model's
            shared = {"optimizer": self.optimizer, **shared}
        self._checkpoints = Checkpointer(
            manager,
            acc,
            model=None if sharded else unwrapped,
            shared=shared,
            run_state=[
                self._progress, self._record, cursor, skips.tracker, step,
                NamedState("spike_detector", spikes), NamedState("adaptive_clip", adaptive),
            ],
            rank_state=cursor.rank_state,
            progress=self._progress,
            reporter=self._reporter,
            shards=shards,
            shard_engine=engine if sharded else None,
        )  # fmt: skip
        rollback = None
        if rollback_on:
            rollback = Rollback(
                config, self._checkpoints, self.optimizer, self.lr_scheduler, self._progress,
                self._record, cursor, self._reporter,
            )  # fmt: skip
        self._metrics = MetricBuffer(config.log_every)
        log = LogStep(
            acc, self._metrics, self._progress, self._record,
            skips=skips if step.guarded and on_device else None,
            spikes=spikes, divergences=policy, diagnostics=self._diagnostics, run_file=self._run_file,
        )  # fmt: skip
        self._loop = RunLoop(
            config, acc, self.model, self.eval_dataloader, progress=self._progress, record=self._record,
            cursor=cursor, step=step, skips=skips, metrics=self._metrics, log=log,
            checkpoints=self._checkpoints, rollback=rollback, callbacks=self._callbacks,
            reporter=self._reporter, diagnostics=self._diagnostics,
        )  # fmt: skip

    # -- the public attributes callbacks read ----------------------------------------------

    @property
    def global_step(self) -> int:
        """Optimizer steps completed, skipped ones included."""
        return self._progress.global_step

    @property
    def epoch(self) -> int:
        """The current epoch (0-based)."""
        return self._progress.epoch

    @property
    def checkpoint_dir(self) -> Path | None:
        """Where checkpoints go (a temporary folder when ``checkpoint_dir`` was None), or None."""
        return self._checkpoints.directory

    # -- the outline of a run -------------------------------------------------------------

    def fit(self, resume_from: str | os.PathLike[str] | None = None) -> FitResult:
        """Train until ``max_steps`` optimizer steps or ``max_epochs`` epochs.

        Args:
            resume_from (`str`, *optional*): a checkpoint folder, or ``"latest"`` (the newest
                valid one in ``checkpoint_dir``; none there means a fresh start). Counts and
                limits are totals for the run, resumed or not.

        Returns:
            `FitResult`: steps, history, events, findings and the last evaluation loss.

        Raises:
            ConfigError: at the first batch no batch convention can read.
            NonFiniteError: with ``nan_guard="raise"`` at the first non-finite step, or after
                more than ``max_consecutive_skips`` skipped steps in a row.
            CheckpointError: when ``resume_from`` names no valid checkpoint.
        """
        if self._fitting:
            raise ConfigError(
                "fit() was called while fit() runs (from a callback?); a trainer runs one fit at a time"
            )
        self._fitting = True
        try:
            return self._fit(resume_from)
        finally:
            self._fitting = False

    def _fit(self, resume_from: str | os.PathLike[str] | None) -> FitResult:
        if self.config.seed is not None:
            set_seed(self.config.seed)  # the training RNG stream starts from a known point
        self._checkpoints.resume(resume_from)
        self._run_file.start(resume_from)
        self._start_trackers()
        self.model.train()
        self._callbacks.call("on_fit_start")
        planned = planned_steps(self.config, self.train_dataloader)
        bar = ProgressBar(
            planned,
            enabled=self.config.progress_bar and self.accelerator.is_main_process,
            initial=self.global_step,
        )
        if self._diagnostics is not None:
            self._diagnostics.monitor.plan(planned, steps_per_epoch(self.config, self.train_dataloader))
            self._diagnostics.profile_eval()
        self._metrics.restart_clock()
        watch, started, first_step = PreemptionWatch(), time.perf_counter(), self.global_step
        try:
            with bar_safe_logging(self.config.progress_bar and self.accelerator.is_main_process):
                self._loop.run(bar, watch)  # epochs, rollbacks, preemption, Ctrl-C, final checkpoint
            if self._diagnostics is not None:
                self._diagnostics.finish()
            record = self._record
            # advice the run can check is checked against it (a rate that trained after a rollback)
            self._reporter.findings[:] = check_lr_advice(self._reporter.findings, record)
            result = FitResult(
                global_step=self.global_step,
                skipped_steps=record.skipped_steps,
                rollbacks=record.rollbacks,
                history=list(record.history),
                events=list(record.events),
                findings=list(self._reporter.findings),
                eval_loss=record.eval_loss,
                trace=record.trace.copy(),  # per-layer values and evaluations, bounded, for plot()
                baseline_loss=None if self._diagnostics is None else self._diagnostics.baseline_value,
                status=self._end_status(watch),
                gradient_noise_scale=self._noise_estimate(),
            )
            self._reporter.finish(result, self.config.checkpoint_dir)
            self._run_file.finish(result)
            if self.config.summary and self.accelerator.is_main_process:
                saved = self._checkpoints.last_saved_step
                latest = None if saved is None else self._checkpoints.lasting_path_of(saved)
                text = fit_summary(
                    result,
                    seconds=time.perf_counter() - started,
                    steps_run=self.global_step - first_step,
                    checkpoint_dir=self.config.checkpoint_dir,
                    latest=None if latest is None else str(latest),
                )
                bar.close()  # the summary goes below the finished bar
                bar.write(text)
            self._callbacks.call("on_fit_end", result)
            settle_collectives(self.accelerator)
        finally:
            bar.close()
            self._run_file.close()  # a fit ended by an exception gets its end line here
            self._checkpoints.remove_temporary()
            if self._owns_accelerator and self.config.log_with:
                self.accelerator.end_training()
        if result.status == "interrupted":
            raise KeyboardInterrupt  # Ctrl-C: the step finished and the checkpoint is written
        return result

    def find_lr(
        self,
        min_lr: float = 1e-7,
        max_lr: float = 10.0,
        num_steps: int = 100,
        *,
        stop_factor: float = 4.0,
        smoothing: float = 0.9,
        rule: str = DEFAULT_RULE,
        snapshot: str = "auto",
    ) -> LRFinderResult:
        """Run a learning-rate range test and put everything back as it was, bitwise.

        One optimizer step per learning rate, evenly spaced in log from ``min_lr`` to ``max_lr``,
        on the trainer's own model, optimizer, data, accumulation, mixed precision, clipping and
        NaN/Inf guard. Afterwards the parameters, buffers, optimizer and scheduler state, fp16 loss
        scale, every RNG and the data position are those from before: a ``fit()`` after
        ``find_lr()`` trains exactly as a ``fit()`` without it. Callbacks and trackers see nothing
        of the sweep. Call it before ``fit()`` or between fits, on every process.

        Args:
            min_lr (`float`, *optional*, defaults to 1e-7): the first learning rate.
            max_lr (`float`, *optional*, defaults to 10.0): the last one.
            num_steps (`int`, *optional*, defaults to 100): optimizer steps (at least 10); a
                training loader with fewer batches is started over.
            stop_factor (`float`, *optional*, defaults to 4.0): stop when the smoothed loss passes
                this multiple of its best.
            smoothing (`float`, *optional*, defaults to 0.9): the debiased moving average's beta
                (about the last 10 points).
            rule (`str`, *optional*, defaults to ``"minimum"``): the suggestion rule (``"minimum"``,
                ``"steepest"``, ``"valley"``).
            snapshot (`str`, *optional*, defaults to ``"auto"``): keep the state in host
                ``"memory"`` or in a temporary safetensors file on ``"disk"``; ``"auto"``: memory
                unless the copy exceeds half of the available host memory.

        Returns:
            `LRFinderResult`: the curve, the suggestion (or the verdict when there is none), a plot.

        Raises:
            ConfigError: a bad argument, a call while ``fit()`` runs, or DeepSpeed.
        """
        problems = lr_finder_problems(min_lr, max_lr, num_steps, stop_factor, smoothing, rule, snapshot)
        if self._fitting:
            problems.append("find_lr() was called while fit() runs (from a callback?); call it before fit()")
        if self._zero is not None:
            problems.append(
                "find_lr() does not run under DeepSpeed (its engine owns the optimizer's state and "
                "learning rates); run it without DeepSpeed at the same total batch size, then train here"
            )
        if problems:
            raise ConfigError("find_lr: " + "; ".join(problems))
        config, modes = self.config, [module.training for module in self.model.modules()]
        saved = TrainingSnapshot.capture(
            self.accelerator, self.model, self.optimizer, self.lr_scheduler, self.train_dataloader, snapshot
        )
        self._fitting = True
        test = RangeTest(
            self.accelerator, self.model, self.optimizer, self.train_dataloader, self._losses,
            clip_grad_norm=config.clip_grad_norm, clip_grad_value=config.clip_grad_value,
            progress_bar=config.progress_bar,
        )  # fmt: skip
        try:
            self.model.train()
            sweep = test.run(
                log_spaced(min_lr, max_lr, num_steps), stop_factor=stop_factor, smoothing=smoothing
            )
        finally:
            self._fitting = False
            saved.restore()
            for module, mode in zip(self.model.modules(), modes, strict=True):
                module.training = mode
        result = finish_result(sweep, saved.cost, rule, smoothing)
        self._run_file.lr_find(result)  # the curve in the run's record, for `safeloop report`
        if self.accelerator.is_main_process:
            logger.info("safeloop: find_lr: %s", result.message)
        return result

    def _noise_estimate(self) -> NoiseScaleEstimate | None:
        noise = None if self._diagnostics is None else self._diagnostics.noise
        return None if noise is None else noise.estimate()

    def _end_status(self, watch: PreemptionWatch) -> Status:
        if not self._loop.preempted:
            return "completed"
        return "interrupted" if watch.interrupted else "preempted"

    def _start_trackers(self) -> None:
        """Start the Accelerate trackers of ``log_with`` when safeloop built the Accelerator."""
        config = self.config
        if self._owns_accelerator and config.log_with and not self.accelerator.trackers:
            settings = {k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))}
            self.accelerator.init_trackers("safeloop", config=settings)
