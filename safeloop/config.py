"""Keyword arguments of ``SafeTrainer`` turned into validated, frozen settings.

Every ``ConfigError`` about an argument is raised here, and all problems are reported at once:
a user fixing one argument should not discover the next one on the following run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from safeloop.callbacks import Callback
from safeloop.errors import ConfigError
from safeloop.guards.nonfinite import NAN_GUARD_CHOICES
from safeloop.guards.reinit import REINIT_CHOICES, REINIT_SCOPES

__all__ = ["TrainerConfig", "build_config", "MIXED_PRECISION_CHOICES"]

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
_MAX_LISTED = 10
_MAX_REPR = 80


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
        nan_guard (`str`): ``"skip"``, ``"raise"`` or ``"off"``.
        max_consecutive_skips (`int`): more skipped steps in a row raise ``NonFiniteError``.
        reinit_zero_params (`str | None`): ``"xavier"``, ``"normal"`` or None (report only).
        reinit_std (`float`): standard deviation of ``"normal"`` re-initialisation.
        reinit_scope (`str`): ``"weights"`` (2-D and more) or ``"all"``.
        checkpoint_dir (`str | None`): where checkpoints go.
        checkpoint_every (`int`): global steps between checkpoints.
        keep_checkpoints (`int`): newest checkpoints kept.
        async_checkpoint (`bool`): the main process writes checkpoints in a background thread.
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
    nan_guard: str = "skip"
    max_consecutive_skips: int = 5
    reinit_zero_params: str | None = "xavier"
    reinit_std: float = 0.02
    reinit_scope: str = "weights"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoint: bool = False
    log_every: int = 10
    progress_bar: bool = True
    log_with: tuple[Any, ...] = ()
    project_dir: str | None = None


def _seen(value: object) -> str:
    """Return ``repr(value)`` on one line, shortened, followed by its type name."""
    try:
        text = " ".join(repr(value).split())
    except Exception:  # a broken __repr__ must not hide the real problem
        text = f"<{type(value).__name__} object>"
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _is_int(value: object) -> bool:
    # bool is an int subclass; `max_epochs=True` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(problems: list[str], name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        allowed = "an int >= 1" + (" or None" if optional else "")
        problems.append(f"`{name}` must be {allowed}; got {_seen(value)}.")


def _check_positive_float(problems: list[str], name: str, value: object) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        problems.append(f"`{name}` must be a finite number > 0 or None; got {_seen(value)}.")


def _check_objects(
    problems: list[str],
    model: object,
    optimizer: object,
    train_dataloader: object,
    eval_dataloader: object,
) -> None:
    if not isinstance(model, torch.nn.Module):
        problems.append(
            f"`model` must be a torch.nn.Module; got {_seen(model)}. "
            "Pass the module itself, not its parameters or state_dict."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        problems.append(
            f"`optimizer` must be a torch.optim.Optimizer; got {_seen(optimizer)}. "
            "Build it over the parameters, e.g. `torch.optim.AdamW(model.parameters(), lr=1e-3)`."
        )
    for name, loader, optional in (
        ("train_dataloader", train_dataloader, False),
        ("eval_dataloader", eval_dataloader, True),
    ):
        if loader is None and optional:
            continue
        if not isinstance(loader, DataLoader):
            problems.append(
                f"`{name}` must be a torch.utils.data.DataLoader; got {_seen(loader)}. "
                "Wrap the dataset: `DataLoader(dataset, batch_size=...)`."
            )
            continue
        try:
            length = len(loader)
        except TypeError:  # an IterableDataset without __len__: its length is unknown, not zero
            continue
        if length == 0:
            problems.append(
                f"`{name}` must yield at least one batch; got a DataLoader of len 0 (dataset of "
                f"{_dataset_len(loader)} samples, batch_size={loader.batch_size}, "
                f"drop_last={loader.drop_last}). "
                "Give it samples, or lower `batch_size` / set `drop_last=False`."
            )


def _dataset_len(loader: DataLoader) -> str:
    try:
        return str(len(loader.dataset))  # type: ignore[arg-type]
    except TypeError:
        return "unknown"


def _check_callables(problems: list[str], loss_fn: object, training_step: object) -> None:
    for name, fn in (("loss_fn", loss_fn), ("training_step", training_step)):
        if isinstance(fn, type) and issubclass(fn, torch.nn.Module):
            # callable, but calling it builds a module instead of computing a loss
            problems.append(
                f"`{name}` must be a function or a module instance; got the class {fn.__name__}. "
                f"Pass an instance: `{name}={fn.__name__}()`."
            )
        elif fn is not None and not callable(fn):
            problems.append(
                f"`{name}` must be callable or None; got {_seen(fn)}. Pass the function itself, "
                "not the result of calling it."
            )


def _check_scheduler(problems: list[str], lr_scheduler: object, optimizer: object) -> None:
    if lr_scheduler is None:
        return
    if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        problems.append(
            "`lr_scheduler` must be an LRScheduler that steps without a metric, or None; got "
            f"{_seen(lr_scheduler)}. A ReduceLROnPlateau needs a metric at every step; safeloop "
            "steps the scheduler once per optimizer step without one. Step it yourself in a "
            "`Callback.on_validation_end(trainer, eval_loss)`, and leave `lr_scheduler=None`."
        )
        return
    if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
        problems.append(
            "`lr_scheduler` must be a torch.optim.lr_scheduler.LRScheduler or None; got "
            f"{_seen(lr_scheduler)}. Build one on the optimizer, e.g. "
            "`torch.optim.lr_scheduler.LinearLR(optimizer)`."
        )
        return
    if isinstance(optimizer, torch.optim.Optimizer) and lr_scheduler.optimizer is not optimizer:
        theirs = lr_scheduler.optimizer
        problems.append(
            "`lr_scheduler` was built on another optimizer than `optimizer`: its optimizer is "
            f"{type(theirs).__name__} at {id(theirs):#x}, `optimizer` is {type(optimizer).__name__} "
            f"at {id(optimizer):#x}; its learning rates would never reach the parameters. Build it "
            "from the optimizer given to SafeTrainer."
        )


def _check_accelerator(
    problems: list[str],
    accelerator: object,
    gradient_accumulation_steps: object,
    mixed_precision: object,
    log_with: object,
) -> None:
    if accelerator is None:
        return
    if not isinstance(accelerator, Accelerator):
        problems.append(
            f"`accelerator` must be an accelerate.Accelerator or None; got {_seen(accelerator)}. "
            "Pass `accelerator=Accelerator(...)` or leave it None to let safeloop build one."
        )
        return
    own = accelerator.gradient_accumulation_steps
    if gradient_accumulation_steps is not None and gradient_accumulation_steps != own:
        problems.append(
            f"`gradient_accumulation_steps={gradient_accumulation_steps!r}` disagrees with the "
            f"given accelerator's {own}. Set it on one of them only: "
            "`Accelerator(gradient_accumulation_steps=...)` or leave `accelerator=None`."
        )
    if mixed_precision is not None and mixed_precision != accelerator.mixed_precision:
        problems.append(
            f"`mixed_precision={mixed_precision!r}` disagrees with the given accelerator's "
            f"{accelerator.mixed_precision!r}. Set it on one of them only: "
            "`Accelerator(mixed_precision=...)` or leave `accelerator=None`."
        )
    if log_with:
        problems.append(
            f"`log_with={log_with!r}` only applies when safeloop builds the Accelerator; with `accelerator=` "
            "pass `Accelerator(log_with=...)` and call `accelerator.init_trackers(...)` yourself."
        )


def _check_callbacks(problems: list[str], callbacks: object) -> tuple[Callback, ...]:
    if isinstance(callbacks, Callback):
        return (callbacks,)
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
        problems.append(
            f"`callbacks` must be a list of safeloop.Callback instances; got {_seen(callbacks)}. "
            "Pass e.g. `callbacks=[MyCallback()]`."
        )
        return ()
    items = tuple(callbacks)
    bad = [_bad_callback(i, item) for i, item in enumerate(items) if not isinstance(item, Callback)]
    if bad:
        listed = ", ".join(bad[:_MAX_LISTED])
        more = f" ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        problems.append(
            f"`callbacks` must hold safeloop.Callback instances; these are not: {listed}{more}. "
            "Subclass `safeloop.Callback` and pass an instance (not the class)."
        )
    return items


def _bad_callback(index: int, item: object) -> str:
    if isinstance(item, type) and issubclass(item, Callback):
        return f"[{index}] the class {item.__name__} (pass an instance: `{item.__name__}()`)"
    return f"[{index}] {_seen(item)}"


def _normalise_log_with(problems: list[str], log_with: object) -> tuple[Any, ...]:
    if log_with is None:
        return ()
    if isinstance(log_with, (str, Sequence)):
        items = (log_with,) if isinstance(log_with, str) else tuple(log_with)
        return items
    # a single tracker instance (accelerate.tracking.GeneralTracker)
    return (log_with,)


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
    nan_guard: object = "skip",
    max_consecutive_skips: object = 5,
    reinit_zero_params: object = "xavier",
    reinit_std: object = 0.02,
    reinit_scope: object = "weights",
    checkpoint_dir: object = None,
    checkpoint_every: object = 500,
    keep_checkpoints: object = 3,
    async_checkpoint: object = False,
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
    _check_objects(problems, model, optimizer, train_dataloader, eval_dataloader)
    _check_callables(problems, loss_fn, training_step)
    _check_scheduler(problems, lr_scheduler, optimizer)
    _check_count(problems, "max_epochs", max_epochs, optional=False)
    _check_count(problems, "max_steps", max_steps, optional=True)
    _check_count(problems, "gradient_accumulation_steps", gradient_accumulation_steps, optional=True)
    _check_count(problems, "log_every", log_every, optional=False)
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION_CHOICES:
        problems.append(
            f"`mixed_precision` must be one of {', '.join(map(repr, MIXED_PRECISION_CHOICES))} "
            f"or None; got {_seen(mixed_precision)}. For full precision pass 'no' (or None)."
        )
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):  # type: ignore[operator]
        problems.append(f"`seed` must be an int in [0, 2**32) or None; got {_seen(seed)}.")
    _check_positive_float(problems, "clip_grad_norm", clip_grad_norm)
    _check_positive_float(problems, "clip_grad_value", clip_grad_value)
    if clip_grad_norm is not None and clip_grad_value is not None:
        problems.append(
            f"`clip_grad_norm={clip_grad_norm!r}` and `clip_grad_value={clip_grad_value!r}` are both "
            "set; the global norm would then be measured on already clamped gradients. Choose one and "
            "leave the other None."
        )
    if nan_guard not in NAN_GUARD_CHOICES:
        problems.append(
            f"`nan_guard` must be one of {', '.join(map(repr, NAN_GUARD_CHOICES))}; got {_seen(nan_guard)}."
        )
    if not _is_int(max_consecutive_skips) or max_consecutive_skips < 0:  # type: ignore[operator]
        problems.append(
            f"`max_consecutive_skips` must be an int >= 0 (0: the first skip raises); got "
            f"{_seen(max_consecutive_skips)}."
        )
    if reinit_zero_params not in REINIT_CHOICES:
        problems.append(
            f"`reinit_zero_params` must be 'xavier', 'normal' or None; got {_seen(reinit_zero_params)}."
        )
    _check_positive_float(problems, "reinit_std", reinit_std)
    if reinit_std is None:
        problems.append("`reinit_std` must be a finite number > 0; got None.")
    if reinit_scope not in REINIT_SCOPES:
        problems.append(
            f"`reinit_scope` must be one of {', '.join(map(repr, REINIT_SCOPES))}; got {_seen(reinit_scope)}."
        )
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        problems.append(f"`checkpoint_dir` must be a path or None; got {_seen(checkpoint_dir)}.")
    _check_count(problems, "checkpoint_every", checkpoint_every, optional=False)
    _check_count(problems, "keep_checkpoints", keep_checkpoints, optional=False)
    for name, flag in (("progress_bar", progress_bar), ("async_checkpoint", async_checkpoint)):
        if not isinstance(flag, bool):
            problems.append(f"`{name}` must be True or False; got {_seen(flag)}.")
    if project_dir is not None and not isinstance(project_dir, (str, os.PathLike)):
        problems.append(
            f"`project_dir` must be a path (str or os.PathLike) or None; got {_seen(project_dir)}."
        )
    _check_accelerator(problems, accelerator, gradient_accumulation_steps, mixed_precision, log_with)
    callback_items = _check_callbacks(problems, callbacks)
    trackers = _normalise_log_with(problems, log_with)
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
        nan_guard=nan_guard,  # type: ignore[arg-type]
        max_consecutive_skips=max_consecutive_skips,  # type: ignore[arg-type]
        reinit_zero_params=reinit_zero_params,  # type: ignore[arg-type]
        reinit_std=float(reinit_std),  # type: ignore[arg-type]
        reinit_scope=reinit_scope,  # type: ignore[arg-type]
        checkpoint_dir=None if checkpoint_dir is None else os.fspath(checkpoint_dir),  # type: ignore[arg-type]
        checkpoint_every=checkpoint_every,  # type: ignore[arg-type]
        keep_checkpoints=keep_checkpoints,  # type: ignore[arg-type]
        async_checkpoint=async_checkpoint,  # type: ignore[arg-type]
        log_every=log_every,  # type: ignore[arg-type]
        progress_bar=progress_bar,  # type: ignore[arg-type]
        log_with=trackers,
        project_dir=None if project_dir is None else str(project_dir),
    )
    return config, callback_items


def _format_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"SafeTrainer got an invalid argument: {problems[0]}"
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"SafeTrainer got {len(problems)} invalid arguments:\n{lines}"
