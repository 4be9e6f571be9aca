"""A loss that raises on outputs or targets of the wrong form gets a ConfigError naming the fix.

Each case is one mistake as a newcomer writes it, run through ``SafeTrainer`` (the error comes
from the first batch's loss, with torch's error as its cause), and the cases the explanation must
leave alone: a custom loss whose error is its own, and shapes that broadcast.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from safeloop import ConfigError, SafeTrainer
from safeloop.loss_errors import explain_loss_failure

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))


class _TupleModel(nn.Module):
    """Returns the logits and an auxiliary value, as many tutorials' models do."""

    def __init__(self, outputs: str = "tuple") -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.outputs = outputs

    def forward(self, x):
        logits = self.head(x)
        if self.outputs == "dict":
            return {"logits": logits, "features": x}
        return logits, logits.pow(2).mean()


def _raised(model: nn.Module, targets: torch.Tensor, loss_fn, **kwargs) -> ConfigError:
    loader = DataLoader(TensorDataset(X, targets), batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SafeTrainer(
        model, optimizer, loader, loss_fn=loss_fn, max_steps=2, progress_bar=False, summary=False, **kwargs
    )
    with pytest.raises(ConfigError) as info:
        trainer.fit()
    assert isinstance(info.value.__cause__, (RuntimeError, TypeError, ValueError)), "torch's error is kept"
    assert "torch's error:" in str(info.value)
    return info.value


def _linear(outputs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, outputs))


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), F.cross_entropy, nn.NLLLoss()])
def test_float_class_indices_name_long(loss_fn):
    error = _raised(_linear(), LABELS.float(), loss_fn)
    assert "class indices as integers (torch.int64)" in str(error) and "targets.long()" in str(error)
    assert "shape (16,), torch.float32" in str(error)


@pytest.mark.parametrize("targets", [LABELS[:, None], LABELS[:, None].float()])
def test_class_indices_in_a_column_name_squeeze(targets):
    error = _raised(_linear(), targets, nn.CrossEntropyLoss())
    assert "extra dimension of size 1" in str(error)
    fix = "targets.squeeze(1).long()" if targets.is_floating_point() else "targets.squeeze(1)`"
    assert fix in str(error)


@pytest.mark.parametrize(("outputs", "pick"), [("tuple", "outputs[0]"), ("dict", 'outputs["logits"]')])
def test_a_model_returning_more_than_its_logits_names_the_item(outputs, pick):
    error = _raised(_TupleModel(outputs), LABELS, nn.CrossEntropyLoss())
    assert "takes one tensor of predictions" in str(error) and pick in str(error)
    assert "training_step" in str(error)


def test_a_regression_loss_on_class_outputs_names_cross_entropy():
    error = _raised(_linear(3), torch.randn(64), nn.MSELoss())
    assert "3 outputs per sample" in str(error) and "CrossEntropyLoss" in str(error)
    assert "shape (16, 3)" in str(error) and "shape (16,)" in str(error)


def test_a_batch_merged_by_a_reshape_names_flatten():
    class Merged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(x.view(-1, 4))  # (16, 8) -> (32, 4): the batch is merged

    error = _raised(Merged(), LABELS, nn.CrossEntropyLoss())
    assert "hold 32 samples and the targets 16" in str(error) and "x.flatten(1)" in str(error)


@pytest.mark.parametrize(
    ("loss_fn", "outputs", "targets", "expected"),
    [
        (nn.BCEWithLogitsLoss(), 1, (LABELS > 0).long(), "outputs.squeeze(-1)` and `targets.float()"),
        (nn.BCEWithLogitsLoss(), 1, (LABELS > 0).float(), "outputs.squeeze(-1)"),
        (nn.BCELoss(), 1, (LABELS > 0).float(), "outputs.squeeze(-1)"),
    ],
)
def test_binary_targets_of_another_shape_or_dtype_name_the_fix(loss_fn, outputs, targets, expected):
    model = (
        nn.Sequential(_linear(outputs), nn.Sigmoid()) if isinstance(loss_fn, nn.BCELoss) else _linear(outputs)
    )
    error = _raised(model, targets, loss_fn)
    assert expected in str(error)


def test_integer_binary_targets_of_the_right_shape_name_float():
    model = nn.Sequential(_linear(1), nn.Flatten(0))
    error = _raised(model, (LABELS > 0).long(), nn.BCEWithLogitsLoss())
    assert "not torch.int64" in str(error) and "targets.float()" in str(error)


def test_the_explanation_is_given_with_diagnostics_off_too():
    error = _raised(_linear(), LABELS.float(), nn.CrossEntropyLoss(), diagnostics=False)
    assert "targets.long()" in str(error)


# -- what is left to torch's own error --------------------------------------------------------


def test_a_custom_loss_keeps_its_own_error():
    def custom(outputs, targets):
        _logits, _aux = outputs  # takes the tuple itself, then fails on something else
        raise ValueError("my loss needs a temperature")

    loader = DataLoader(TensorDataset(X, LABELS), batch_size=16)
    model = _TupleModel()
    trainer = SafeTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, loss_fn=custom,
                          max_steps=1, progress_bar=False, summary=False)  # fmt: skip
    with pytest.raises(ValueError, match="temperature"):
        trainer.fit()


def test_shapes_that_broadcast_or_a_different_error_are_not_explained():
    error = RuntimeError("something else")
    # broadcasting shapes: not a shape error of the regression loss
    explain_loss_failure(
        nn.MSELoss(), torch.zeros(4, 1), torch.zeros(4), error, "`loss_fn(outputs, targets)`"
    )
    # well-formed class targets: the error is not about their form
    explain_loss_failure(
        nn.CrossEntropyLoss(), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), error, "x"
    )
    # a loss not known here, tensor outputs
    explain_loss_failure(lambda o, t: o, torch.zeros(4, 3), torch.zeros(4), error, "x")


def test_a_wrapped_loss_is_looked_through():
    def wrapper(outputs, targets):
        return nn.CrossEntropyLoss()(outputs, targets)

    wrapper.__wrapped__ = nn.CrossEntropyLoss()  # what the first batch's checked loss sets
    with pytest.raises(ConfigError, match=r"targets\.long"):
        explain_loss_failure(wrapper, torch.zeros(4, 3), torch.zeros(4), RuntimeError("dtype"), "x")
