"""The target checks of a model that computes its own loss, on hand-made tensors and tiny modules."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from safeloop.diagnostics.first_batch import RAISED_CODES
from safeloop.diagnostics.own_loss import OwnLossCheck, explain_nonfinite_first_loss, own_targets
from safeloop.diagnostics.targets import NO_TARGET_TOKENS, check_targets


class TinyForSequenceClassification(nn.Module):
    """Named like a Hugging Face classifier, with the config fields the check reads."""

    def __init__(self, classes: int = 3, problem_type: str | None = None) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_labels=classes, problem_type=problem_type)
        self.head = nn.Linear(4, classes)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        return {"logits": self.head(input_ids)}


def test_own_targets_keeps_integer_targets_under_the_conventions_only():
    batch = {"input_ids": torch.ones(2, 4), "labels": torch.tensor([0, 1]), "label": torch.tensor([0.5, 1.0])}
    assert list(own_targets(batch)) == ["labels"]
    assert own_targets((torch.ones(2), torch.tensor([0, 1]))) == {}


def test_labels_past_num_labels_are_caught_before_the_forward_from_the_config():
    batch = {"input_ids": torch.ones(4, 4), "labels": torch.tensor([1, 2, 3, 3])}
    [finding] = OwnLossCheck(TinyForSequenceClassification(3), batch).before_forward()
    assert finding.code == "target-out-of-range" and finding.code in RAISED_CODES
    assert "`config.num_labels`" in finding.message and "2 of 4 targets" in finding.message


def test_a_regression_head_and_ignored_labels_give_no_finding():
    batch = {"input_ids": torch.ones(4, 4), "labels": torch.tensor([0, 1, 2, 1])}
    assert OwnLossCheck(TinyForSequenceClassification(3, "regression"), batch).before_forward() == []
    batch["labels"] = torch.tensor([0, -100, 2, -100])
    assert OwnLossCheck(TinyForSequenceClassification(3), batch).before_forward() == []


def test_every_label_masked_is_no_target_tokens_with_the_share():
    batch = {"input_ids": torch.ones(4, 4), "labels": torch.full((4,), -100)}
    check = OwnLossCheck(TinyForSequenceClassification(3), batch)
    [finding] = check.before_forward()
    assert finding.code == NO_TARGET_TOKENS and finding.severity == "error"
    assert "4 of 4 targets (100%) are the ignore index -100" in finding.message and check.masked


def test_cross_entropy_loss_fn_with_every_target_ignored_is_no_target_tokens_not_raised():
    [finding] = check_targets(nn.CrossEntropyLoss(), torch.randn(8, 3), torch.full((8,), -100))
    assert finding.code == NO_TARGET_TOKENS and finding.code not in RAISED_CODES


def test_an_infinite_first_loss_from_finite_probabilities_is_a_log_of_zero():
    model = nn.Linear(2, 2)
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    [finding] = explain_nonfinite_first_loss(math.inf, {"x": torch.ones(2, 2)}, {"probs": probs}, model)
    assert finding.code == "nonfinite-loss" and finding.step == 0
    assert "log of zero" in finding.message and "holds 1 exact zeros" in finding.message
    assert "no learning rate" in finding.message


def test_a_nan_first_loss_over_an_empty_tensor_is_an_empty_reduction():
    model = nn.Linear(2, 2)
    batch = {"x": torch.ones(2, 2), "mask": torch.ones(0)}
    [finding] = explain_nonfinite_first_loss(math.nan, batch, {"logits": torch.zeros(2, 2)}, model)
    assert "`batch['mask']` is empty" in finding.message


def test_no_explanation_when_the_loss_is_finite_an_output_is_not_or_the_targets_explain_it():
    model = nn.Linear(2, 2)
    batch = {"x": torch.ones(2, 2)}
    assert explain_nonfinite_first_loss(1.0, batch, {"logits": torch.zeros(2)}, model) == []
    bad = {"logits": torch.tensor([math.nan, 0.0])}
    assert explain_nonfinite_first_loss(math.nan, batch, bad, model) == []
    assert explain_nonfinite_first_loss(math.nan, batch, {}, model, masked=True) == []
