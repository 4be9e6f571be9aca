"""What a new user trips over gets a message that says what happened, where, the value seen, the
likely cause and the fix: a DataLoader of strings, a batch key ``forward`` does not take, a
misspelt keyword, an Accelerator's own gradient accumulation, and a NaN sample of a shuffled
loader (named by its dataset index)."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from safeloop import ConfigError, SafeTrainer
from tests.helpers.models import DictModel, classification_data, mlp, state_equal


def _trainer(model: nn.Module, data: DataLoader, **kwargs) -> SafeTrainer:
    kwargs.setdefault("progress_bar", False)
    kwargs.setdefault("summary", False)
    return SafeTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, **kwargs)


def _fit_refused(trainer: SafeTrainer, model: nn.Module) -> ConfigError:
    """``fit`` must raise a ConfigError at the first batch, before any update."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as excinfo:
        trainer.fit()
    assert state_equal(before, model.state_dict()) and trainer.global_step == 0
    return excinfo.value


class _Reviews(Dataset):
    """``(text, label)`` pairs, as a first text-classification notebook builds them."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[str, int]:
        return f"review {i}: this film was a complete waste of two hours of my life", i % 2


# -- 1. a DataLoader of strings -------------------------------------------------------------------


def test_text_label_pairs_say_the_batch_holds_text_where_and_to_tokenise_it():
    model = nn.Sequential(nn.Linear(8, 2))
    trainer = _trainer(model, DataLoader(_Reviews(), batch_size=4), loss_fn=nn.CrossEntropyLoss())
    error = _fit_refused(trainer, model)
    message = str(error)
    assert message.startswith(
        "`model(inputs)` raised TypeError: the batch holds text: `batch[0]` is a tuple of 4 str"
    )
    assert "e.g. 'review 0: this film was a complete wa...'" in message  # shortened example value
    assert "Models take tensors" in message and "tokenise the text and return tensors" in message
    assert "collate_fn=collate" in message and 'return_tensors="pt"' in message  # the example
    assert isinstance(error.__cause__, TypeError) and "must be Tensor" in str(error.__cause__)
    assert "must be Tensor" in message  # torch's own words are kept at the end


def test_a_dataset_of_raw_strings_names_the_whole_batch_before_the_model_runs():
    model = mlp()
    texts = [f"sentence number {i}" for i in range(8)]
    message = str(_fit_refused(_trainer(model, DataLoader(texts, batch_size=4), loss_fn=nn.MSELoss()), model))
    assert message.startswith("The batch holds text: `batch` is a list of 4 str, e.g. 'sentence number 0'")
    assert "tokenise the text and return tensors" in message
    assert "return both from the dataset" in message  # no targets either


def test_label_names_as_strings_say_to_map_them_to_class_indices():
    class Named(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
            return torch.randn(8), ("cat", "dog", "bird")[i % 3]

    model = mlp()
    trainer = _trainer(model, DataLoader(Named(), batch_size=4), loss_fn=nn.CrossEntropyLoss())
    message = str(_fit_refused(trainer, model))
    assert "`loss_fn(outputs, targets)` raised" in message
    assert "`batch[1]` is a tuple of 4 str, e.g. 'cat'" in message
    assert "Losses take class indices, not label names" in message


def test_pil_images_say_to_convert_them_in_the_transform():
    image = type("Image", (), {"__module__": "PIL.Image", "mode": "RGB", "size": (32, 32)})

    def collate(samples):  # a custom collate that leaves the images as they are
        return [image() for _ in samples], torch.zeros(len(samples), dtype=torch.long)

    model = mlp()
    data = DataLoader(classification_data(n=8), batch_size=4, collate_fn=collate)
    message = str(_fit_refused(_trainer(model, data, loss_fn=nn.CrossEntropyLoss()), model))
    assert "the batch holds PIL images: `batch[0]` is a list of 4 PIL images" in message
    assert "(mode RGB, size (32, 32))" in message and "transforms.ToTensor()" in message


def test_a_raw_text_column_next_to_tokenised_ids_says_to_drop_it():
    class Tokenised(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, object]:
            return {"text": f"review {i}", "input_ids": torch.randn(8), "labels": i % 3}

    model = DictModel()
    message = str(_fit_refused(_trainer(model, DataLoader(Tokenised(), batch_size=4)), model))
    assert (
        "`model(**batch)` raised TypeError: the batch holds text: `batch['text']` is a list of 4 str"
        in message
    )
    assert "The batch also holds tensors `forward` takes (`input_ids`, `labels`)" in message
    assert "drop the raw column `text` from the batch" in message


@pytest.mark.parametrize("missing", [0, 2])  # torch's collate refuses it with a TypeError, a RuntimeError
def test_a_sample_holding_none_names_what_the_default_collate_refused_and_the_fix(missing):
    class Missing(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> tuple[torch.Tensor, object]:
            return torch.randn(8), None if i == missing else 1  # a missing label

    model = mlp()
    error = _fit_refused(
        _trainer(model, DataLoader(Missing(), batch_size=4), loss_fn=nn.CrossEntropyLoss()), model
    )
    assert "could not collate a training batch: a sample holds a `NoneType`" in str(error)
    assert "The dataset returned None" in str(error) and isinstance(
        error.__cause__, (TypeError, RuntimeError)
    )


def test_a_model_that_takes_text_itself_trains_on_strings():
    class CharCounts(nn.Module):  # tokenises inside forward: strings are its input
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(1, 2)

        def forward(self, texts: tuple[str, ...]) -> torch.Tensor:
            return self.head(torch.tensor([[len(t) / 100.0] for t in texts]))

    result = _trainer(CharCounts(), DataLoader(_Reviews(), batch_size=4), loss_fn=nn.CrossEntropyLoss()).fit()
    assert result.global_step == 2


# -- 2. a mapping batch whose keys forward does not take ------------------------------------------


class _Keyed(Dataset):
    def __init__(self, key: str) -> None:
        self.key = key
        self.base = classification_data(n=8)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.base[i]
        return {"input_ids": x, self.key: y}


@pytest.mark.parametrize("key", ["label", "target", "labels_ids"])
def test_a_label_key_forward_does_not_take_names_it_the_parameters_and_the_rename(key):
    model = DictModel()
    error = _fit_refused(_trainer(model, DataLoader(_Keyed(key), batch_size=4)), model)
    message = str(error)
    assert f"DictModel.forward() got an unexpected keyword argument '{key}'" in message
    assert "its keys must match the parameter names of `DictModel.forward(input_ids" in message
    assert f"the batch's key `{key}` is none of them" in message
    assert f"The batch's keys: `input_ids`, `{key}`" in message
    assert f"Rename `{key}` to `labels`" in message and f'batch["labels"] = batch.pop("{key}")' in message
    assert isinstance(error.__cause__, TypeError)


def test_a_key_with_no_close_parameter_says_to_remove_it():
    model = DictModel()
    message = str(_fit_refused(_trainer(model, DataLoader(_Keyed("sample_weight"), batch_size=4)), model))
    assert "the batch's key `sample_weight` is none of them" in message
    assert "Remove `sample_weight` from the batch" in message and "training_step=" in message


def test_a_type_error_raised_inside_forward_is_left_alone():
    class Broken(DictModel):
        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
            return super().forward(input_ids, labels=labels, extra=1)  # the model's own bug

    with pytest.raises(TypeError, match="unexpected keyword argument 'extra'") as excinfo:
        _trainer(Broken(), DataLoader(_Keyed("labels"), batch_size=4)).fit()
    assert not isinstance(excinfo.value, ConfigError)


# -- 3. a misspelt keyword argument ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "hint"),
    [
        ("max_epoch", "did you mean `max_epochs`?"),
        ("log_evry", "did you mean `log_every`?"),
        ("clip_grad", "did you mean `clip_grad_norm` or `clip_grad_value`?"),
        ("lr", "the learning rate is set on the optimizer: `torch.optim.AdamW(model.parameters(), lr=...)`."),
    ],
)
def test_a_misspelt_keyword_is_a_type_error_naming_the_closest_accepted_one(given, hint):
    model = mlp()
    with pytest.raises(TypeError) as excinfo:
        _trainer(model, DataLoader(classification_data(n=8)), **{given: 2})
    assert not isinstance(excinfo.value, ConfigError)  # Python's convention for a bad keyword
    assert str(excinfo.value) == f"SafeTrainer got an unexpected keyword argument '{given}'; {hint}"


def test_a_keyword_with_nothing_close_lists_the_accepted_ones_and_the_signature_stays_real():
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'wandb_project'\. It accepts: model, "):
        _trainer(mlp(), DataLoader(classification_data(n=8)), wandb_project="x")
    parameters = inspect.signature(SafeTrainer).parameters
    assert "max_epochs" in parameters and parameters["max_epochs"].default == 1
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in parameters.values())


# -- 4. the Accelerator's own gradient accumulation -----------------------------------------------


def _count_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    inner = optimizer
    while hasattr(inner, "optimizer"):  # Accelerate's wrapper
        inner = inner.optimizer
    steps: list[int] = []
    inner.register_step_post_hook(lambda *_: steps.append(1))
    return steps


def test_an_accelerators_accumulation_is_used_logged_and_applied(caplog):
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)  # already prepared, as in many scripts
    data = DataLoader(classification_data(n=8), batch_size=1)  # 8 micro-batches
    with caplog.at_level(logging.INFO, logger="safeloop"):
        trainer = SafeTrainer(
            model, optimizer, data, loss_fn=nn.CrossEntropyLoss(), accelerator=accelerator,
            progress_bar=False, summary=False,
        )  # fmt: skip
    assert "your Accelerator's gradient_accumulation_steps=2 is used" in caplog.text
    assert trainer.config.gradient_accumulation_steps == 2
    steps = _count_steps(trainer.optimizer)
    assert trainer.fit().global_step == 4 and len(steps) == 4  # 8 micro-batches, 2 per step


def test_accumulation_set_on_both_and_different_names_both_values_and_the_fix():
    accelerator = Accelerator(gradient_accumulation_steps=2)
    with pytest.raises(ConfigError) as excinfo:
        _trainer(
            mlp(), DataLoader(classification_data(n=8)), loss_fn=nn.CrossEntropyLoss(),
            accelerator=accelerator, gradient_accumulation_steps=4,
        )  # fmt: skip
    message = str(excinfo.value)
    assert "`gradient_accumulation_steps=4` disagrees with the given accelerator's 2" in message
    assert "leave `gradient_accumulation_steps` unset to use the Accelerator's 2" in message


def test_an_optimizer_prepared_by_an_accelerator_not_given_is_refused_instead_of_losing_accumulation():
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ConfigError) as excinfo:
        SafeTrainer(model, optimizer, DataLoader(classification_data(n=8)), loss_fn=nn.CrossEntropyLoss())
    message = str(excinfo.value)
    assert "already prepared by an Accelerator with gradient_accumulation_steps=2" in message
    assert "its own Accelerator with gradient_accumulation_steps=1" in message
    assert "Pass that Accelerator as `accelerator=`" in message


# -- 5. a NaN sample of a shuffled loader, by dataset index ---------------------------------------


class _OneBadSample(Dataset):
    def __init__(self, bad: tuple[int, ...] = (37,)) -> None:
        self.x, self.y = classification_data(n=64).tensors
        self.x = self.x.clone()
        for index in bad:
            self.x[index, 1] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def _nan_run(data: DataLoader) -> tuple[str, dict, str]:
    result = _trainer(mlp(), data, loss_fn=nn.CrossEntropyLoss(), seed=3).fit()
    finding = next(f for f in result.findings if f.code == "nonfinite-input")
    origin = next(e for e in result.events if e.kind == "skip").detail["origin"]
    return finding.message, origin, finding.suggestion


@pytest.mark.parametrize("workers", [0, 2])
def test_a_nan_sample_of_a_shuffled_loader_is_named_by_its_dataset_index(workers):
    data = DataLoader(_OneBadSample(), batch_size=8, shuffle=True, num_workers=workers)
    message, origin, suggestion = _nan_run(data)
    assert origin["dataset_indices"] == [37] and origin["where"] == "batch[0]"
    row, batch = origin["rows"][0], origin["batch_idx"]
    assert batch != 4 or row != 5  # shuffled: not where an ordered loader puts sample 37
    assert f"sample {row} of batch {batch} (dataset index 37) holds 1 NaN/Inf values in batch[0]" in message
    assert "so the loss was nan" in message and "`dataset[37]`" in suggestion


def test_several_nan_samples_are_all_named_and_a_first_batch_finding_gets_the_index_too():
    data = DataLoader(_OneBadSample(bad=(5, 37, 40)), batch_size=64, shuffle=True)  # one batch
    message, origin, _ = _nan_run(data)
    assert sorted(origin["dataset_indices"]) == [5, 37, 40] and len(origin["rows"]) == 3
    assert "in the first batch" in message  # the first-batch check's finding, completed by the replay
    assert "Skipped step 1: samples" in message and "of batch 0 (dataset indices" in message
    assert "hold 3 NaN/Inf values in batch[0]" in message


def test_an_iterable_dataset_says_it_has_no_dataset_index_instead_of_guessing():
    class Stream(IterableDataset):
        def __iter__(self):
            data = _OneBadSample()
            return iter(data[i] for i in range(len(data)))

    message, origin, _ = _nan_run(DataLoader(Stream(), batch_size=8))
    assert origin["dataset_indices"] is None and origin["rows"] == [5]
    assert "sample 5 of batch 4 holds 1 NaN/Inf values in batch[0]" in message
    assert "(no dataset index: the dataset is an IterableDataset, whose samples have no index)" in message
