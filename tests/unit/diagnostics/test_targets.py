"""First-batch checks: non-finite inputs, targets a loss cannot take, and a wrong start, each
on a realistic mistake, and no finding at all on healthy first batches."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from safeloop.diagnostics.initial_loss import ACTIVATION_LOSS_MISMATCH, check_initial_loss
from safeloop.diagnostics.targets import RAISED_CODES, check_inputs, check_targets


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fresh_classifier(features: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a freshly initialised 2-layer MLP on standardised inputs, and valid labels."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, classes))
    x = torch.randn(32, features, generator=_gen(seed))
    y = torch.randint(0, classes, (32,), generator=_gen(seed))
    with torch.no_grad():
        return model(x), y


def _all_checks(loss_fn, outputs, targets):
    found = check_targets(loss_fn, outputs, targets)
    found += check_initial_loss(loss_fn, outputs, targets, float(loss_fn(outputs, targets)))
    return found


# -- target-out-of-range -------------------------------------------------------------------


def test_labels_numbered_from_one_with_cross_entropy():
    outputs = torch.randn(16, 5, generator=_gen())
    targets = torch.arange(16) % 5 + 1  # 1..5, as in a CSV with classes numbered from 1
    [finding] = check_targets(nn.CrossEntropyLoss(), outputs, targets)
    assert finding.code == "target-out-of-range" and finding.code in RAISED_CODES
    assert finding.severity == "error"
    assert "from 1 to 5" in finding.message and "5 classes" in finding.message
    assert "0..4" in finding.message and "3 of 16" in finding.message
    assert "1..5 instead of 0..4" in finding.message
    assert "`targets - 1`" in finding.suggestion


def test_more_labels_than_output_units():
    outputs = torch.randn(8, 3, generator=_gen())
    targets = torch.tensor([0, 1, 2, 9, 4, 0, 1, 2])
    [finding] = check_targets(F.cross_entropy, outputs, targets)
    assert "`F.cross_entropy`" in finding.message
    assert "at least 10 classes" in finding.message and "2 of 8" in finding.message


def test_ignore_index_is_not_out_of_range():
    # token classification: (N, C, T) logits, (N, T) labels padded with -100
    outputs = torch.randn(4, 7, 12, generator=_gen())
    targets = torch.randint(0, 7, (4, 12), generator=_gen())
    targets[:, 8:] = -100
    assert _all_checks(nn.CrossEntropyLoss(), outputs, targets) == []
    assert check_targets(nn.NLLLoss(), outputs.log_softmax(1), targets) == []
    minus_one = targets.masked_fill(targets == -100, -1)
    assert check_targets(functools.partial(F.cross_entropy, ignore_index=-1), outputs, minus_one) == []
    [finding] = check_targets(nn.CrossEntropyLoss(), outputs, minus_one)
    assert "negative labels (-1)" in finding.message and "`ignore_index=-1`" in finding.suggestion


def test_single_output_unit_with_cross_entropy():
    [finding] = check_targets(nn.CrossEntropyLoss(), torch.randn(8, 1), torch.tensor([0, 1] * 4))
    assert "single output unit" in finding.message and "BCEWithLogitsLoss" in finding.suggestion


def test_sequence_logits_in_wrong_layout_are_left_to_torch():
    # (N, T, C) logits: the shape error is torch's to report; reading C from dim 1 would mislead
    outputs = torch.randn(4, 12, 50, generator=_gen())
    targets = torch.randint(0, 50, (4, 12), generator=_gen())
    assert check_targets(nn.CrossEntropyLoss(), outputs, targets) == []


def test_bce_with_masks_stored_as_0_255():
    outputs = torch.randn(4, 1, 8, 8, generator=_gen())
    targets = (torch.rand(4, 1, 8, 8, generator=_gen()) > 0.5).float() * 255
    [finding] = check_targets(nn.BCEWithLogitsLoss(), outputs, targets)
    assert finding.code == "target-out-of-range"
    assert "from 0 to 255" in finding.message and "8-bit" in finding.message
    assert "Divide them by 255" in finding.suggestion


def test_bce_with_minus_one_plus_one_labels():
    targets = torch.tensor([-1.0, 1.0] * 8).unsqueeze(1)
    [finding] = check_targets(nn.BCELoss(), torch.rand(16, 1), targets)
    assert "{-1, 1}" in finding.message and "(targets + 1) / 2" in finding.suggestion


def test_cross_entropy_probability_targets_must_be_in_unit_range():
    outputs = torch.randn(8, 4, generator=_gen())
    assert check_targets(nn.CrossEntropyLoss(), outputs, torch.full((8, 4), 0.25)) == []
    [finding] = check_targets(nn.CrossEntropyLoss(), outputs, torch.full((8, 4), 2.0))
    assert "class probabilities" in finding.message


# -- target-scale --------------------------------------------------------------------------


def test_house_prices_with_mse():
    prices = 3e5 + 1e5 * torch.randn(64, 1, generator=_gen())
    [finding] = check_targets(nn.MSELoss(), torch.randn(64, 1), prices)
    assert finding.code == "target-scale" and finding.severity == "warning"
    assert f"mean {float(prices.mean()):.4g}" in finding.message
    assert f"std {float(prices.std(correction=0)):.4g}" in finding.message
    assert "(y - mean) / std" in finding.suggestion and "pred * std + mean" in finding.suggestion


@pytest.mark.parametrize("loss_fn", [nn.L1Loss(), nn.SmoothL1Loss(), nn.HuberLoss(), F.l1_loss])
def test_large_offset_with_l1_type_losses(loss_fn):
    kelvin = 300 + 0.5 * torch.randn(64, generator=_gen())  # mean ~600x the std
    [finding] = check_targets(loss_fn, torch.randn(64), kelvin)
    assert finding.code == "target-scale" and "times their std" in finding.message
    assert "one learning rate per step" in finding.message


def test_standardised_regression_is_quiet():
    targets = torch.randn(64, 3, generator=_gen())
    assert _all_checks(nn.MSELoss(), torch.randn(64, 3, generator=_gen(1)), targets) == []


# -- initial loss --------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [2, 10, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fresh_classifier_is_quiet(classes, seed):
    logits, labels = _fresh_classifier(20, classes, seed)
    assert _all_checks(nn.CrossEntropyLoss(), logits, labels) == []
    assert _all_checks(nn.NLLLoss(), logits.log_softmax(1), labels) == []
    binary = torch.randint(0, 2, logits.shape, generator=_gen(seed)).float()
    assert _all_checks(nn.BCEWithLogitsLoss(), logits, binary) == []


def test_logits_in_unit_range_that_do_not_sum_to_one_are_fine():
    logits = torch.rand(32, 10, generator=_gen())
    labels = torch.randint(0, 10, (32,), generator=_gen())
    assert _all_checks(nn.CrossEntropyLoss(), logits, labels) == []


def test_softmax_before_cross_entropy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.Softmax(dim=1))
    outputs = model(torch.randn(32, 20, generator=_gen()))
    labels = torch.randint(0, 10, (32,), generator=_gen())
    loss = float(nn.CrossEntropyLoss()(outputs, labels).detach())
    [finding] = check_initial_loss(nn.CrossEntropyLoss(), outputs, labels, loss)
    assert finding.code == ACTIVATION_LOSS_MISMATCH and finding.severity == "warning"
    assert "probabilities" in finding.message and f"ln(10) = {math.log(10):.3g}" in finding.message
    assert "Remove the final softmax" in finding.suggestion
    # bf16 probabilities sum to 1 only within a few ulps; still recognised
    assert check_initial_loss(nn.CrossEntropyLoss(), outputs.bfloat16(), labels, loss)[0].code == (
        ACTIVATION_LOSS_MISMATCH
    )


def test_large_initial_logits():
    logits, labels = _fresh_classifier(20, 10, 0)
    logits = logits * 100
    loss = float(F.cross_entropy(logits, labels))
    [finding] = check_initial_loss(nn.CrossEntropyLoss(), logits, labels, loss)
    assert finding.code == "initial-loss-high"
    assert f"{loss:.4g}" in finding.message and "ln(10)" in finding.message
    assert "max |logit|" in finding.message


def test_nll_without_log_softmax():
    logits, labels = _fresh_classifier(20, 10, 0)
    [raw] = check_initial_loss(nn.NLLLoss(), logits, labels, float(F.nll_loss(logits, labels)))
    assert raw.code == ACTIVATION_LOSS_MISMATCH and "log_softmax is missing" in raw.message
    probs = logits.softmax(1)
    [soft] = check_initial_loss(nn.NLLLoss(), probs, labels, float(F.nll_loss(probs, labels)))
    assert "are probabilities" in soft.message and "log_softmax" in soft.suggestion


def test_sigmoid_before_bce_with_logits():
    logits, _ = _fresh_classifier(20, 4, 0)
    targets = torch.randint(0, 2, logits.shape, generator=_gen()).float()
    probs = torch.sigmoid(logits)
    [finding] = check_initial_loss(nn.BCEWithLogitsLoss(), probs, targets, 0.7)
    assert finding.code == ACTIVATION_LOSS_MISMATCH and "applied twice" in finding.message
    # too few values to tell a sigmoid from chance
    assert check_initial_loss(nn.BCEWithLogitsLoss(), probs[:2, :2], targets[:2, :2], 0.7) == []


def test_unknown_losses_give_nothing():
    logits, labels = _fresh_classifier(20, 10, 0)
    custom = lambda out, y: F.cross_entropy(out, y)  # noqa: E731
    assert check_targets(custom, logits, labels + 1) == []
    assert check_initial_loss(custom, logits.softmax(1), labels, 2.3) == []


# -- nonfinite-input -----------------------------------------------------------------------


def test_nan_in_pixel_values():
    pixels = torch.randn(8, 3, 4, 4, generator=_gen())
    pixels[2, 0, 1, 1] = float("nan")
    pixels[5, 1, 0, 0] = float("nan")
    pixels[5, 2, 0, 0] = float("inf")
    batch = {"pixel_values": pixels, "labels": torch.arange(8)}
    [finding] = check_inputs(batch)
    assert finding.code == "nonfinite-input" and finding.severity == "error"
    assert finding.code not in RAISED_CODES
    assert finding.params == ("batch['pixel_values']",)
    assert "3 non-finite values of 384 (2 NaN, 1 Inf) in 2 of 8 samples" in finding.message


def test_nan_in_regression_targets_of_a_tuple_batch():
    targets = torch.tensor([1.0, float("nan"), 2.0])
    [finding] = check_inputs((torch.randn(3, 4), targets))
    assert finding.params == ("batch[1]",)


def test_healthy_batches_have_finite_inputs():
    tokens = {
        "input_ids": torch.randint(0, 30000, (4, 16)),
        "attention_mask": torch.ones(4, 16, dtype=torch.long),
        "labels": torch.randint(0, 2, (4,)),
    }
    assert check_inputs(tokens) == []
    assert check_inputs((torch.randn(4, 3, 8, 8), torch.arange(4))) == []
