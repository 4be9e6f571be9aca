"""Keyword arguments of ``SafeTrainer`` turned into validated, frozen settings.

Every ``ConfigError`` about an argument is raised here, and all problems are reported at once:
a user fixing one argument should not discover the next one on the following run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from safeloop.callbacks import Callback
from safeloop.errors import ConfigError
from safeloop.guards.divergence import DEFAULT_PATIENCE, DEFAULT_WARMUP, DEFAULT_ZSCORE
from safeloop.guards.nonfinite import NAN_GUARD_CHOICES
from safeloop.guards.reinit import REINIT_CHOICES, REINIT_SCOPES
from safeloop.validation import (
    check_accelerator,
    check_callables,
    check_callbacks,
    check_count,
    check_objects,
    check_positive_float,
    check_scheduler,
    is_int,
    normalise_log_with,
    seen,
)

__all__ = ["TrainerConfig", "build_config", "MIXED_PRECISION_CHOICES"]

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Validated settings of one ``SafeTrainer``.

    Attributes:
        max_epochs (`int`): epochs to run when ``max_steps`` is None.
        max_steps (`int | None`): optimizer steps for the whole run; wins over ``max_epochs``.
        gradient_accumulation_steps (`int`): micro-batches per optimizer step.
        mixed_precision (`str | None`): ``"no"``, ``"fp16"``, ``"bf16"`` or None (Accelerate's
            default, which honours ``accelerate launch --mixed_precision``).
        seed (`int | None`): seeds Python, NumPy and torch on every process at the start of ``fit``.
        clip_grad_norm (`float | None`): max global gradient norm.
        clip_grad_value (`float | None`): clamp of every gradient element to ``±value``.
        adaptive_clip (`float | None`): z-score above which the global gradient norm is clipped
            against its running statistics (ZClip); None: off.
        nan_guard (`str`): ``"skip"``, ``"raise"`` or ``"off"``.
        max_consecutive_skips (`int`): more skipped steps in a row raise ``NonFiniteError``.
        reinit_zero_params (`str | None`): ``"xavier"``, ``"normal"`` or None (report only).
        reinit_std (`float`): standard deviation of ``"normal"`` re-initialisation.
        reinit_scope (`str`): ``"weights"`` (2-D and more) or ``"all"``.
        rollback (`bool`): on divergence, restore the newest healthy checkpoint and go on.
        max_rollbacks (`int`): rollbacks allowed; one more divergence raises ``DivergenceError``.
        rollback_lr_factor (`float`): learning rates are multiplied by it at each rollback.
        rollback_skip_batches (`int | None`): micro-batches skipped after a rollback; None: those
            between the checkpoint and the detection.
        spike_zscore (`float`): running standard deviations above the running mean that count
            as a loss spike.
        spike_patience (`int`): consecutive spiking steps that confirm a spike.
        spike_warmup (`int`): steps observed before a spike can be declared.
        checkpoint_dir (`str | None`): where checkpoints go.
        checkpoint_every (`int`): global steps between checkpoints.
        keep_checkpoints (`int`): newest checkpoints kept.
        async_checkpoint (`bool`): the main process writes checkpoints in a background thread.
        diagnostics (`bool`): run the checks of docs/diagnostics.md and report findings.
        log_every (`int`): optimizer steps between metric reads on the host.
        progress_bar (`bool`): show a tqdm bar on the main process.
        log_with (`tuple`): Accelerate trackers to start when safeloop builds the Accelerator.
        project_dir (`str | None`): where those trackers write.
    """

    max_epochs: int = 1
    max_steps: int | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None
    seed: int | None = None
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    adaptive_clip: float | None = None
    nan_guard: str = "skip"
    max_consecutive_skips: int = 5
    reinit_zero_params: str | None = "xavier"
    reinit_std: float = 0.02
    reinit_scope: str = "weights"
    rollback: bool = True
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    rollback_skip_batches: int | None = None
    spike_zscore: float = DEFAULT_ZSCORE
    spike_patience: int = DEFAULT_PATIENCE
    spike_warmup: int = DEFAULT_WARMUP
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoint: bool = False
    diagnostics: bool = True
    log_every: int = 10
    progress_bar: bool = True
    log_with: tuple[Any, ...] = ()
    project_dir: str | None = None


def build_config(
    model: object,
    optimizer: object,
    train_dataloader: object,
    *,
    loss_fn: Callable[..., Any] | None,
    training_step: Callable[..., Any] | None,
    eval_dataloader: object,
    lr_scheduler: object,
    accelerator: object,
    callbacks: object,
    max_epochs: object = 1,
    max_steps: object = None,
    gradient_accumulation_steps: object = None,
    mixed_precision: object = None,
    seed: object = None,
    clip_grad_norm: object = None,
    clip_grad_value: object = None,
    adaptive_clip: object = None,
    nan_guard: object = "skip",
    max_consecutive_skips: object = 5,
    reinit_zero_params: object = "xavier",
    reinit_std: object = 0.02,
    reinit_scope: object = "weights",
    rollback: object = True,
    max_rollbacks: object = 3,
    rollback_lr_factor: object = 0.5,
    rollback_skip_batches: object = None,
    spike_zscore: object = DEFAULT_ZSCORE,
    spike_patience: object = DEFAULT_PATIENCE,
    spike_warmup: object = DEFAULT_WARMUP,
    checkpoint_dir: object = None,
    checkpoint_every: object = 500,
    keep_checkpoints: object = 3,
    async_checkpoint: object = False,
    diagnostics: object = True,
    log_every: object = 10,
    progress_bar: object = True,
    log_with: object = None,
    project_dir: object = None,
) -> tuple[TrainerConfig, tuple[Callback, ...]]:
    """Validate every argument of ``SafeTrainer`` and return the frozen settings.

    Returns:
        `tuple[TrainerConfig, tuple[Callback, ...]]`: the settings and the callbacks.

    Raises:
        ConfigError: listing every problem found, each with the value seen and what is allowed.
    """
    problems: list[str] = []
    check_objects(problems, model, optimizer, train_dataloader, eval_dataloader)
    check_callables(problems, loss_fn, training_step)
    check_scheduler(problems, lr_scheduler, optimizer)
    check_count(problems, "max_epochs", max_epochs, optional=False)
    check_count(problems, "max_steps", max_steps, optional=True)
    check_count(problems, "gradient_accumulation_steps", gradient_accumulation_steps, optional=True)
    check_count(problems, "log_every", log_every, optional=False)
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION_CHOICES:
        problems.append(
            f"`mixed_precision` must be one of {', '.join(map(repr, MIXED_PRECISION_CHOICES))} "
            f"or None; got {seen(mixed_precision)}. For full precision pass 'no' (or None)."
        )
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2**32):  # type: ignore[operator]
        problems.append(f"`seed` must be an int in [0, 2**32) or None; got {seen(seed)}.")
    check_positive_float(problems, "clip_grad_norm", clip_grad_norm)
    check_positive_float(problems, "clip_grad_value", clip_grad_value)
    check_positive_float(problems, "adaptive_clip", adaptive_clip)
    if adaptive_clip is not None and (clip_grad_norm is not None or clip_grad_value is not None):
        problems.append(
            f"`adaptive_clip={adaptive_clip!r}` is set together with a fixed clip (`clip_grad_norm` or "
            "`clip_grad_value`); the adaptive bound replaces the fixed one. Choose one and leave the "
            "other None."
        )
    if clip_grad_norm is not None and clip_grad_value is not None:
        problems.append(
            f"`clip_grad_norm={clip_grad_norm!r}` and `clip_grad_value={clip_grad_value!r}` are both "
            "set; the global norm would then be measured on already clamped gradients. Choose one and "
            "leave the other None."
        )
    if nan_guard not in NAN_GUARD_CHOICES:
        problems.append(
            f"`nan_guard` must be one of {', '.join(map(repr, NAN_GUARD_CHOICES))}; got {seen(nan_guard)}."
        )
    if not is_int(max_consecutive_skips) or max_consecutive_skips < 0:  # type: ignore[operator]
        problems.append(
            f"`max_consecutive_skips` must be an int >= 0 (0: the first skip raises); got "
            f"{seen(max_consecutive_skips)}."
        )
    if reinit_zero_params not in REINIT_CHOICES:
        problems.append(
            f"`reinit_zero_params` must be 'xavier', 'normal' or None; got {seen(reinit_zero_params)}."
        )
    check_positive_float(problems, "reinit_std", reinit_std)
    if reinit_std is None:
        problems.append("`reinit_std` must be a finite number > 0; got None.")
    if reinit_scope not in REINIT_SCOPES:
        problems.append(
            f"`reinit_scope` must be one of {', '.join(map(repr, REINIT_SCOPES))}; got {seen(reinit_scope)}."
        )
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        problems.append(f"`checkpoint_dir` must be a path or None; got {seen(checkpoint_dir)}.")
    check_count(problems, "checkpoint_every", checkpoint_every, optional=False)
    check_count(problems, "keep_checkpoints", keep_checkpoints, optional=False)
    _check_rollback(problems, max_rollbacks, rollback_lr_factor, rollback_skip_batches, spike_warmup)
    check_positive_float(problems, "spike_zscore", spike_zscore, optional=False)
    check_count(problems, "spike_patience", spike_patience, optional=False)
    flags = (
        ("progress_bar", progress_bar),
        ("async_checkpoint", async_checkpoint),
        ("rollback", rollback),
        ("diagnostics", diagnostics),
    )
    for name, flag in flags:
        if not isinstance(flag, bool):
            problems.append(f"`{name}` must be True or False; got {seen(flag)}.")
    if project_dir is not None and not isinstance(project_dir, (str, os.PathLike)):
        problems.append(
            f"`project_dir` must be a path (str or os.PathLike) or None; got {seen(project_dir)}."
        )
    check_accelerator(problems, accelerator, gradient_accumulation_steps, mixed_precision, log_with)
    callback_items = check_callbacks(problems, callbacks)
    trackers = normalise_log_with(problems, log_with)
    if problems:
        raise ConfigError(_format_problems(problems))
    if accelerator is not None:
        gradient_accumulation_steps = accelerator.gradient_accumulation_steps  # type: ignore[union-attr]
    config = TrainerConfig(
        max_epochs=max_epochs,  # type: ignore[arg-type]
        max_steps=max_steps,  # type: ignore[arg-type]
        gradient_accumulation_steps=gradient_accumulation_steps or 1,  # type: ignore[arg-type]
        mixed_precision=mixed_precision,  # type: ignore[arg-type]
        seed=seed,  # type: ignore[arg-type]
        clip_grad_norm=None if clip_grad_norm is None else float(clip_grad_norm),  # type: ignore[arg-type]
        clip_grad_value=None if clip_grad_value is None else float(clip_grad_value),  # type: ignore[arg-type]
        adaptive_clip=None if adaptive_clip is None else float(adaptive_clip),  # type: ignore[arg-type]
        nan_guard=nan_guard,  # type: ignore[arg-type]
        max_consecutive_skips=max_consecutive_skips,  # type: ignore[arg-type]
        reinit_zero_params=reinit_zero_params,  # type: ignore[arg-type]
        reinit_std=float(reinit_std),  # type: ignore[arg-type]
        reinit_scope=reinit_scope,  # type: ignore[arg-type]
        rollback=rollback,  # type: ignore[arg-type]
        max_rollbacks=max_rollbacks,  # type: ignore[arg-type]
        rollback_lr_factor=float(rollback_lr_factor),  # type: ignore[arg-type]
        rollback_skip_batches=rollback_skip_batches,  # type: ignore[arg-type]
        spike_zscore=float(spike_zscore),  # type: ignore[arg-type]
        spike_patience=spike_patience,  # type: ignore[arg-type]
        spike_warmup=spike_warmup,  # type: ignore[arg-type]
        checkpoint_dir=None if checkpoint_dir is None else os.fspath(checkpoint_dir),  # type: ignore[arg-type]
        checkpoint_every=checkpoint_every,  # type: ignore[arg-type]
        keep_checkpoints=keep_checkpoints,  # type: ignore[arg-type]
        async_checkpoint=async_checkpoint,  # type: ignore[arg-type]
        diagnostics=diagnostics,  # type: ignore[arg-type]
        log_every=log_every,  # type: ignore[arg-type]
        progress_bar=progress_bar,  # type: ignore[arg-type]
        log_with=trackers,
        project_dir=None if project_dir is None else str(project_dir),
    )
    return config, callback_items


def _check_rollback(
    problems: list[str], max_rollbacks: object, factor: object, skip_batches: object, warmup: object
) -> None:
    for name, value in (("max_rollbacks", max_rollbacks), ("spike_warmup", warmup)):
        if not is_int(value) or value < 0:  # type: ignore[operator]
            problems.append(f"`{name}` must be an int >= 0; got {seen(value)}.")
    if skip_batches is not None and (not is_int(skip_batches) or skip_batches < 0):  # type: ignore[operator]
        problems.append(
            f"`rollback_skip_batches` must be an int >= 0 or None (the batches between the checkpoint "
            f"and the detection); got {seen(skip_batches)}."
        )
    number = isinstance(factor, (int, float)) and not isinstance(factor, bool)
    if not number or not 0 < factor <= 1:  # type: ignore[operator]
        problems.append(
            "`rollback_lr_factor` must be a number in (0, 1] (1 keeps the learning rate); got "
            f"{seen(factor)}."
        )


def _format_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"SafeTrainer got an invalid argument: {problems[0]}"
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"SafeTrainer got {len(problems)} invalid arguments:\n{lines}"
