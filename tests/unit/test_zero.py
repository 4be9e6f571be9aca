"""DeepSpeed clipping arguments the engine would not apply are refused, each with its fix.

The engine is a stand-in: these checks read only its ZeRO stage and its ``gradient_clipping``.
The DeepSpeed runs themselves are in ``tests/distributed/test_deepspeed.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from safeloop.diagnostics.session import check_optimizer_before_prepare
from safeloop.errors import ConfigError
from safeloop.zero import ZeroEngine, check_deepspeed_clipping
from tests.helpers.models import mlp


class Engine(nn.Module):
    """What ``check_deepspeed_clipping`` reads of a ``DeepSpeedEngine``."""

    def __init__(self, clipping: float) -> None:
        super().__init__()
        self.clipping = clipping

    def zero_optimization_stage(self) -> int:
        return 2

    def gradient_clipping(self) -> float:
        return self.clipping


def config(**kwargs):
    """The clipping fields of a ``TrainerConfig`` (all that the check reads)."""
    return SimpleNamespace(
        **{"clip_grad_norm": None, "clip_grad_value": None, "adaptive_clip": None, **kwargs}
    )


def zero(clipping: float = 0.0) -> ZeroEngine:
    return ZeroEngine(Engine(clipping), list(mlp().parameters()))


def test_clip_grad_norm_must_be_the_deepspeed_configs_own():
    with pytest.raises(ConfigError) as caught:
        check_deepspeed_clipping(config(clip_grad_norm=1.0), zero(0.0))
    message = str(caught.value)
    assert "ZeRO-2" in message
    assert "clip_grad_norm=1.0, while the DeepSpeed config's gradient_clipping is 0.0" in message
    assert "`gradient_clipping: 1.0`" in message and "DeepSpeedPlugin(gradient_clipping=1.0)" in message
    check_deepspeed_clipping(config(clip_grad_norm=1.0), zero(1.0))  # what DeepSpeed applies: fine
    check_deepspeed_clipping(config(), zero(1.0))


@pytest.mark.parametrize("name", ["clip_grad_value", "adaptive_clip"])
def test_clipping_deepspeed_has_not_is_refused(name):
    with pytest.raises(
        ConfigError, match=rf"{name}=0\.5: DeepSpeed's engine steps its partitioned gradients"
    ):
        check_deepspeed_clipping(config(**{name: 0.5}), zero())


def test_the_optimizer_check_before_prepare_raises_on_another_models_tensors_and_warns_on_missing():
    model = mlp()
    with pytest.raises(ConfigError, match="optimizer-foreign-params"):
        check_optimizer_before_prepare(model, torch.optim.SGD(mlp(seed=1).parameters(), lr=0.1))
    head_first = torch.optim.SGD(list(model.parameters())[:-2], lr=0.1)  # the last layer added after
    [finding] = check_optimizer_before_prepare(model, head_first)
    assert (finding.code, finding.params) == ("optimizer-missing-params", ("2.weight", "2.bias"))
    assert check_optimizer_before_prepare(model, torch.optim.SGD(model.parameters(), lr=0.1)) == []
