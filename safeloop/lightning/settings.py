"""The keyword arguments of ``SafeLoopCallback``, validated as ``SafeTrainer``'s are.

The callback takes the guard and diagnostic keywords of ``SafeTrainer`` with the same names and
defaults; a bad value gives the same message (the checks are ``config.check_settings``), under
the callback's name. A ``SafeTrainer`` keyword that Lightning owns (epochs, accumulation,
precision, seeding, loggers, the progress bar) or that cannot apply under Lightning's loop
(``rollback_skip_batches``, ``async_checkpoint``) is refused with where it goes, or why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from safeloop.config import TrainerConfig, check_settings, format_problems, normalised_settings
from safeloop.errors import ConfigError
from safeloop.validation import name_unknown_keywords

__all__ = ["CALLBACK_KEYWORDS", "ELSEWHERE", "callback_config", "refuse_unknown_keywords"]

OWNER = "SafeLoopCallback"
_Init = TypeVar("_Init", bound=Callable[..., None])

# the keywords of SafeTrainer that apply to a Lightning run, with SafeTrainer's defaults
CALLBACK_KEYWORDS = (
    "nan_guard",
    "max_consecutive_skips",
    "reinit_zero_params",
    "reinit_std",
    "reinit_scope",
    "rollback",
    "max_rollbacks",
    "rollback_lr_factor",
    "checkpoint_dir",
    "checkpoint_every",
    "keep_checkpoints",
    "clip_grad_norm",
    "clip_grad_value",
    "adaptive_clip",
    "spike_zscore",
    "spike_patience",
    "spike_warmup",
    "diagnostics",
    "gradient_noise_scale",
    "log_every",
    "summary",
)

_SKIP_BATCHES = (
    "Lightning's loop owns the data iterator, so a rollback cannot move it: the fit goes on with the "
    "batch after the detection, and the batches since the checkpoint are not replayed (what the "
    "default, None, does under SafeTrainer); drop it"
)
_ASYNC = (
    "SafeLoopCallback writes its rollback checkpoints at the step boundary (asynchronous saves are "
    "not supported under Lightning yet); drop it"
)
# SafeTrainer keywords the callback does not take, and where a Lightning user sets them
ELSEWHERE = {
    "max_epochs": "set it on the Trainer: `Trainer(max_epochs=...)`",
    "max_steps": "set it on the Trainer: `Trainer(max_steps=...)`",
    "gradient_accumulation_steps": "set it on the Trainer: `Trainer(accumulate_grad_batches=...)`",
    "mixed_precision": 'set it on the Trainer: `Trainer(precision="bf16-mixed")` (or "16-mixed")',
    "seed": "seed with `lightning.pytorch.seed_everything(...)` before building the model",
    "accelerator": "Lightning places the model: `Trainer(accelerator=..., devices=...)`",
    "callbacks": "pass Lightning callbacks to the Trainer: `Trainer(callbacks=[SafeLoopCallback(), ...])`",
    "log_with": "set loggers on the Trainer: `Trainer(logger=...)`; findings are logged there",
    "project_dir": "set the logger's directory on the Trainer: `Trainer(default_root_dir=...)`",
    "progress_bar": "Lightning draws the bar: `Trainer(enable_progress_bar=...)`",
    "loss_fn": "the loss is computed in your `LightningModule.training_step`",
    "training_step": "the loss is computed in your `LightningModule.training_step`",
    "eval_dataloader": "return it from `val_dataloader` or pass `trainer.fit(model, train, val)`",
    "lr_scheduler": "return it from `configure_optimizers`",
    "rollback_skip_batches": _SKIP_BATCHES,
    "async_checkpoint": _ASYNC,
    "lr": "the learning rate is set on the optimizer in `configure_optimizers`",
    "learning_rate": "the learning rate is set on the optimizer in `configure_optimizers`",
    "batch_size": "the batch size is set on the DataLoader: `DataLoader(dataset, batch_size=...)`",
    "device": "Lightning places the model: `Trainer(accelerator=..., devices=...)`",
}


def refuse_unknown_keywords(init: _Init) -> _Init:
    """Make the callback's ``__init__`` refuse keywords it does not take, saying where each goes.

    Python's ``TypeError``, as ``SafeTrainer`` raises for an unknown keyword; a ``SafeTrainer``
    keyword that Lightning owns names the Lightning setting instead of the closest names.
    """
    return name_unknown_keywords(init, ELSEWHERE)


def callback_config(arguments: Mapping[str, Any]) -> TrainerConfig:
    """Validate the callback's keywords and return them as a ``TrainerConfig``.

    The settings the callback does not take keep ``TrainerConfig``'s defaults, except
    ``progress_bar`` (Lightning draws its own).

    Args:
        arguments (`Mapping[str, Any]`): the keywords given, each in :data:`CALLBACK_KEYWORDS`.

    Returns:
        `TrainerConfig`: the frozen settings.

    Raises:
        ConfigError: listing every invalid value, as ``SafeTrainer`` words it.
    """
    defaults = {field.name: field.default for field in dataclasses.fields(TrainerConfig)}
    values = {**defaults, "progress_bar": False, **arguments}
    problems: list[str] = []
    check_settings(problems, values)
    if values["checkpoint_dir"] is not None and values["rollback"] is False:
        problems.append(
            f"`checkpoint_dir={values['checkpoint_dir']!r}` with `rollback=False`: under Lightning the "
            "callback's checkpoints are the rollback's targets only, so it would write none there. For "
            "checkpoints to resume from, use Lightning's `ModelCheckpoint`. Fix: drop `checkpoint_dir`, or "
            "keep `rollback=True`."
        )
    if values["gradient_noise_scale"] == "split":
        problems.append(
            '`gradient_noise_scale="split"`: under Lightning the forward and backward are your '
            "`training_step`'s, which the callback cannot run on two halves of a batch. Fix: "
            '`"auto"` measures the noise scale with `Trainer(accumulate_grad_batches=...)` > 1 or on '
            'several DDP processes; `"off"` not at all.'
        )
    if problems:
        raise ConfigError(format_problems(problems, OWNER))
    return TrainerConfig(**normalised_settings(values))
