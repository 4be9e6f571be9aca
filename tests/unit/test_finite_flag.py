"""The guard's finite flag: one isfinite over ``loss + 0 * norm`` must see a bad value in either."""

from __future__ import annotations

import pytest
import torch

from safeloop.guards.nonfinite import finite_flag

INF, NAN, HUGE = float("inf"), float("nan"), 3.0e38  # HUGE: finite, but HUGE + HUGE overflows


@pytest.mark.parametrize("loss", [1.0, HUGE, -2.5, INF, -INF, NAN])
@pytest.mark.parametrize("norm", [0.0, 2.0, HUGE, INF, NAN])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_flag_is_one_exactly_when_both_values_are_finite(loss, norm, dtype):
    loss_t = torch.tensor(loss).to(dtype) if abs(loss) != HUGE else torch.tensor(loss)
    flag = finite_flag(loss_t, torch.tensor(norm))
    expected = int(torch.isfinite(loss_t).item() and torch.isfinite(torch.tensor(norm)).item())
    assert flag.dtype == torch.float32 and flag.dim() == 0
    assert int(flag) == expected


def test_a_loss_with_elements_is_finite_only_when_every_element_is():
    assert int(finite_flag(torch.tensor([1.0, 2.0]), torch.tensor(1.0))) == 1
    assert int(finite_flag(torch.tensor([1.0, NAN]), torch.tensor(1.0))) == 0
