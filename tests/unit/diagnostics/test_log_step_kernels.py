"""The log step's kernels: weight and update norms by BLAS dot, rows with gradient by BLAS mv."""

from __future__ import annotations

import pytest
import torch

from safeloop.diagnostics.health import _rows_with_gradient
from safeloop.guards.clipping import squared_norms


def test_they_are_the_squared_l2_norms_of_every_dtype_and_shape():
    gen = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(64, 32, generator=gen),
        torch.randn(8, 3, 5, 5, generator=gen).double(),
        torch.randn(40, 30, generator=gen).t(),  # not contiguous
        (torch.randn(50, generator=gen) * 200).to(torch.bfloat16),  # squares past bf16's precision
        torch.full((70000,), 2.0, dtype=torch.float16),  # a half-precision sum would overflow (280000)
        torch.zeros(0, 4),  # an empty shard
    ]
    squares = squared_norms(tensors)
    for tensor, square in zip(tensors, squares, strict=True):
        assert square.dtype == torch.float32 and square.dim() == 0
        expected = torch.linalg.vector_norm(tensor.double()).square().item()
        assert square.item() == pytest.approx(expected, rel=1e-5, abs=0.0)


def test_an_all_zero_weight_is_exactly_zero_and_a_nan_stays_nan():
    zero, nan = squared_norms([torch.zeros(16, 16), torch.tensor([[1.0, float("nan")]])])
    assert zero.item() == 0.0  # the all-zero weight check reads a norm of exactly 0
    assert torch.isnan(nan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rows_with_gradient_are_the_rows_holding_a_nonzero(dtype):
    grad = torch.randn(7, 300, generator=torch.Generator().manual_seed(1))
    grad[1] = 0.0  # a dead unit
    grad[2] = 0.0
    grad[2, 299] = 1e-40 if dtype != torch.bfloat16 else 1e-30  # one tiny (subnormal) gradient
    grad[3, :] = -0.0  # negative zeros are zeros
    grad[4, 5] = float("nan")  # a NaN row does not count as one with gradient, as with amax
    grad[5, 7] = float("inf")
    grad = grad.to(dtype)
    expected = grad.abs().amax(dim=1) > 0
    assert torch.equal(_rows_with_gradient(grad), expected)
    assert _rows_with_gradient(grad).tolist() == [True, False, True, False, False, True, True]
