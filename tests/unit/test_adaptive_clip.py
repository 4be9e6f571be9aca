"""Adaptive (z-score) gradient clipping: outliers are brought back near the running mean."""

from __future__ import annotations

import torch

from safeloop.guards.adaptive_clip import AdaptiveClip


def _param_with_grad_norm(norm: float) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), norm / 2.0)  # ||(n/2, n/2, n/2, n/2)|| = n
    return param


def test_an_outlier_norm_is_clipped_below_mean_plus_z_std_and_ordinary_norms_are_untouched():
    clip = AdaptiveClip(2.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        norm = 1.0 + 0.1 * float(torch.randn((), generator=gen))
        param = _param_with_grad_norm(norm)
        coefficient = clip.apply([param], param.grad.norm())
    mean, std = float(clip.mean), float(clip.var.sqrt())
    assert abs(mean - 1.0) < 0.1 and 0.02 < std < 0.2
    spike = _param_with_grad_norm(100.0)
    coefficient = clip.apply([spike], spike.grad.norm())
    clipped = float(spike.grad.norm())
    assert float(coefficient) < 0.05 and mean < clipped <= mean + 2.5 * std + 1e-6
    ordinary = _param_with_grad_norm(mean)
    assert float(clip.apply([ordinary], ordinary.grad.norm())) == 1.0
    assert torch.allclose(ordinary.grad.norm(), torch.tensor(mean))


def test_nothing_is_clipped_during_the_warm_up_and_a_nan_norm_leaves_the_statistics_alone():
    clip = AdaptiveClip(2.5, warmup=10)
    for norm in [1.0] * 5 + [1000.0]:
        param = _param_with_grad_norm(norm)
        assert float(clip.apply([param], param.grad.norm())) == 1.0  # within the warm-up
    before = (clip.mean.clone(), clip.var.clone())
    param = _param_with_grad_norm(1.0)
    param.grad[0] = float("nan")
    clip.apply([param], param.grad.norm())
    assert torch.equal(clip.mean, before[0]) and torch.equal(clip.var, before[1])


def test_its_state_round_trips_through_json_values():
    clip = AdaptiveClip(2.5)
    for norm in (1.0, 2.0, 3.0):
        param = _param_with_grad_norm(norm)
        clip.apply([param], param.grad.norm())
    restored = AdaptiveClip(2.5)
    restored.load_state_dict(clip.state_dict(), torch.device("cpu"))
    assert restored.steps == 3 and float(restored.mean) == float(clip.mean)
