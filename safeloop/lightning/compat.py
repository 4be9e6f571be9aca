"""Which Lightning, and which ``Trainer`` set-ups, ``SafeLoopCallback`` supports.

Every check here raises before the first batch, with what was found, where, the value seen and
the fix. The version range is the one the callback is tested on; the hooks it relies on
(``on_before_optimizer_step`` after accumulation and the fp16 unscale, ``on_before_backward``
with the loss, ``on_before_zero_grad`` after ``training_step``) have held since Lightning 2.0,
but older releases are not tested and so not accepted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from safeloop.errors import ConfigError
from safeloop.validation import sparse_gradient_problem

__all__ = [
    "MIN_VERSION",
    "BELOW_VERSION",
    "INSTALL_HINT",
    "missing_lightning_error",
    "check_lightning_version",
    "check_trainer_setup",
]

MIN_VERSION = (2, 4)  # the oldest release the callback's tests were run against (2.4.0)
BELOW_VERSION = (3, 0)  # a new major release may move the hooks: refused until tested
INSTALL_HINT = 'pip install "safeloop[lightning]"'
_RANGE = f">={MIN_VERSION[0]}.{MIN_VERSION[1]},<{BELOW_VERSION[0]}"


def missing_lightning_error(cause: ImportError) -> ImportError:
    """The ``ImportError`` of ``from safeloop.lightning import SafeLoopCallback`` without ``lightning``.

    Args:
        cause (`ImportError`): the error of ``import lightning``.

    Returns:
        `ImportError`: naming the extra that installs it (raise it ``from cause``).
    """
    hint = ""
    try:  # the older package name: its Trainer refuses callbacks of `lightning.pytorch`
        import importlib.util

        if importlib.util.find_spec("pytorch_lightning") is not None:
            hint = (
                " `pytorch_lightning` is installed, but SafeLoopCallback is a `lightning.pytorch.Callback`: "
                "use `import lightning.pytorch as pl` (the same API) with the `lightning` package."
            )
    except (ImportError, ValueError):  # a broken environment: the main message still holds
        pass
    return ImportError(
        f"safeloop.lightning needs the `lightning` package, which could not be imported ({cause}). "
        f"Install it with: {INSTALL_HINT} (lightning{_RANGE}).{hint}"
    )


def _parse(version: str) -> tuple[int, int] | None:
    match = re.match(r"^\s*(\d+)\.(\d+)", version)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def check_lightning_version(version: str, location: str = "") -> None:
    """Refuse a Lightning release outside the tested range.

    Args:
        version (`str`): ``lightning.__version__``.
        location (`str`, *optional*): where that package is installed, quoted in the message.

    Raises:
        ImportError: the version is outside ``>=2.4,<3`` (or unreadable), naming the fix.

    Example:
        >>> check_lightning_version("2.6.6")
        >>> check_lightning_version("2.3.3")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ImportError: SafeLoopCallback supports lightning>=2.4,<3; the installed lightning is 2.3.3...
    """
    parsed = _parse(version)
    if parsed is not None and MIN_VERSION <= parsed < BELOW_VERSION:
        return
    where = f" (at {location})" if location else ""
    if parsed is None:
        cause = (
            "Its version string cannot be read, so the hooks the callback relies on cannot be vouched for."
        )
    elif parsed < MIN_VERSION:
        cause = "Likely cause: an older lightning pinned by your project or another package."
    else:
        cause = (
            "A new major release may have moved the hooks the callback relies on (the order of "
            "`on_before_optimizer_step`, the fp16 unscale and the optimizer step); it is not tested yet."
        )
    raise ImportError(
        f"SafeLoopCallback supports lightning{_RANGE}; the installed lightning is {version}{where}. "
        f'{cause} Fix: {INSTALL_HINT}, or pip install "lightning{_RANGE}".'
    )


def check_trainer_setup(trainer: Any, settings: Any, optimizers: Sequence[Any]) -> None:
    """Refuse a ``Trainer`` set-up the callback cannot guard, listing every problem at once.

    Args:
        trainer (`lightning.pytorch.Trainer`): the trainer, after its strategy's set-up.
        settings (`TrainerConfig`): the callback's settings (its clipping).
        optimizers (`Sequence[Optimizer]`): ``trainer.optimizers``.

    Raises:
        ConfigError: an unsupported strategy, several optimizers or none, an LBFGS optimizer,
            modules with sparse gradients (``nn.Embedding(sparse=True)``),
            several LR schedulers with rollback, or clipping asked of both the callback and the
            ``Trainer``.
    """
    problems = [*_strategy_problems(trainer, settings), *_optimizer_problems(optimizers, settings)]
    sparse = sparse_gradient_problem(trainer.lightning_module, ", or remove SafeLoopCallback for this run")
    if sparse is not None:
        problems.append(sparse)
    schedulers = [config.scheduler for config in getattr(trainer, "lr_scheduler_configs", None) or ()]
    if settings.rollback and len(schedulers) > 1:
        names = ", ".join(type(s).__name__ for s in schedulers)
        problems.append(
            f"`configure_optimizers` returned {len(schedulers)} LR schedulers ({names}) and `rollback=True`; "
            "a rollback restores the scheduler and scales its rates by `rollback_lr_factor`, which "
            "SafeLoopCallback does for one scheduler. Fix: chain them into one (`SequentialLR`, "
            "`ChainedScheduler`), or `SafeLoopCallback(rollback=False)`."
        )
    clip = _callback_clip(settings)
    trainer_clip = trainer.gradient_clip_val
    if clip is not None and trainer_clip is not None and trainer_clip > 0:
        problems.append(
            f"`SafeLoopCallback({clip})` and `Trainer(gradient_clip_val={trainer_clip!r})` both clip the "
            "gradients: the callback clips in `on_before_optimizer_step`, then Lightning clips the clipped "
            "gradients again, so neither bound is the one applied (and the callback's gradient norms no "
            "longer describe the update). Fix: keep one, e.g. remove `gradient_clip_val` from the Trainer "
            f"and keep `{clip}`, or remove `{clip.split('=')[0]}` from SafeLoopCallback."
        )
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if clip is not None and scaler is not None and optimizers and _unscales_itself(optimizers[0]):
        problems.append(
            f"`SafeLoopCallback({clip})` with fp16 mixed precision and a fused optimizer "
            f"({type(optimizers[0]).__name__}(fused=True)): the gradients are still scaled when the callback "
            "sees them (the fused kernel unscales inside its step), so no bound can be applied. Fix: "
            '`fused=False`, bf16 (`precision="bf16-mixed"`), or no clipping.'
        )
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"SafeLoopCallback cannot guard this Trainer:\n{lines}")


def _callback_clip(settings: Any) -> str | None:
    for name in ("clip_grad_norm", "clip_grad_value", "adaptive_clip"):
        value = getattr(settings, name)
        if value is not None:
            return f"{name}={value!r}"
    return None


def _unscales_itself(optimizer: Any) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def _strategy_problems(trainer: Any, settings: Any) -> list[str]:
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from safeloop.lightning.deepspeed import deepspeed_problems, is_deepspeed
    from safeloop.lightning.fsdp import fsdp1_problems, fsdp2_problems, is_fsdp1, is_fsdp2

    strategy = trainer.strategy
    name = type(strategy).__name__
    if is_fsdp2(strategy):  # FSDP2: data parallel only, every trainable parameter fully_shard-ed
        return fsdp2_problems(strategy, trainer.lightning_module)
    if is_fsdp1(strategy):  # FSDP1 with the module's own parameters (use_orig_params=True)
        return fsdp1_problems(strategy)
    if is_deepspeed(strategy):  # the engine steps itself: SafeTrainer's ZeroEngine gates it
        return deepspeed_problems(strategy, settings)
    # a subclass that compiles the step (XLA) is not DDP
    supported = type(strategy) is SingleDeviceStrategy or (
        isinstance(strategy, DDPStrategy) and name != "XLAStrategy"
    )
    if supported:
        return []
    why = _UNSUPPORTED_WHY.get(
        name, "its gradients and optimizer step are not where the callback measures them"
    )
    return [
        f"the strategy is {name} (`Trainer(strategy=...)`): {why}. SafeLoopCallback supports one device "
        '(SingleDeviceStrategy), DDP (`strategy="ddp"` and its spawn/fork variants), FSDP1 '
        '(`strategy="fsdp"`, `use_orig_params=True`), DeepSpeed (`strategy="deepspeed"`) and FSDP2 through '
        "`ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)` with `fully_shard` "
        "applied in `configure_model`. Fix: one of those, or remove SafeLoopCallback for this run."
    ]


# why each strategy Lightning offers that is refused cannot be guarded (said in the ConfigError)
_UNSUPPORTED_WHY = {
    "XLAStrategy": (
        "XLA compiles the step lazily, so the callback's per-step flag would force a compile and a host read"
    ),
}


def _optimizer_problems(optimizers: Sequence[Any], settings: Any) -> list[str]:
    if len(optimizers) == 1:
        optimizer = optimizers[0]
        if type(optimizer).__name__ == "LBFGS" and settings.nan_guard != "off":
            return [
                "the optimizer is LBFGS, whose step calls the closure several times; the NaN/Inf guard "
                'decides once per step, before the update. Fix: `SafeLoopCallback(nan_guard="off")` to '
                "keep the diagnostics, or another optimizer."
            ]
        return []
    if not optimizers:
        return [
            "`configure_optimizers` returned no optimizer, so there is no step to guard. Fix: return "
            "the optimizer from `configure_optimizers`, or remove SafeLoopCallback."
        ]
    names = ", ".join(type(o).__name__ for o in optimizers)
    return [
        f"`configure_optimizers` returned {len(optimizers)} optimizers ({names}); SafeLoopCallback "
        "guards one optimizer so far (its finite flag, skip and gradient statistics are per step of "
        "one optimizer). Fix: one optimizer with several param groups, or remove SafeLoopCallback "
        "for this run (several optimizers, e.g. a GAN, are planned)."
    ]
