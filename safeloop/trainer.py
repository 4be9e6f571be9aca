"""``SafeTrainer``: the training loop, wired from config, batching, guards and metrics.

The trainer wires; it holds no thresholds. ``fit`` reads as the outline of a run (set up, run the
loop, finish) and ``_optimizer_step`` holds the detail of one optimizer step. The iteration itself
(epochs, micro-batches, step boundaries, rollback restarts, preemption stops) is in
``safeloop.run_loop``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader

from safeloop.batching import compute_loss
from safeloop.callbacks import Callback, CallbackList
from safeloop.checkpoint.lifecycle import build_manager, close_checkpoints, resume, save_checkpoint
from safeloop.checkpoint.trainer_state import RngSnapshot
from safeloop.config import TrainerConfig, build_config
from safeloop.diagnostics.session import Diagnostics, check_optimizer_before_prepare
from safeloop.distributed import agree_all_finite, settle_collectives
from safeloop.evaluation import run_evaluation
from safeloop.findings import add_finding, finish_report
from safeloop.guards.adaptive_clip import AdaptiveClip
from safeloop.guards.clipping import clip_and_measure
from safeloop.guards.divergence import DEFAULT_PATIENCE, DEFAULT_WARMUP, DEFAULT_ZSCORE, SpikeDetector
from safeloop.guards.nonfinite import SkipRecord, finite_flag, true_overflow
from safeloop.launch import build_accelerator
from safeloop.metrics import MetricBuffer
from safeloop.preemption import PreemptionWatch
from safeloop.preflight import run_preflight
from safeloop.progress import ProgressBar, planned_steps
from safeloop.reporting import report_interval, start_trackers
from safeloop.results import Event, Finding, FitResult
from safeloop.run_loop import run_epochs
from safeloop.skips import SkipMonitor, handle_skip
from safeloop.stepping import GatedStep
from safeloop.zero import check_deepspeed_clipping, zero_engine

__all__ = ["SafeTrainer"]


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
        callbacks (`Sequence[Callback]`, *optional*): observers of the loop.
        log_every (`int`, *optional*, defaults to 10): optimizer steps between metric logs.
        progress_bar (`bool`, *optional*, defaults to True): tqdm bar on the main process.
        log_with (`str | list`, *optional*): Accelerate trackers (``"tensorboard"``, ...) to start.
        project_dir (`str`, *optional*): where those trackers write.

    Raises:
        ConfigError: listing every invalid argument.

    Example:
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> trainer = SafeTrainer(model, optimizer, loader, loss_fn=loss_fn)  # doctest: +SKIP
        >>> result = trainer.fit()  # doctest: +SKIP
    """

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
        callbacks: Sequence[Callback] = (),
        log_every: int = 10,
        progress_bar: bool = True,
        log_with: str | Sequence[Any] | None = None,
        project_dir: str | None = None,
    ) -> None:
        self.config: TrainerConfig
        # every keyword argument, by name, exactly as given (validated together, all problems at once)
        arguments = {
            k: v for k, v in locals().items() if k not in ("self", "model", "optimizer", "train_dataloader")
        }
        self.config, callback_items = build_config(model, optimizer, train_dataloader, **arguments)
        self._callbacks = CallbackList(callback_items)
        self._loss_fn = loss_fn
        self._training_step = training_step
        self._owns_accelerator = accelerator is None
        if self.config.seed is not None:
            # before prepare: Accelerate seeds its shuffling generator from torch's global RNG there
            set_seed(self.config.seed)
        self.accelerator = build_accelerator(self.config, accelerator)
        # The scheduler is not prepared: Accelerate would step it once per process, and API.md
        # promises one step per optimizer step on any number of processes.
        self.lr_scheduler = lr_scheduler
        objects: list[Any] = [model, optimizer, train_dataloader]
        if eval_dataloader is not None:
            objects.append(eval_dataloader)
        early: list[Finding] = []
        if self.config.diagnostics and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed replaces the optimizer's param groups with flat partitions in `prepare`
            # (and fails there with a bare KeyError on a tensor that is not the model's)
            early = check_optimizer_before_prepare(model, optimizer)
        prepared = self.accelerator.prepare(*objects)
        self.model: torch.nn.Module = prepared[0]
        self.optimizer: torch.optim.Optimizer = prepared[1]
        self.train_dataloader = prepared[2]
        self.eval_dataloader = prepared[3] if eval_dataloader is not None else None
        self.global_step = 0
        self.epoch = 0
        self._findings: list[Finding] = []
        self._checkpoints, note = build_manager(self.config, self.accelerator)
        if note is not None:
            self._findings.append(note)
        self._spikes = SpikeDetector(
            self.config.spike_zscore, self.config.spike_patience, self.config.spike_warmup
        )
        self._rollbacks = 0
        self._lr_scale = 1.0
        self._divergences: list[dict[str, Any]] = []
        self.checkpoint_dir = None if self._checkpoints is None else self._checkpoints.directory
        self._epoch_rng: RngSnapshot | None = None
        self._preemption = PreemptionWatch()
        self._preempted = False
        self._batch_in_epoch = 0
        self._resume_position: int | None = None
        self._carry_skip = 0  # micro-batches a rollback still skips in the next epoch
        self._resume_rng: tuple[Any, Any] | None = None
        self._metrics = MetricBuffer(self.config.log_every)
        self._window_losses: list[torch.Tensor] = []
        self._history: list[dict[str, Any]] = []
        self._events: list[Event] = []
        self._eval_loss: float | None = None
        self._bar: ProgressBar | None = None
        self._step_lr: float = optimizer.param_groups[0]["lr"]
        self._step_epoch = 0
        self._preflight_done = False
        self._guarded = self.config.nan_guard != "off"
        self._stepper = GatedStep(self.optimizer, self.accelerator.scaler)
        # under DeepSpeed the engine's backward and step are called apart (see zero.py)
        self._zero = zero_engine(self.accelerator, self.model)
        if self._zero is not None:
            check_deepspeed_clipping(self.config, self._zero)
        unwrapped = self.accelerator.unwrap_model(self.model)
        self._diagnostics = Diagnostics(self) if self.config.diagnostics else None
        self._adaptive = (
            None if self.config.adaptive_clip is None else AdaptiveClip(self.config.adaptive_clip)
        )
        self._skips = SkipMonitor(
            max_consecutive_skips=self.config.max_consecutive_skips,
            param_names=[name for name, _ in unwrapped.named_parameters()],
            # a skip read on the host each step is replayed at once; a device-side one at the log step
            history_steps=self.config.log_every if self._stepper.device_side and self._zero is None else 1,
            accumulation=self.config.gradient_accumulation_steps,
        )
        for finding in early:  # the optimizer check made before `prepare` (DeepSpeed)
            self._add_finding(finding)

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
        if self.config.seed is not None:
            set_seed(self.config.seed)  # the training RNG stream starts from a known point
        self._preempted = False  # a fit after a preempted one goes on (the signal was handled)
        resume(self, resume_from)
        start_trackers(self)
        self.model.train()
        self._callbacks.call("on_fit_start", self)
        self._bar = ProgressBar(
            planned_steps(self.config, self.train_dataloader),
            enabled=self.config.progress_bar and self.accelerator.is_main_process,
            initial=self.global_step,
        )
        if self._diagnostics is not None:
            self._diagnostics.profile_eval()
        self._metrics.restart_clock()
        self._preemption = PreemptionWatch()
        try:
            run_epochs(self)  # epochs, rollback restarts, preemption stop
            if self._checkpoints is not None and self.global_step != self._checkpoints.last_saved_step:
                save_checkpoint(self)  # the final one, unless the last step already has one
            close_checkpoints(self)
            if self._diagnostics is not None:
                self._diagnostics.finish()
            result = FitResult(
                global_step=self.global_step,
                skipped_steps=self._skips.tracker.skipped,
                rollbacks=self._rollbacks,
                history=list(self._history),
                events=list(self._events),
                findings=list(self._findings),
                eval_loss=self._eval_loss,
            )
            finish_report(self, result)
            self._callbacks.call("on_fit_end", self, result)
            settle_collectives(self.accelerator)
        finally:
            self._bar.close()
            if self._checkpoints is not None:
                self._checkpoints.remove_temporary()
            if self._owns_accelerator and self.config.log_with:
                self.accelerator.end_training()
        return result

    # -- one step --------------------------------------------------------------------------

    def _loss_of(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return compute_loss(model, batch, loss_fn=self._loss_fn, training_step=self._training_step)

    def _backward(self, loss: torch.Tensor) -> None:
        if self._zero is not None:  # Accelerate's would also take DeepSpeed's step, unguarded
            self._zero.backward(loss, sync=self.accelerator.sync_gradients)
        else:
            self.accelerator.backward(loss)

    def _optimizer_step(self) -> None:
        if not self._preflight_done:
            self._preflight()
        losses = self._window_losses
        window_loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        self._window_losses = []
        flag: torch.Tensor | None
        if self._zero is not None:
            # DeepSpeed clips inside its step, with its own config; the global norm and the
            # finite flag come from one all-reduce
            norms, flag = self._zero.measure(window_loss if self._guarded else None)
        else:
            norms = clip_and_measure(
                self.accelerator,
                self.model.parameters(),
                max_norm=self.config.clip_grad_norm,
                max_value=self.config.clip_grad_value,
            )
            if self._adaptive is not None:  # after the measure: the logged norm is the one before clipping
                self._adaptive.apply(self.model.parameters(), norms.total)
            flag = (
                agree_all_finite(self.accelerator, finite_flag(window_loss, norms.total))
                if self._guarded
                else None
            )
        nonfinite = None if norms.per_param is None or flag is None else ~torch.isfinite(norms.per_param)
        if self.config.nan_guard == "raise":
            # host sync, once per optimizer step: "raise" must stop before any update; an fp16
            # scaler overflow is the scaler's business (it skips and lowers its scale), not an error
            overflow = true_overflow(self._stepper.overflow(), window_loss)
            ok = flag if overflow is None else torch.maximum(flag, overflow.to(flag))  # type: ignore[arg-type]
            if not bool(ok.item()):
                record = self._skips.record_now(self.global_step + 1, window_loss, norms.total, nonfinite)
                self._on_skip(record, raise_policy=True)
        self._callbacks.call("on_before_optimizer_step", self, self.optimizer)
        self._step_lr = self.optimizer.param_groups[0]["lr"]  # a Python float: no device read
        if self._diagnostics is None:
            applied = self._apply(flag)
        else:
            self._diagnostics.record(norms.per_param)
            with self._diagnostics.around_update((self.global_step + 1) % self.config.log_every == 0):
                applied = self._apply(flag)
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_step += 1
        self._step_epoch = self.epoch
        overflow = true_overflow(self._stepper.last_overflow, window_loss)
        if self._zero is not None and self._zero.overflowed:
            # DeepSpeed refused the step on its own (an fp16 overflow: its loss scaler's business)
            overflow = torch.ones((), device=window_loss.device)
        self._metrics.record(window_loss, norms.total, flag, nonfinite, overflow)
        if applied is True:
            self._skips.applied(self.global_step)
        elif applied is False:  # read on the host this step: report the skip now
            self._on_skip(self._skips.record_now(self.global_step, window_loss, norms.total, nonfinite))

    def _apply(self, flag: torch.Tensor | None) -> bool | None:
        if self._zero is not None:
            return self._zero.step(flag)
        return self._stepper.step(flag)

    def _preflight(self) -> None:
        run_preflight(self)

    def _on_skip(self, record: SkipRecord, *, raise_policy: bool = False) -> None:
        handle_skip(self, record, raise_policy=raise_policy)

    def _add_finding(self, finding: Finding) -> None:
        add_finding(self, finding)  # once per code and place; repeats are counted

    # -- reporting -------------------------------------------------------------------------

    def _log(self) -> None:
        report_interval(self)

    def _evaluate(self) -> None:
        run_evaluation(self)
