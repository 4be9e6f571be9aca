"""Every invalid argument or unreadable batch is a ``ConfigError`` that names the argument,
shows the value seen and says what is allowed; argument errors come from ``SafeTrainer(...)``,
batch errors from the first batch of ``fit()``, before any parameter changes."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import Callback, ConfigError, SafeLoopError, SafeTrainer
from tests.helpers.models import DictDataset, classification_data, loader, mlp, state_equal

# -- helpers -------------------------------------------------------------------------------


def _one_line(value: object, length: int = 40) -> str:
    """The start of ``repr(value)`` as the error message shows it (whitespace collapsed)."""
    return " ".join(repr(value).split())[:length]


def _trainer(**kwargs) -> SafeTrainer:
    """A valid trainer on a tiny MLP, with ``kwargs`` overriding any argument."""
    model = kwargs.pop("model") if "model" in kwargs else mlp()
    kwargs.setdefault("progress_bar", False)
    kwargs.setdefault("loss_fn", nn.CrossEntropyLoss())
    if "optimizer" in kwargs:
        optimizer = kwargs.pop("optimizer")
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if "train_dataloader" in kwargs:  # an empty DataLoader is falsy: no `or` default here
        train_dataloader = kwargs.pop("train_dataloader")
    else:
        train_dataloader = loader(classification_data(n=16))
    return SafeTrainer(model, optimizer, train_dataloader, **kwargs)


def _rejected(match: str, *, single: bool = True, **kwargs) -> str:
    """Build a trainer that must fail with a ConfigError matching ``match``; return its message."""
    with pytest.raises(ConfigError, match=match) as excinfo:
        _trainer(**kwargs)
    message = str(excinfo.value)
    if single:  # exactly the problem under test, no collateral complaint
        assert message.startswith("SafeTrainer got an invalid argument: "), message
    return message


def _fit_rejected(trainer: SafeTrainer, model: nn.Module, match: str) -> str:
    """Run ``fit`` that must fail at the first batch, leaving parameters and optimizer untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match) as excinfo:
        trainer.fit()
    assert state_equal(before, model.state_dict())
    assert not trainer.optimizer.state
    assert trainer.global_step == 0
    return str(excinfo.value)


def _fit_trainer(model: nn.Module, dataset, **kwargs) -> SafeTrainer:
    kwargs.setdefault("progress_bar", False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return SafeTrainer(model, optimizer, DataLoader(dataset, batch_size=8), **kwargs)


class _Recorder(Callback):
    pass


@dataclass
class _NoLossOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


class _NoLabelsModel(nn.Module):
    """Hugging Face style: ``.loss`` is None because the batch carries no labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> _NoLossOutput:
        return _NoLossOutput(loss=None, logits=self.net(input_ids))


class _LogitsModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids)


class _InputsOnly(torch.utils.data.Dataset):
    """A dataset whose samples are dicts without labels."""

    def __init__(self) -> None:
        self.x = torch.randn(16, 8)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i]}


# -- the error type -----------------------------------------------------------------------


def test_config_error_is_both_a_value_error_and_a_safeloop_error():
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, SafeLoopError)
    with pytest.raises(ValueError, match="max_epochs"):
        _trainer(max_epochs=0)
    with pytest.raises(SafeLoopError, match="max_epochs"):
        _trainer(max_epochs=0)


# -- objects --------------------------------------------------------------------------------


def test_a_state_dict_given_as_model_is_rejected_with_value_and_what_to_pass():
    model = mlp()
    state = model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    message = _rejected(r"`model` must be a torch\.nn\.Module", model=state, optimizer=optimizer)
    assert "`model`" in message
    assert _one_line(state) in message
    assert "(OrderedDict)" in message
    assert "Pass the module itself, not its parameters or state_dict" in message


def test_a_list_of_parameters_as_optimizer_is_rejected_with_value_and_how_to_build_one():
    model = mlp()
    params = list(model.parameters())
    message = _rejected(r"`optimizer` must be a torch\.optim\.Optimizer", model=model, optimizer=params)
    assert "`optimizer`" in message
    assert _one_line(params) in message
    assert "(list)" in message
    assert "torch.optim.AdamW(model.parameters(), lr=1e-3)" in message


def test_a_list_of_batches_as_train_dataloader_is_rejected_with_value_and_how_to_wrap_it():
    batches = [(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long))]
    message = _rejected(
        r"`train_dataloader` must be a torch\.utils\.data\.DataLoader", train_dataloader=batches
    )
    assert "`train_dataloader`" in message
    assert _one_line(batches) in message
    assert "(list)" in message
    assert "DataLoader(dataset, batch_size=...)" in message


def test_a_tensor_dataset_as_train_dataloader_is_rejected_with_value_and_how_to_wrap_it():
    dataset = classification_data(n=16)
    message = _rejected(
        r"`train_dataloader` must be a torch\.utils\.data\.DataLoader", train_dataloader=dataset
    )
    assert "`train_dataloader`" in message
    assert repr(dataset) in message
    assert "(TensorDataset)" in message
    assert "DataLoader(dataset, batch_size=...)" in message


def test_an_empty_train_dataloader_due_to_drop_last_is_rejected_with_its_sizes_and_the_fix():
    empty = DataLoader(classification_data(n=5), batch_size=8, drop_last=True)
    assert len(empty) == 0
    message = _rejected(r"`train_dataloader` must yield at least one batch", train_dataloader=empty)
    assert "`train_dataloader`" in message
    assert "len 0" in message
    assert "dataset of 5 samples" in message
    assert "batch_size=8" in message
    assert "drop_last=True" in message
    assert "set `drop_last=False`" in message


def test_a_dataset_as_eval_dataloader_is_rejected_with_value_and_how_to_wrap_it():
    dataset = classification_data(n=16)
    message = _rejected(
        r"`eval_dataloader` must be a torch\.utils\.data\.DataLoader", eval_dataloader=dataset
    )
    assert "`eval_dataloader`" in message
    assert repr(dataset) in message
    assert "(TensorDataset)" in message
    assert "DataLoader(dataset, batch_size=...)" in message


# -- callables ------------------------------------------------------------------------------


def test_a_tensor_as_loss_fn_is_rejected_with_value_and_the_callable_expected():
    value = torch.tensor(0.5)
    message = _rejected(r"`loss_fn` must be callable or None", loss_fn=value)
    assert "`loss_fn`" in message
    assert "tensor(0.5000) (Tensor)" in message
    assert "Pass the function itself" in message


def test_a_loss_module_class_as_loss_fn_is_rejected_with_the_instance_to_pass():
    message = _rejected(r"`loss_fn` must be a function or a module instance", loss_fn=nn.CrossEntropyLoss)
    assert "`loss_fn`" in message
    assert "the class CrossEntropyLoss" in message
    assert "`loss_fn=CrossEntropyLoss()`" in message


def test_a_string_as_training_step_is_rejected_with_value_and_the_callable_expected():
    message = _rejected(r"`training_step` must be callable or None", training_step="step")
    assert "`training_step`" in message
    assert "'step' (str)" in message
    assert "callable or None" in message


@pytest.mark.parametrize(
    ("name", "fn", "signature"),
    [
        ("training_step", lambda batch: batch, "<lambda>(batch)"),
        ("training_step", lambda model, batch, extra: batch, "<lambda>(model, batch, extra)"),
        ("loss_fn", lambda outputs: outputs.sum(), "<lambda>(outputs)"),
        ("loss_fn", len, "len"),
    ],
)
def test_a_callable_that_cannot_take_two_arguments_is_rejected_with_its_signature(name, fn, signature):
    message = _rejected(rf"`{name}` is called as `{name}\(", **{name: fn})
    takes = "(outputs, targets)" if name == "loss_fn" else "(model, batch)"
    assert signature in message and f"`def {name}{takes}:`" in message


@pytest.mark.parametrize(
    "fn",
    [nn.CrossEntropyLoss(), nn.functional.cross_entropy, lambda outputs, targets, weight=None: 0,
     lambda *args: 0],
)  # fmt: skip
def test_callables_that_take_two_arguments_are_accepted(fn):
    _trainer(loss_fn=fn, max_steps=1)


# -- scheduler ------------------------------------------------------------------------------


def test_a_lambda_as_lr_scheduler_is_rejected_with_value_and_a_scheduler_to_build():
    def schedule(step):
        return 0.1

    message = _rejected(
        r"`lr_scheduler` must be a torch\.optim\.lr_scheduler\.LRScheduler", lr_scheduler=schedule
    )
    assert "`lr_scheduler`" in message
    assert _one_line(schedule) in message
    assert "(function)" in message
    assert "torch.optim.lr_scheduler.LinearLR(optimizer)" in message


def test_reduce_lr_on_plateau_is_rejected_with_value_and_where_to_step_it():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    message = _rejected(
        r"`lr_scheduler` must be an LRScheduler that steps without a metric",
        model=model,
        optimizer=optimizer,
        lr_scheduler=plateau,
    )
    assert "`lr_scheduler`" in message
    assert _one_line(plateau) in message
    assert "(ReduceLROnPlateau)" in message
    assert "Callback.on_validation_end(trainer, eval_loss)" in message
    assert "`lr_scheduler=None`" in message


def test_a_scheduler_built_on_another_optimizer_is_rejected_naming_both_optimizers():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LinearLR(other)
    message = _rejected(
        r"`lr_scheduler` was built on another optimizer than `optimizer`",
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
    )
    assert f"SGD at {id(other):#x}" in message
    assert f"SGD at {id(optimizer):#x}" in message
    assert "Build it from the optimizer given to SafeTrainer" in message


# -- counts ---------------------------------------------------------------------------------


def test_zero_max_epochs_is_rejected_with_value_and_allowed_range():
    message = _rejected(r"`max_epochs` must be an int >= 1", max_epochs=0)
    assert "`max_epochs`" in message
    assert "got 0 (int)" in message
    assert "an int >= 1" in message


def test_negative_max_epochs_is_rejected_with_value_and_allowed_range():
    message = _rejected(r"`max_epochs` must be an int >= 1", max_epochs=-1)
    assert "got -1 (int)" in message


def test_true_as_max_epochs_is_rejected_as_a_bool_not_taken_as_one():
    message = _rejected(r"`max_epochs` must be an int >= 1", max_epochs=True)
    assert "got True (bool)" in message


def test_fractional_max_epochs_is_rejected_with_value_and_allowed_range():
    message = _rejected(r"`max_epochs` must be an int >= 1", max_epochs=2.5)
    assert "got 2.5 (float)" in message


def test_zero_max_steps_is_rejected_with_value_and_none_allowed():
    message = _rejected(r"`max_steps` must be an int >= 1 or None", max_steps=0)
    assert "`max_steps`" in message
    assert "got 0 (int)" in message


def test_zero_gradient_accumulation_steps_is_rejected_with_value_and_allowed_range():
    message = _rejected(
        r"`gradient_accumulation_steps` must be an int >= 1 or None", gradient_accumulation_steps=0
    )
    assert "`gradient_accumulation_steps`" in message
    assert "got 0 (int)" in message


def test_zero_log_every_is_rejected_with_value_and_allowed_range():
    message = _rejected(r"`log_every` must be an int >= 1", log_every=0)
    assert "`log_every`" in message
    assert "got 0 (int)" in message


# -- precision and seed ---------------------------------------------------------------------


def test_fp32_mixed_precision_is_rejected_with_the_choices_and_the_full_precision_spelling():
    message = _rejected(
        r"`mixed_precision` must be one of 'no', 'fp16', 'bf16' or None", mixed_precision="fp32"
    )
    assert "`mixed_precision`" in message
    assert "got 'fp32' (str)" in message
    assert "For full precision pass 'no'" in message


def test_negative_seed_is_rejected_with_value_and_allowed_range():
    message = _rejected(re.escape("`seed` must be an int in [0, 2**32) or None"), seed=-1)
    assert "`seed`" in message
    assert "got -1 (int)" in message


def test_a_string_seed_is_rejected_showing_the_quoted_value():
    message = _rejected(re.escape("`seed` must be an int in [0, 2**32) or None"), seed="42")
    assert "got '42' (str)" in message


# -- clipping -------------------------------------------------------------------------------


def test_zero_clip_grad_norm_is_rejected_with_value_and_allowed_range():
    message = _rejected(r"`clip_grad_norm` must be a finite number > 0 or None", clip_grad_norm=0)
    assert "`clip_grad_norm`" in message
    assert "got 0 (int)" in message


def test_negative_clip_grad_norm_is_rejected_with_value_and_allowed_range():
    message = _rejected(r"`clip_grad_norm` must be a finite number > 0 or None", clip_grad_norm=-1.0)
    assert "got -1.0 (float)" in message


def test_nan_clip_grad_norm_is_rejected_as_not_finite():
    message = _rejected(r"`clip_grad_norm` must be a finite number > 0 or None", clip_grad_norm=float("nan"))
    assert "got nan (float)" in message


def test_a_string_clip_grad_norm_is_rejected_showing_the_quoted_value():
    message = _rejected(r"`clip_grad_norm` must be a finite number > 0 or None", clip_grad_norm="1")
    assert "got '1' (str)" in message


def test_zero_clip_grad_value_is_rejected_with_value_and_allowed_range():
    message = _rejected(r"`clip_grad_value` must be a finite number > 0 or None", clip_grad_value=0.0)
    assert "`clip_grad_value`" in message
    assert "got 0.0 (float)" in message


def test_clip_grad_norm_and_clip_grad_value_together_are_rejected_asking_to_choose_one():
    message = _rejected(
        r"`clip_grad_norm=1\.0` and `clip_grad_value=0\.5` are both set",
        clip_grad_norm=1.0,
        clip_grad_value=0.5,
    )
    assert "Choose one and leave the other None" in message


def test_a_string_async_checkpoint_is_rejected_with_the_value():
    message = _rejected(r"`async_checkpoint` must be True or False", async_checkpoint="yes")
    assert "'yes'" in message


def test_a_string_progress_bar_is_rejected_with_value_and_the_two_choices():
    message = _rejected(r"`progress_bar` must be True or False", progress_bar="yes")
    assert "`progress_bar`" in message
    assert "got 'yes' (str)" in message


# -- rollback -------------------------------------------------------------------------------


def test_negative_max_rollbacks_is_rejected_with_value_and_allowed_range():
    message = _rejected(r"`max_rollbacks` must be an int >= 0", max_rollbacks=-1)
    assert "got -1 (int)" in message


def test_true_as_max_rollbacks_is_rejected_as_a_bool_not_taken_as_one():
    message = _rejected(r"`max_rollbacks` must be an int >= 0", max_rollbacks=True)
    assert "got True (bool)" in message


def test_zero_rollback_lr_factor_is_rejected_with_value_and_allowed_range():
    message = _rejected(re.escape("`rollback_lr_factor` must be a number in (0, 1]"), rollback_lr_factor=0)
    assert "got 0 (int)" in message
    assert "1 keeps the learning rate" in message


def test_a_rollback_lr_factor_above_one_is_rejected_rather_than_raising_the_rate():
    message = _rejected(re.escape("`rollback_lr_factor` must be a number in (0, 1]"), rollback_lr_factor=1.5)
    assert "got 1.5 (float)" in message


def test_a_string_rollback_lr_factor_is_rejected_showing_the_quoted_value():
    message = _rejected(
        re.escape("`rollback_lr_factor` must be a number in (0, 1]"), rollback_lr_factor="half"
    )
    assert "got 'half' (str)" in message


def test_negative_rollback_skip_batches_is_rejected_with_value_and_what_none_means():
    message = _rejected(r"`rollback_skip_batches` must be an int >= 0 or None", rollback_skip_batches=-3)
    assert "got -3 (int)" in message
    assert "the batches between the checkpoint and the detection" in message


def test_zero_spike_zscore_is_rejected_with_value_and_allowed_range():
    message = _rejected(r"`spike_zscore` must be a finite number > 0", spike_zscore=0)
    assert "got 0 (int)" in message
    assert "or None" not in message  # the detector always runs: None is no way to turn it off


def test_zero_spike_patience_is_rejected_with_value_and_allowed_range():
    message = _rejected(r"`spike_patience` must be an int >= 1", spike_patience=0)
    assert "got 0 (int)" in message


def test_negative_spike_warmup_is_rejected_with_value_and_allowed_range():
    message = _rejected(r"`spike_warmup` must be an int >= 0", spike_warmup=-1)
    assert "got -1 (int)" in message


def test_a_string_rollback_is_rejected_with_value_and_the_two_choices():
    message = _rejected(r"`rollback` must be True or False", rollback="yes")
    assert "got 'yes' (str)" in message


# -- callbacks ------------------------------------------------------------------------------


def test_a_function_among_callbacks_is_rejected_with_its_index_and_value():
    def on_fit_start(trainer):
        return None

    message = _rejected(
        r"`callbacks` must hold safeloop\.Callback instances", callbacks=[_Recorder(), on_fit_start]
    )
    assert "`callbacks`" in message
    assert f"[1] {_one_line(on_fit_start)}" in message
    assert "(function)" in message
    assert "[0]" not in message
    assert "Subclass `safeloop.Callback` and pass an instance" in message


def test_a_callback_class_instead_of_an_instance_is_rejected_with_the_call_to_write():
    message = _rejected(r"`callbacks` must hold safeloop\.Callback instances", callbacks=[_Recorder])
    assert "[0] the class _Recorder" in message
    assert "pass an instance: `_Recorder()`" in message


def test_a_non_iterable_callbacks_is_rejected_with_value_and_the_list_expected():
    message = _rejected(r"`callbacks` must be a list of safeloop\.Callback instances", callbacks=5)
    assert "`callbacks`" in message
    assert "got 5 (int)" in message
    assert "callbacks=[MyCallback()]" in message


def test_a_string_as_callbacks_is_rejected_rather_than_iterated_per_character():
    message = _rejected(
        r"`callbacks` must be a list of safeloop\.Callback instances", callbacks="tensorboard"
    )
    assert "got 'tensorboard' (str)" in message


# -- accelerator ----------------------------------------------------------------------------


def test_a_string_as_accelerator_is_rejected_with_value_and_what_to_pass():
    message = _rejected(r"`accelerator` must be an accelerate\.Accelerator or None", accelerator="cpu")
    assert "`accelerator`" in message
    assert "got 'cpu' (str)" in message
    assert "accelerator=Accelerator(...)" in message


def test_gradient_accumulation_steps_conflicting_with_the_accelerator_is_rejected_with_both_values():
    accelerator = Accelerator(gradient_accumulation_steps=2)
    message = _rejected(
        r"`gradient_accumulation_steps=4` disagrees with the given accelerator's 2",
        accelerator=accelerator,
        gradient_accumulation_steps=4,
    )
    assert "Set it on one of them only" in message
    assert "leave `gradient_accumulation_steps` unset to use the Accelerator's 2" in message
    assert "`Accelerator(gradient_accumulation_steps=4)`" in message


def test_mixed_precision_conflicting_with_the_accelerator_is_rejected_with_both_values():
    accelerator = Accelerator()
    message = _rejected(
        r"`mixed_precision='bf16'` disagrees with the given accelerator's 'no'",
        accelerator=accelerator,
        mixed_precision="bf16",
    )
    assert "Set it on one of them only" in message
    assert "Accelerator(mixed_precision=...)" in message


def test_log_with_alongside_an_accelerator_is_rejected_with_value_and_where_to_set_it():
    message = _rejected(
        r"`log_with='tensorboard'` only applies when safeloop builds the Accelerator",
        accelerator=Accelerator(),
        log_with="tensorboard",
    )
    assert "Accelerator(log_with=...)" in message
    assert "accelerator.init_trackers(...)" in message


# -- all at once ----------------------------------------------------------------------------


def test_several_invalid_arguments_are_reported_together_in_one_error():
    message = _rejected(
        r"SafeTrainer got 4 invalid arguments:",
        single=False,
        max_epochs=0,
        seed="42",
        progress_bar="yes",
        mixed_precision="fp32",
    )
    lines = message.splitlines()
    assert lines[0] == "SafeTrainer got 4 invalid arguments:"
    assert len(lines) == 5
    assert all(line.startswith("  - ") for line in lines[1:])
    for fragment in (
        "`max_epochs`",
        "got 0 (int)",
        "`seed`",
        "got '42' (str)",
        "`progress_bar`",
        "got 'yes'",
    ):
        assert fragment in message
    assert "got 'fp32' (str)" in message


# -- batches, at the first batch of fit() -------------------------------------------------


def test_a_tuple_batch_with_neither_loss_fn_nor_training_step_is_rejected_before_any_update():
    model = mlp()
    trainer = _fit_trainer(model, classification_data(n=16))
    message = _fit_rejected(trainer, model, r"neither `loss_fn` nor `training_step` was given")
    assert "Tensor(shape=(8, 8), dtype=torch.float32)" in message
    assert "Tensor(shape=(8,), dtype=torch.int64)" in message
    assert "loss_fn=torch.nn.CrossEntropyLoss()" in message
    assert "training_step=fn(model, batch) -> loss" in message


def test_a_three_item_batch_is_rejected_with_its_items_and_the_training_step_fix():
    model = mlp()
    x, y = classification_data(n=16).tensors
    trainer = _fit_trainer(model, TensorDataset(x, y, torch.ones(16)), loss_fn=nn.CrossEntropyLoss())
    message = _fit_rejected(trainer, model, r"the batch is a list of 3 items")
    assert "Tensor(shape=(8,), dtype=torch.float32)" in message
    assert "reads exactly `(inputs, targets)`" in message
    assert "training_step=fn(model, batch) -> loss" in message


def test_a_bare_tensor_batch_is_rejected_with_its_shape_and_the_conventions():
    model = mlp()
    trainer = _fit_trainer(model, torch.randn(16, 8), loss_fn=nn.CrossEntropyLoss())
    message = _fit_rejected(
        trainer, model, re.escape("the batch is Tensor(shape=(8, 8), dtype=torch.float32)")
    )
    assert "no convention reads it" in message
    assert "Make the dataset return `(inputs, targets)`" in message


def test_a_dict_batch_whose_model_output_has_no_loss_is_rejected_asking_for_labels_or_loss_fn():
    model = _NoLabelsModel()
    trainer = _fit_trainer(model, _InputsOnly())
    message = _fit_rejected(trainer, model, re.escape("`model(**batch)` (no `loss_fn` given"))
    assert "_NoLossOutput whose `.loss` is None (NoneType)" in message
    assert "which holds no loss" in message
    assert "Put `labels` in the batch" in message
    assert "loss_fn=fn(outputs, batch) -> loss" in message


def test_a_dict_batch_whose_model_returns_logits_is_rejected_instead_of_backpropagating_them():
    model = _LogitsModel()
    trainer = _fit_trainer(model, DictDataset(classification_data(n=16)))
    message = _fit_rejected(trainer, model, re.escape("`model(**batch)` (no `loss_fn` given"))
    assert "Tensor(shape=(8, 3), dtype=torch.float32), not a loss" in message
    assert "loss_fn=fn(outputs, batch) -> loss" in message


def test_a_training_step_returning_none_is_rejected_asking_for_its_return():
    model = mlp()
    trainer = _fit_trainer(model, classification_data(n=16), training_step=lambda m, batch: None)
    message = _fit_rejected(
        trainer, model, re.escape("`training_step(model, batch)` returned None (NoneType)")
    )
    assert "which holds no loss" in message
    assert "Return a scalar tensor" in message
    assert "forget its `return`" in message


def test_a_training_step_returning_a_float_is_rejected_as_not_backpropagatable():
    def step(model, batch):
        inputs, targets = batch
        return nn.functional.cross_entropy(model(inputs), targets).item()

    model = mlp()
    trainer = _fit_trainer(model, classification_data(n=16), training_step=step)
    message = _fit_rejected(trainer, model, r"`training_step\(model, batch\)` returned [0-9.]+ \(float\)")
    assert "A Python number cannot be backpropagated" in message
    assert "no `.item()`" in message


def test_a_loss_fn_returning_per_sample_losses_is_rejected_naming_the_shape():
    model = mlp()
    trainer = _fit_trainer(model, classification_data(n=16), loss_fn=nn.CrossEntropyLoss(reduction="none"))
    message = _fit_rejected(
        trainer, model, re.escape("`loss_fn(model(inputs), targets)` gave a loss of shape (8,)")
    )
    assert "backward needs a single number" in message
    assert "loss.mean()" in message
    assert 'reduction="mean"' in message


def test_a_training_step_returning_a_mapping_without_loss_is_rejected_listing_its_keys():
    def step(model, batch):
        inputs, _ = batch
        return {"logits": model(inputs)}

    model = mlp()
    trainer = _fit_trainer(model, classification_data(n=16), training_step=step)
    message = _fit_rejected(
        trainer, model, re.escape("`training_step(model, batch)` returned dict with keys ['logits']")
    )
    assert 'a mapping with key "loss"' in message


def test_a_batch_error_is_raised_before_any_parameter_or_optimizer_state_changes():
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    trainer = SafeTrainer(
        model, optimizer, loader(classification_data(n=16)), progress_bar=False, max_steps=3, seed=0
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="neither `loss_fn` nor `training_step`"):
        trainer.fit()
    assert state_equal(before, model.state_dict())
    assert not optimizer.state
    assert all(p.grad is None for p in model.parameters())
    assert trainer.global_step == 0


def test_unknown_nan_guard_policy_is_rejected_with_the_choices():
    with pytest.raises(ConfigError) as excinfo:
        _trainer(nan_guard="ignore")
    message = str(excinfo.value)
    assert "`nan_guard`" in message and "'ignore'" in message
    assert "'skip'" in message and "'raise'" in message and "'off'" in message


def test_negative_max_consecutive_skips_is_rejected():
    with pytest.raises(ConfigError) as excinfo:
        _trainer(max_consecutive_skips=-1)
    message = str(excinfo.value)
    assert "`max_consecutive_skips`" in message and "-1" in message and "int >= 0" in message


def test_unknown_reinit_method_is_rejected_with_the_choices():
    with pytest.raises(ConfigError) as excinfo:
        _trainer(reinit_zero_params="kaiming")
    message = str(excinfo.value)
    assert "`reinit_zero_params`" in message and "'kaiming'" in message
    assert "'xavier'" in message and "'normal'" in message and "None" in message


def test_non_positive_reinit_std_is_rejected():
    with pytest.raises(ConfigError) as excinfo:
        _trainer(reinit_std=0.0)
    message = str(excinfo.value)
    assert "`reinit_std`" in message and "0.0" in message and "> 0" in message


def test_unknown_reinit_scope_is_rejected_with_the_choices():
    with pytest.raises(ConfigError) as excinfo:
        _trainer(reinit_scope="biases")
    message = str(excinfo.value)
    assert (
        "`reinit_scope`" in message
        and "'biases'" in message
        and "'weights'" in message
        and "'all'" in message
    )


def test_zero_checkpoint_every_is_rejected():
    with pytest.raises(ConfigError) as excinfo:
        _trainer(checkpoint_every=0)
    message = str(excinfo.value)
    assert "`checkpoint_every`" in message and "0" in message and "int >= 1" in message


def test_zero_keep_checkpoints_is_rejected():
    with pytest.raises(ConfigError) as excinfo:
        _trainer(keep_checkpoints=0)
    message = str(excinfo.value)
    assert "`keep_checkpoints`" in message and "int >= 1" in message


def test_checkpoint_dir_of_the_wrong_type_is_rejected():
    with pytest.raises(ConfigError) as excinfo:
        _trainer(checkpoint_dir=42)
    message = str(excinfo.value)
    assert "`checkpoint_dir`" in message and "42 (int)" in message and "path or None" in message


def test_resume_latest_without_a_checkpoint_dir_is_rejected():
    trainer = _trainer()
    with pytest.raises(ConfigError, match="needs `checkpoint_dir`"):
        trainer.fit(resume_from="latest")


def test_adaptive_clip_must_be_a_positive_number_and_not_combined_with_a_fixed_clip():
    message = _rejected(r"`adaptive_clip` must be a finite number > 0", adaptive_clip=-1.0)
    assert "got -1.0 (float)" in message
    message = _rejected(r"adaptive bound replaces the fixed one", adaptive_clip=2.5, clip_grad_norm=1.0)
    assert "`adaptive_clip=2.5`" in message


class _Lookup(nn.Module):
    """Token ids -> class scores through embedding layers (sparse or dense gradients)."""

    def __init__(self, *, sparse: tuple[bool, ...]) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(10, 4, sparse=s) for s in sparse)
        self.bag = nn.EmbeddingBag(10, 4, sparse=False)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(sum(t(ids).mean(1) for t in self.tables) + self.bag(ids))


def _ids_loader() -> DataLoader:
    ids = torch.randint(0, 10, (16, 5), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids, torch.randint(0, 3, (16,))), batch_size=8)


@pytest.mark.parametrize(
    ("sparse", "named"),
    [
        ((True,), "`tables.0` (Embedding) has `sparse=True`"),
        ((False, True, True), "`tables.1` (Embedding), `tables.2` (Embedding) have `sparse=True`"),
    ],
)
def test_modules_with_sparse_gradients_are_refused_naming_each(sparse, named):
    model = _Lookup(sparse=sparse)
    with pytest.raises(ConfigError) as caught:
        _trainer(model=model, train_dataloader=_ids_loader())
    message = str(caught.value)
    assert named in message
    assert (
        "Fix: `sparse=False`" in message
        and "`torch.optim.Adam` or `AdamW` in place of `SparseAdam`" in message
    )


def test_a_sparse_embedding_bag_is_refused_and_dense_lookups_train():
    model = _Lookup(sparse=(False,))
    model.bag.sparse = True
    with pytest.raises(ConfigError, match=r"`bag` \(EmbeddingBag\) has `sparse=True`"):
        _trainer(model=model, train_dataloader=_ids_loader())
    model.bag.sparse = False  # the same model with dense gradients trains
    result = _trainer(model=model, train_dataloader=_ids_loader(), max_steps=2).fit()
    assert result.skipped_steps == 0 and len(result.history) >= 1
