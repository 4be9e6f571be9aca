"""``SafeLoopCallback``: safeloop's guards and diagnostics for a ``lightning.pytorch.Trainer``.

The callback maps Lightning's hooks onto the components of a :class:`FitSession`; each hook's
work is one call. Where each hook fires (Lightning 2.x, automatic optimization)::

    on_fit_start                    check the set-up, build the session
    on_train_start                  the optimizer's step is gated (after a checkpoint restore); with
                                    rollback, the checkpoint before the first step
    on_train_epoch_start            the epoch the steps count in
    per micro-batch:
        on_train_batch_start        first batch: inputs, trainable params, optimizer; watch on;
                                    the micro-batch's size (gradient noise scale)
        training_step               (the user's forward and loss)
        on_before_zero_grad         first micro-batch of a window; first batch: double backward
        on_before_backward(loss)    first batch: the loss checked (raise before torch would);
                                    every micro-batch: the loss joins the window
        backward
        on_after_backward           first batch: parameters without gradient; with
                                    accumulation, the window's first gradient (noise scale)
    once per window, inside optimizer.step (after accumulation and the fp16 unscale):
        on_before_optimizer_step    first step: all-zero weights; gradient norms, clipping,
                                    the agreed finite flag, the noise scale's pair, the decision
        (Lightning's clipping, then the update: applied, or refused by the gate)
        on_train_batch_end          the step boundary: counted, learnt, logged every log_every,
                                    a checkpoint when due; a rollback in place on a divergence
    on_train_end                    the last log step (a divergence there still rolls back), the
                                    end-of-fit checks
    on_fit_end                      the report (INFO) and the summary (printed)

Manual optimization: ``manual_backward`` fires ``on_before_backward``/``on_after_backward`` and
``opt.step()`` fires ``on_before_optimizer_step`` inside the gated step, so the same calls
happen in the same order; ``on_before_zero_grad`` never fires. Gradients at
``on_before_optimizer_step`` with no loss through ``on_before_backward`` mean ``loss.backward()``
was called directly (``direct-backward``).
"""

from __future__ import annotations

import os
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback

from safeloop.config import TrainerConfig
from safeloop.guards.divergence import DEFAULT_PATIENCE, DEFAULT_WARMUP, DEFAULT_ZSCORE
from safeloop.lightning.compat import check_lightning_version, check_trainer_setup
from safeloop.lightning.session import FitSession
from safeloop.lightning.settings import callback_config, refuse_unknown_keywords
from safeloop.results import Event, Finding, FitResult, report

__all__ = ["SafeLoopCallback"]

_STATE_KEYS = ("preflight_done", "consecutive_skips", "rollbacks", "lr_scale")
_NO_LOSS = (
    "no loss of the first batch reached Lightning's backward (`training_step` returned None, or "
    "`loss.backward()` was called instead of `self.manual_backward(loss)`)"
)


class SafeLoopCallback(Callback):
    """safeloop's NaN/Inf guard, rollback, zero-weight re-initialisation and diagnostics for Lightning.

    The keywords are ``SafeTrainer``'s, with its defaults and its checks. A non-finite step
    changes nothing (parameters and optimizer state bitwise unchanged), on every process. On a
    divergence (a confirmed loss spike, or more than ``max_consecutive_skips`` skips in a row) the
    newest healthy checkpoint is restored in place at the batch's end, the learning rates are
    lowered and the fit goes on with its next batch (docs/lightning.md says what is and is not
    restored); past ``max_rollbacks``, ``DivergenceError``. After ``trainer.fit`` the
    callback holds what a ``FitResult`` holds: ``findings``, ``events``, ``result`` and
    :meth:`report`. Findings are logged on the ``safeloop`` Python logger and to the ``Trainer``'s
    loggers (``safeloop/findings/<code>``), with the step metrics (``safeloop/train/...``).

    Args:
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
        rollback (`bool`, *optional*, defaults to True): on a divergence, restore the newest
            healthy checkpoint in place (parameters, buffers, optimizer, LR scheduler, fp16
            scaler), lower the learning rates and go on with the next batch; without rollback a
            spike is only reported and a run of skips raises ``NonFiniteError``.
        max_rollbacks (`int`, *optional*, defaults to 3): one more divergence raises
            ``DivergenceError`` (the causes ranked).
        rollback_lr_factor (`float`, *optional*, defaults to 0.5): learning rates are multiplied
            by it at each rollback (the schedule keeps the scale).
        clip_grad_norm (`float`, *optional*): max global gradient norm, applied in
            ``on_before_optimizer_step`` with the norm the guard measured (not together with the
            ``Trainer``'s ``gradient_clip_val``); works under manual optimization too.
        clip_grad_value (`float`, *optional*): clamp every gradient element to ``±value``.
        adaptive_clip (`float`, *optional*): clip the global gradient norm when its z-score
            against its running mean and deviation exceeds this (ZClip).
        spike_zscore (`float`, *optional*, defaults to 6.0): running standard deviations above
            the running mean of the loss that count as a spike (a ``loss-spike`` finding).
        spike_patience (`int`, *optional*, defaults to 3): spiking steps in a row that confirm it.
        spike_warmup (`int`, *optional*, defaults to 20): steps observed before any spike.
        checkpoint_dir (`str`, *optional*): where the rollback's checkpoints go (safetensors,
            ``step-00000500/`` folders, kept after the fit); None: a temporary folder removed at
            the end of the fit. Only with ``rollback=True``.
        checkpoint_every (`int`, *optional*, defaults to 500): optimizer steps between checkpoints.
        keep_checkpoints (`int`, *optional*, defaults to 3): newest checkpoints kept (the newest
            healthy one is never deleted).
        diagnostics (`bool`, *optional*, defaults to True): run the checks of
            ``docs/diagnostics.md`` that apply under Lightning (docs/lightning.md lists them).
        gradient_noise_scale (`str`, *optional*, defaults to ``"auto"``): measure the gradient
            noise scale and give the ``batch-size`` advice where the fit has two batch sizes
            (``accumulate_grad_batches`` > 1, or several DDP processes), or ``"off"``
            (``"split"`` is refused: the forward is ``training_step``'s). With ``diagnostics``.
        log_every (`int`, *optional*, defaults to 10): optimizer steps between metric reads.
        summary (`bool`, *optional*, defaults to True): print a short summary at the end of the
            fit on the main process.

    Raises:
        ConfigError: listing every invalid value.
        TypeError: for a keyword not in this list, saying where a ``SafeTrainer`` keyword goes
            in Lightning.
        ImportError: the installed Lightning is outside ``>=2.4,<3``.

    Example:
        >>> from safeloop.lightning import SafeLoopCallback
        >>> callback = SafeLoopCallback(clip_grad_norm=1.0)
        >>> trainer = lightning.pytorch.Trainer(max_epochs=3, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.fit(model, train_loader)  # doctest: +SKIP
        >>> print(callback.report())  # doctest: +SKIP
    """

    @refuse_unknown_keywords
    def __init__(
        self,
        *,
        nan_guard: str = "skip",
        max_consecutive_skips: int = 5,
        reinit_zero_params: str | None = "xavier",
        reinit_std: float = 0.02,
        reinit_scope: str = "weights",
        rollback: bool = True,
        max_rollbacks: int = 3,
        rollback_lr_factor: float = 0.5,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        adaptive_clip: float | None = None,
        spike_zscore: float = DEFAULT_ZSCORE,
        spike_patience: int = DEFAULT_PATIENCE,
        spike_warmup: int = DEFAULT_WARMUP,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 500,
        keep_checkpoints: int = 3,
        diagnostics: bool = True,
        gradient_noise_scale: str = "auto",
        log_every: int = 10,
        summary: bool = True,
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_lightning_version(lightning.__version__, os.path.dirname(lightning.__file__ or ""))
        self.config: TrainerConfig = callback_config(arguments)
        self._session: FitSession | None = None
        self._restored: dict[str, Any] = {}

    # -- what a script reads after trainer.fit ------------------------------------------------

    @property
    def findings(self) -> list[Finding]:
        """The findings of the last fit (or of the one running), deduplicated, in the order found."""
        return [] if self._session is None else list(self._session.reporter.findings)

    @property
    def events(self) -> list[Event]:
        """What the guards did in the last fit, in order (``"skip"``, ``"rollback"``, ...)."""
        return [] if self._session is None else list(self._session.record.events)

    @property
    def result(self) -> FitResult | None:
        """The last fit as a ``FitResult`` (steps, skips, history, events, findings).

        None before a fit, and after one that raised (as ``SafeTrainer.fit`` returns none then:
        ``findings``, ``events`` and :meth:`report` still say what happened).
        """
        session = self._session
        if session is None or session.error is not None:
            return None
        return session.result if session.result is not None else session.build_result()

    def report(self) -> str:
        """A short readable summary: steps, skips, then each finding with its fix, errors first.

        After a fit that raised it opens with the error (``safeloop: stopped by NonFiniteError, ...``).
        """
        if self._session is None:
            return report([], steps=0, skipped=0, rollbacks=0)
        return self._session.report()

    # -- Lightning's hooks -------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the set-up and build this fit's components."""
        self._session = None  # a new record per fit; an error below leaves none half-built
        optimizers = list(trainer.optimizers)
        check_trainer_setup(trainer, self.config, optimizers)
        self._session = FitSession(self.config, trainer, pl_module, optimizers[0])
        restored, self._restored = self._restored, {}  # for this fit only: a next fit starts afresh
        self._apply(restored)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gate the optimizer's step, once Lightning has restored any checkpoint."""
        self._live().start()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The epoch the coming steps count in (read once an epoch, not at every batch)."""
        self._live().progress.epoch = int(trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """First batch: the checks before the forward, and the watch on it; the batch's size."""
        session = self._live()
        if session.first is not None and not session.first.done:
            session.first.start(batch)
        session.steps.see_batch(batch)

    def on_before_zero_grad(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Automatic optimization, first batch: did ``training_step`` call ``backward()`` itself?"""
        first = self._live().first
        if first is not None and first.watching:
            first.before_zero_grad()

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        """The loss before backward: checked on the first batch, kept for the step's flag."""
        session = self._live()
        if session.first is not None and session.first.watching:
            session.first.at_loss(loss)
        session.steps.see_loss(loss)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """First backward: trainable parameters that got no gradient; a window's first gradient."""
        session = self._live()
        if session.first is not None:
            session.first.after_backward()
        session.steps.after_backward()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Measure, check and decide the step (the gate applies the decision)."""
        session = self._live()
        if session.first is not None and session.first.watching:
            session.first.close(_NO_LOSS)
        session.before_step()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """The step boundary, when this micro-batch ended a step; a rollback in place on a divergence."""
        session = self._live()
        if session.first is not None and session.first.watching:
            session.first.close(_NO_LOSS)
        session.batch_end()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last log step and the end-of-fit checks (every process, before teardown)."""
        self._live().end_training()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The end-of-fit report (INFO) and summary (printed) on the main process."""
        self._live().finish(self.config.summary)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Leave nothing patched or watching; the findings so far stay readable."""
        if self._session is not None:
            self._session.abandon(exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The optimizer's own step and the plugin's clipping are back (already after ``on_train_end``)."""
        if self._session is not None:
            self._session.gate.uninstall()
            self._session.checks.uninstall()

    # -- Lightning's checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain values for Lightning's checkpoint: first-step checks done, skips in a row, rollbacks.

        The rollbacks made and their learning-rate scale go on in a resumed fit, as ``SafeTrainer``
        keeps them across a resume: ``max_rollbacks`` is a budget for the whole run.
        """
        session = self._session
        if session is None:
            return dict(self._restored)
        record = session.record
        return {
            **session.steps.state_dict(),
            **session.skips.tracker.state_dict(),
            "rollbacks": record.rollbacks,
            "lr_scale": record.lr_scale,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take :meth:`state_dict` back (Lightning calls it before ``on_fit_start`` when resuming)."""
        self._restored = {key: state_dict[key] for key in _STATE_KEYS if key in state_dict}
        if self._session is not None:  # restored after on_fit_start (a strategy that restores late)
            restored, self._restored = self._restored, {}
            self._apply(restored)

    def _apply(self, state: dict[str, Any]) -> None:
        session = self._live()
        if "preflight_done" in state:
            session.steps.load_state_dict(state)
        if "consecutive_skips" in state:
            session.skips.tracker.load_state_dict(state)
        if "rollbacks" in state:
            session.record.rollbacks = int(state["rollbacks"])
            session.record.lr_scale = float(state.get("lr_scale", 1.0))

    def _live(self) -> FitSession:
        assert self._session is not None  # invariant: every training hook comes after on_fit_start
        return self._session
