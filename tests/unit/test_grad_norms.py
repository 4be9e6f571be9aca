"""The step's gradient norms: torch's own where they clip, one BLAS dot per gradient where they measure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from safeloop.guards.clipping import grad_norms, measure_and_clip


def _with_grads(
    *shapes: tuple[int, ...], scale: float = 1.0, seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * scale).to(dtype)
        params.append(p)
    return params


SHAPES = [((512, 512), (512,), (10, 512), (10,)), ((3,),), ((64, 3, 3, 3), (64,), (1,))]


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("scale", [1e-15, 1e-3, 1.0, 1e15])
def test_the_measuring_norm_agrees_with_torchs_to_float32_rounding(shapes, scale):
    params = _with_grads(*shapes, scale=scale)
    fast, exact = grad_norms(params, exact=False), grad_norms(params)
    assert fast.total.dtype == exact.total.dtype == torch.float32
    reference = torch.nn.utils.get_total_norm([p.grad for p in params])
    # only the order of float32 additions differs: a few parts in a million over 262k elements
    torch.testing.assert_close(fast.total, reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast.per_param, exact.per_param, rtol=1e-5, atol=0)
    assert fast.per_param.shape == (len(params),)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_gradient_makes_the_measuring_norm_non_finite_as_torchs(bad):
    params = _with_grads((8, 8), (8,), (4,))
    params[1].grad[3] = bad
    fast, exact = grad_norms(params, exact=False), grad_norms(params)
    assert torch.isfinite(fast.total).item() is torch.isfinite(exact.total).item() is False
    assert (
        torch.isfinite(fast.per_param).tolist()
        == torch.isfinite(exact.per_param).tolist()
        == [True, False, True]
    )


@pytest.mark.parametrize(("value", "rtol"), [(1e-23, 0.0), (1e-21, 1e-5), (1e-19, 1e-5)])
def test_tiny_gradients_underflow_as_torchs_norm_does(value, rtol):
    # squares below float32's smallest normal lose precision in torch's norm as in a dot: both
    # read 0 for a gradient of 1e-23 everywhere, and agree closely above it
    params = _with_grads((1000,), (30, 30))
    for p in params:
        p.grad.fill_(value)
    fast, exact = grad_norms(params, exact=False), grad_norms(params)
    torch.testing.assert_close(fast.per_param, exact.per_param, rtol=rtol, atol=0)
    assert (fast.total.item() == 0.0) is (exact.total.item() == 0.0) is (value == 1e-23)


def test_a_finite_gradient_too_large_to_square_overflows_as_torchs_norm_does():
    params = _with_grads((4,), (4,))
    params[0].grad[0] = 1e20  # its square is past float32's range: torch's norm is inf as well
    fast, exact = grad_norms(params, exact=False), grad_norms(params)
    assert torch.isinf(exact.total) and torch.isinf(fast.total)


def test_all_zero_gradients_measure_zero():
    params = _with_grads((5, 5), (5,), scale=0.0)
    fast = grad_norms(params, exact=False)
    assert fast.total.item() == 0.0 and fast.per_param.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_keep_torchs_norm_bit_for_bit(dtype):
    params = _with_grads((16, 16), (16,), dtype=dtype)
    fast, exact = grad_norms(params, exact=False), grad_norms(params)
    assert torch.equal(fast.total, exact.total) and torch.equal(fast.per_param, exact.per_param)


def test_a_parameter_without_gradient_keeps_torchs_norm_and_a_zero_slot():
    params = _with_grads((6, 6), (6,), (2,))
    params[1].grad = None
    fast, exact = grad_norms(params, exact=False), grad_norms(params)
    assert torch.equal(fast.total, exact.total) and torch.equal(fast.per_param, exact.per_param)
    assert fast.per_param[1].item() == 0.0


def test_clipping_measures_with_torchs_norm_and_clips_bit_for_bit_as_torch():
    ours = _with_grads((64, 32), (64,), (3, 64), scale=5.0, seed=3)
    theirs = _with_grads((64, 32), (64,), (3, 64), scale=5.0, seed=3)
    norms = measure_and_clip(ours, max_norm=1.0, max_value=None)
    total = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert torch.equal(norms.total, total)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs, strict=True))


def test_measuring_only_uses_one_dot_per_gradient_and_no_foreach_norm(monkeypatch):
    params = _with_grads((32, 32), (32,), (4, 32))
    calls = {"dot": 0, "foreach": 0}
    dot, foreach_norm = torch.dot, torch._foreach_norm

    def counting_dot(*args, **kwargs):
        calls["dot"] += 1
        return dot(*args, **kwargs)

    def counting_foreach(*args, **kwargs):
        calls["foreach"] += 1
        return foreach_norm(*args, **kwargs)

    monkeypatch.setattr(torch, "dot", counting_dot)
    monkeypatch.setattr(torch, "_foreach_norm", counting_foreach)
    measure_and_clip(params, max_norm=None, max_value=None)
    assert calls == {"dot": 3, "foreach": 0}
    measure_and_clip(params, max_norm=10.0, max_value=None)
    assert calls == {"dot": 3, "foreach": 1}
