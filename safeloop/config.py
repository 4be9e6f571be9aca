"""Keyword arguments of ``SafeTrainer`` turned into validated, frozen settings.

Every ``ConfigError`` about an argument is raised here, and all problems are reported at once:
a user fixing one argument should not discover the next one on the following run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from safeloop.diagnostics.noise_scale import NOISE_SCALE_CHOICES
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
    check_prepared_optimizer,
    check_scheduler,
    is_int,
    normalise_log_with,
    seen,
    sparse_gradient_problem,
)

__all__ = [
    "TrainerConfig",
    "build_config",
    "check_settings",
    "normalised_settings",
    "format_problems",
    "config_fields",
    "OBJECT_ARGUMENTS",
    "MIXED_PRECISION_CHOICES",
]

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")

logger = logging.getLogger("safeloop")


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
        gradient_noise_scale (`str`): ``"auto"`` (measured where accumulation or several
            processes give two batch sizes for free), ``"split"`` (also on one process without
            accumulation, each batch run as two halves) or ``"off"``.
        log_every (`int`): optimizer steps between metric reads on the host.
        progress_bar (`bool`): show a tqdm bar on the main process.
        summary (`bool`): print the end-of-fit summary on the main process.
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
    gradient_noise_scale: str = "auto"
    log_every: int = 10
    progress_bar: bool = True
    summary: bool = True
    log_with: tuple[Any, ...] = ()
    project_dir: str | None = None


# keyword arguments of ``SafeTrainer`` that are objects of the run, not settings
OBJECT_ARGUMENTS = ("loss_fn", "training_step", "eval_dataloader", "lr_scheduler", "accelerator", "callbacks")


def config_fields() -> tuple[str, ...]:
    """The names of the settings, in declaration order (the keyword arguments that are not objects)."""
    return tuple(f.name for f in fields(TrainerConfig))


def build_config(
    model: object,
    optimizer: object,
    train_dataloader: object,
    arguments: Mapping[str, Any],
    *,
    callback_base: type,
) -> tuple[TrainerConfig, tuple[Any, ...]]:
    """Validate every argument of ``SafeTrainer`` and return the frozen settings.

    Args:
        model (`object`): ``SafeTrainer``'s ``model``.
        optimizer (`object`): its ``optimizer``.
        train_dataloader (`object`): its ``train_dataloader``.
        arguments (`Mapping[str, Any]`): every keyword argument of ``SafeTrainer``, by name, as
            given (the settings of :class:`TrainerConfig` and ``OBJECT_ARGUMENTS``).
        callback_base (`type`): ``safeloop.Callback``, that every callback must be an instance of.

    Returns:
        `tuple[TrainerConfig, tuple[Callback, ...]]`: the settings and the callbacks.

    Raises:
        ConfigError: listing every problem found, each with the value seen and what is allowed.
    """
    expected = {*config_fields(), *OBJECT_ARGUMENTS}
    if set(arguments) != expected:  # a wiring mistake, not a user's: the names are spelled once
        raise TypeError(
            f"build_config got {sorted(set(arguments) ^ expected)} beyond or short of "
            "SafeTrainer's keyword arguments"
        )
    a = dict(arguments)
    problems: list[str] = []
    check_objects(problems, model, optimizer, train_dataloader, a["eval_dataloader"])
    sparse = sparse_gradient_problem(model, ", or train this model without SafeTrainer")
    if sparse is not None:
        problems.append(sparse)
    check_callables(problems, a["loss_fn"], a["training_step"])
    check_scheduler(problems, a["lr_scheduler"], optimizer)
    check_settings(problems, a)
    accelerator = a["accelerator"]
    check_accelerator(
        problems, accelerator, a["gradient_accumulation_steps"], a["mixed_precision"], a["log_with"]
    )
    check_prepared_optimizer(problems, optimizer, accelerator, a["gradient_accumulation_steps"])
    callback_items = check_callbacks(problems, a["callbacks"], callback_base)
    trackers = normalise_log_with(problems, a["log_with"])
    if problems:
        raise ConfigError(format_problems(problems))
    settings = normalised_settings(a)
    if accelerator is not None:
        settings["gradient_accumulation_steps"] = accelerator.gradient_accumulation_steps
        inherited = a["gradient_accumulation_steps"] is None and accelerator.gradient_accumulation_steps != 1
        if inherited and accelerator.is_main_process:
            logger.info(
                "safeloop: your Accelerator's gradient_accumulation_steps=%d is used "
                "(SafeTrainer's `gradient_accumulation_steps` was left unset)",
                accelerator.gradient_accumulation_steps,
            )
    settings["gradient_accumulation_steps"] = settings["gradient_accumulation_steps"] or 1
    settings["log_with"] = trackers
    return TrainerConfig(**settings), callback_items


def check_settings(problems: list[str], a: Mapping[str, Any]) -> None:
    """Append a problem for every invalid setting of :class:`TrainerConfig` in ``a``.

    The checks shared by ``SafeTrainer`` and ``safeloop.lightning.SafeLoopCallback``, so that a
    bad value reads the same under both.

    Args:
        problems (`list[str]`): where the problems go, in the order of the settings.
        a (`Mapping[str, Any]`): a value for every setting (``config_fields()``), as given.
    """
    check_count(problems, "max_epochs", a["max_epochs"], optional=False)
    check_count(problems, "max_steps", a["max_steps"], optional=True)
    check_count(problems, "gradient_accumulation_steps", a["gradient_accumulation_steps"], optional=True)
    check_count(problems, "log_every", a["log_every"], optional=False)
    mixed_precision = a["mixed_precision"]
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION_CHOICES:
        problems.append(
            f"`mixed_precision` must be one of {', '.join(map(repr, MIXED_PRECISION_CHOICES))} "
            f"or None; got {seen(mixed_precision)}. For full precision pass 'no' (or None)."
        )
    seed = a["seed"]
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2**32):
        problems.append(f"`seed` must be an int in [0, 2**32) or None; got {seen(seed)}.")
    _check_clipping(problems, a["clip_grad_norm"], a["clip_grad_value"], a["adaptive_clip"])
    if a["nan_guard"] not in NAN_GUARD_CHOICES:
        problems.append(
            f"`nan_guard` must be one of {', '.join(map(repr, NAN_GUARD_CHOICES))}; "
            f"got {seen(a['nan_guard'])}."
        )
    if a["gradient_noise_scale"] not in NOISE_SCALE_CHOICES:
        problems.append(
            f"`gradient_noise_scale` must be one of {', '.join(map(repr, NOISE_SCALE_CHOICES))}; "
            f"got {seen(a['gradient_noise_scale'])}."
        )
    skips = a["max_consecutive_skips"]
    if not is_int(skips) or skips < 0:
        problems.append(
            f"`max_consecutive_skips` must be an int >= 0 (0: the first skip raises); got {seen(skips)}."
        )
    if a["reinit_zero_params"] not in REINIT_CHOICES:
        problems.append(
            f"`reinit_zero_params` must be 'xavier', 'normal' or None; got {seen(a['reinit_zero_params'])}."
        )
    check_positive_float(problems, "reinit_std", a["reinit_std"])
    if a["reinit_std"] is None:
        problems.append("`reinit_std` must be a finite number > 0; got None.")
    if a["reinit_scope"] not in REINIT_SCOPES:
        problems.append(
            f"`reinit_scope` must be one of {', '.join(map(repr, REINIT_SCOPES))}; "
            f"got {seen(a['reinit_scope'])}."
        )
    checkpoint_dir = a["checkpoint_dir"]
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        problems.append(f"`checkpoint_dir` must be a path or None; got {seen(checkpoint_dir)}.")
    check_count(problems, "checkpoint_every", a["checkpoint_every"], optional=False)
    check_count(problems, "keep_checkpoints", a["keep_checkpoints"], optional=False)
    _check_rollback(
        problems, a["max_rollbacks"], a["rollback_lr_factor"], a["rollback_skip_batches"], a["spike_warmup"]
    )
    check_positive_float(problems, "spike_zscore", a["spike_zscore"], optional=False)
    check_count(problems, "spike_patience", a["spike_patience"], optional=False)
    for name in ("progress_bar", "summary", "async_checkpoint", "rollback", "diagnostics"):
        if not isinstance(a[name], bool):
            problems.append(f"`{name}` must be True or False; got {seen(a[name])}.")
    project_dir = a["project_dir"]
    if project_dir is not None and not isinstance(project_dir, (str, os.PathLike)):
        problems.append(
            f"`project_dir` must be a path (str or os.PathLike) or None; got {seen(project_dir)}."
        )


def normalised_settings(a: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``a`` (already checked) as :class:`TrainerConfig` holds them.

    Numbers become floats and paths strings; the accelerator-dependent ones (accumulation,
    trackers) are left as given, for the caller to resolve.
    """
    settings = {name: a[name] for name in config_fields()}
    for name in ("clip_grad_norm", "clip_grad_value", "adaptive_clip"):
        settings[name] = None if a[name] is None else float(a[name])
    for name in ("reinit_std", "rollback_lr_factor", "spike_zscore"):
        settings[name] = float(a[name])
    checkpoint_dir, project_dir = a["checkpoint_dir"], a["project_dir"]
    settings["checkpoint_dir"] = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
    settings["project_dir"] = None if project_dir is None else str(project_dir)
    return settings


def _check_clipping(problems: list[str], clip_norm: object, clip_value: object, adaptive: object) -> None:
    check_positive_float(problems, "clip_grad_norm", clip_norm)
    check_positive_float(problems, "clip_grad_value", clip_value)
    check_positive_float(problems, "adaptive_clip", adaptive)
    if adaptive is not None and (clip_norm is not None or clip_value is not None):
        problems.append(
            f"`adaptive_clip={adaptive!r}` is set together with a fixed clip (`clip_grad_norm` or "
            "`clip_grad_value`); the adaptive bound replaces the fixed one. Choose one and leave the "
            "other None."
        )
    if clip_norm is not None and clip_value is not None:
        problems.append(
            f"`clip_grad_norm={clip_norm!r}` and `clip_grad_value={clip_value!r}` are both "
            "set; the global norm would then be measured on already clamped gradients. Choose one and "
            "leave the other None."
        )


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


def format_problems(problems: list[str], owner: str = "SafeTrainer") -> str:
    """One message listing every problem found in the arguments of ``owner``."""
    if len(problems) == 1:
        return f"{owner} got an invalid argument: {problems[0]}"
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"{owner} got {len(problems)} invalid arguments:\n{lines}"
