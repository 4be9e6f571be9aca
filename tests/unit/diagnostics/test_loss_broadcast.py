"""``loss-broadcast``: a loss that compares every prediction with every target, on the shapes a
regression gets wrong ((B, 1) against (B,) and back), through recognised losses, a
``functools.partial``, a lambda and a custom module, and torch's own warning; no finding where the
shapes are equal or differ by design."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from safeloop.diagnostics.broadcast import LOSS_BROADCAST, check_broadcast, from_warnings
from safeloop.results import Finding


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check(loss_fn, outputs: torch.Tensor, targets: torch.Tensor) -> list[Finding]:
    """``check_broadcast`` as the trainer calls it: after the loss, with its value (torch's
    broadcasting warning is the session's business, silenced here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(loss_fn(outputs, targets))
    return check_broadcast(loss_fn, outputs, targets, value)


def _aligned(loss_fn, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return float(loss_fn(outputs.reshape(targets.shape), targets))


def _assert_broadcast(finding: Finding, outputs: torch.Tensor, targets: torch.Tensor, name: str) -> None:
    assert finding.code == LOSS_BROADCAST == "loss-broadcast"
    assert finding.severity == "warning" and finding.step == 0
    assert f"`{name}`" in finding.message
    assert f"outputs of shape {tuple(outputs.shape)}" in finding.message
    assert f"targets of shape {tuple(targets.shape)}" in finding.message
    shape = torch.broadcast_shapes(outputs.shape, targets.shape)
    assert f"broadcast to {tuple(shape)}" in finding.message
    assert f"{shape.numel()} pairs instead of {targets.numel()}" in finding.message
    assert "every prediction with every target" in finding.message


# -- recognised regression losses: judged by the shapes ------------------------------------


def test_mse_with_a_single_unit_head_against_flat_targets():
    outputs, targets = torch.randn(16, 1, generator=_gen(0)), torch.randn(16, generator=_gen(1))
    loss_fn = nn.MSELoss()
    [finding] = _check(loss_fn, outputs, targets)
    _assert_broadcast(finding, outputs, targets, "MSELoss")
    # what the broadcast computes: each of the 16 outputs against each of the 16 targets
    seen = float(((outputs - targets.unsqueeze(0)) ** 2).mean())
    aligned = _aligned(loss_fn, outputs, targets)
    assert f"the loss is {seen:.4g}, and {aligned:.4g} with the shapes aligned" in finding.message
    assert "one output unit" in finding.message
    assert "`loss_fn(outputs.squeeze(-1), targets)`" in finding.suggestion
    assert "`loss_fn(outputs, targets.unsqueeze(-1))`" in finding.suggestion


def test_l1_with_flat_outputs_against_column_targets():
    outputs, targets = torch.randn(8, generator=_gen(0)), torch.randn(8, 1, generator=_gen(1))
    [finding] = _check(nn.L1Loss(), outputs, targets)
    _assert_broadcast(finding, outputs, targets, "L1Loss")
    assert "(8, 8)" in finding.message and "stored as a column (8, 1)" in finding.message
    assert "`loss_fn(outputs, targets.squeeze(-1))`" in finding.suggestion


def test_smooth_l1_through_functools_partial():
    loss_fn = functools.partial(F.smooth_l1_loss, beta=0.5)
    outputs, targets = torch.randn(12, 1, generator=_gen(0)), torch.randn(12, generator=_gen(1))
    [finding] = _check(loss_fn, outputs, targets)
    _assert_broadcast(finding, outputs, targets, "F.smooth_l1_loss")
    assert f"{_aligned(loss_fn, outputs, targets):.4g} with the shapes aligned" in finding.message


def test_huber_with_reduction_none_is_judged_by_the_shapes_alone():
    # no single loss value to compare: the recognised loss is still known to broadcast
    outputs, targets = torch.randn(6, 1, generator=_gen(0)), torch.randn(6, generator=_gen(1))
    [finding] = check_broadcast(nn.HuberLoss(reduction="none"), outputs, targets, None)
    _assert_broadcast(finding, outputs, targets, "HuberLoss")
    assert "the loss is" not in finding.message


def test_a_column_of_targets_spread_over_several_outputs_is_not_reported():
    # (B, 3) against (B, 1) broadcasts to (B, 3), the outputs' own shape: one target per sample
    # compared with each of 3 outputs, which a multi-output regression may do on purpose. Only a
    # broadcast shape larger than BOTH inputs (every prediction against every target) is reported.
    outputs, targets = torch.randn(8, 3, generator=_gen(0)), torch.randn(8, 1, generator=_gen(1))
    assert _check(nn.HuberLoss(), outputs, targets) == []


# -- any other loss: judged by its value once the shapes are aligned -----------------------


def test_a_lambda_squared_error_broadcasts_silently():
    loss_fn = lambda o, y: ((o - y) ** 2).mean()  # noqa: E731  (as users write it)
    outputs, targets = torch.randn(10, 1, generator=_gen(0)), torch.randn(10, generator=_gen(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch says nothing here: only the check does
        value = float(loss_fn(outputs, targets))
    [finding] = check_broadcast(loss_fn, outputs, targets, value)
    line = loss_fn.__code__.co_firstlineno
    _assert_broadcast(finding, outputs, targets, f"<lambda> at test_loss_broadcast.py:{line}")
    assert f"the loss is {value:.4g}, and {_aligned(loss_fn, outputs, targets):.4g}" in finding.message


class WeightedMSE(nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.weight * (outputs - targets).pow(2).mean()


def test_a_custom_loss_module():
    outputs, targets = torch.randn(6, generator=_gen(0)), torch.randn(6, 1, generator=_gen(1))
    [finding] = _check(WeightedMSE(2.0), outputs, targets)
    _assert_broadcast(finding, outputs, targets, "WeightedMSE")
    assert "(6, 6)" in finding.message
    assert "`loss_fn(outputs, targets.squeeze(-1))`" in finding.suggestion


def test_other_layouts_of_the_same_values_get_a_view():
    outputs, targets = torch.randn(1, 6, generator=_gen(0)), torch.randn(6, 1, generator=_gen(1))
    [finding] = _check(WeightedMSE(1.0), outputs, targets)
    assert "(6, 6)" in finding.message and "`loss_fn(outputs, targets.view(1, 6))`" in finding.suggestion


def test_a_lambda_that_aligns_the_shapes_itself_is_quiet():
    loss_fn = lambda o, y: F.mse_loss(o.squeeze(-1), y)  # noqa: E731
    assert _check(loss_fn, torch.randn(10, 1, generator=_gen(0)), torch.randn(10, generator=_gen(1))) == []


def test_a_custom_loss_that_fails_on_aligned_shapes_is_quiet():
    def loss_fn(outputs, targets):
        assert outputs.dim() == 2, "expects (B, 1)"
        return (outputs.squeeze(-1) - targets).abs().mean()

    assert _check(loss_fn, torch.randn(10, 1, generator=_gen(0)), torch.randn(10, generator=_gen(1))) == []


# -- no finding --------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), F.l1_loss, lambda o, y: ((o - y) ** 2).mean()])
def test_equal_shapes_are_quiet(loss_fn):
    assert _check(loss_fn, torch.randn(16, 1, generator=_gen(0)), torch.randn(16, 1, generator=_gen(1))) == []


def test_cross_entropy_logits_against_class_indices_are_quiet():
    outputs, targets = torch.randn(16, 5, generator=_gen(0)), torch.randint(0, 5, (16,), generator=_gen(1))
    assert _check(nn.CrossEntropyLoss(), outputs, targets) == []
    custom = lambda o, y: F.cross_entropy(o, y, label_smoothing=0.1)  # noqa: E731
    assert _check(custom, outputs, targets) == []  # different numbers of elements: skipped


def test_a_single_unit_cross_entropy_is_left_to_target_checks():
    # (B, 1) logits against (B,) labels has equal counts, but it is target-out-of-range's case
    outputs, targets = torch.randn(8, 1, generator=_gen(0)), torch.zeros(8, dtype=torch.long)
    assert check_broadcast(nn.CrossEntropyLoss(), outputs, targets, 0.0) == []


def test_a_scalar_target_is_quiet():
    outputs = torch.randn(16, 1, generator=_gen(0))
    assert _check(nn.MSELoss(), outputs, torch.tensor(0.5)) == []
    assert _check(lambda o, y: ((o - y) ** 2).mean(), outputs, torch.tensor(0.5)) == []


def test_a_loss_whose_value_does_not_change_when_aligned_is_quiet():
    # a mean over everything is the same whatever the layout: nothing is compared pairwise
    loss_fn = lambda o, y: o.pow(2).mean() + 0 * y.mean()  # noqa: E731
    assert _check(loss_fn, torch.randn(10, 1, generator=_gen(0)), torch.randn(10, generator=_gen(1))) == []


def test_the_check_leaves_the_random_state_alone():
    loss_fn = lambda o, y: ((o - y) ** 2).mean() + 0 * torch.rand(())  # noqa: E731
    outputs, targets = torch.randn(10, 1, generator=_gen(0)), torch.randn(10, generator=_gen(1))
    value = float(loss_fn(outputs, targets))
    before = torch.get_rng_state()
    assert len(check_broadcast(loss_fn, outputs, targets, value)) == 1
    assert torch.equal(before, torch.get_rng_state())


# -- torch's warning (a training_step calling F.mse_loss itself) ----------------------------


def _record(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return caught


def test_torch_broadcasting_warning_becomes_a_finding_and_other_warnings_stay():
    outputs, targets = torch.randn(8, 1, generator=_gen(0)), torch.randn(8, generator=_gen(1))

    def step():
        warnings.warn("the user's own warning", UserWarning, stacklevel=1)
        F.l1_loss(outputs, targets)  # the line the finding must name

    caught = _record(step)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        [finding] = from_warnings(caught, [])
    assert [str(w.message) for w in shown] == ["the user's own warning"]
    _assert_broadcast(finding, outputs, targets, f"test_loss_broadcast.py:{caught[1].lineno}")
    assert "`loss(outputs.squeeze(-1), targets)`" in finding.suggestion


def test_the_warning_gives_no_second_finding_when_the_shape_check_found_it():
    outputs, targets = torch.randn(8, 1, generator=_gen(0)), torch.randn(8, generator=_gen(1))
    caught = _record(lambda: F.mse_loss(outputs, targets))
    [found] = _check(nn.MSELoss(), outputs, targets)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert from_warnings(caught, [found]) == []
    assert shown == []  # said once, as the finding


def test_a_deliberate_broadcast_keeps_torch_warning_and_gives_no_finding():
    outputs, targets = torch.randn(8, 3, generator=_gen(0)), torch.randn(8, 1, generator=_gen(1))
    caught = _record(lambda: F.mse_loss(outputs, targets))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert from_warnings(caught, []) == []
    assert len(shown) == 1 and "broadcasting" in str(shown[0].message)
