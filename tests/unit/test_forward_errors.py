"""A model that raises on inputs of the wrong form gets a ConfigError naming the fix.

Each case is a first-script mistake run through ``SafeTrainer``: NumPy's float64 or integer pixels
into float32 weights, a feature count the first layer does not take, images not flattened, images
channels-last, BatchNorm on the epoch's last batch of one sample. Errors the inputs do not explain
stay torch's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import ConfigError, SafeTrainer
from safeloop.forward_errors import explain_forward_failure

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(
    model: nn.Module, x: torch.Tensor, *, n: int = 64, batch_size: int = 16, steps: int | None = 2
) -> None:
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    trainer = SafeTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loader, loss_fn=nn.CrossEntropyLoss(),
        max_steps=steps, progress_bar=False, summary=False,
    )  # fmt: skip
    trainer.fit()


def _raised(model: nn.Module, x: torch.Tensor, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        _fit(model, x, **kwargs)
    assert isinstance(info.value.__cause__, (RuntimeError, ValueError)), "torch's error is kept as the cause"
    assert "torch's error:" in str(info.value)
    return str(info.value)


def _mlp(features: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (torch.from_numpy(np.random.default_rng(0).standard_normal((64, 8))), "NumPy arrays are float64"),
        (torch.randint(0, 255, (64, 8)), "x.to(torch.float32) / 255"),
        (torch.randint(0, 255, (64, 8), dtype=torch.uint8), "pixel values"),
        (torch.rand(64, 8) > 0.5, "booleans"),
    ],
    ids=["numpy-float64", "int64-pixels", "uint8-pixels", "bool"],
)
def test_inputs_of_another_dtype_than_the_weights_name_the_conversion(x, expected):
    message = _raised(_mlp(), x)
    assert f"{x.dtype}" in message and "weights are torch.float32" in message and expected in message


def test_a_feature_count_the_first_layer_does_not_take_names_the_layer():
    message = _raised(_mlp(8), torch.randn(64, 10))
    assert "`0` (`nn.Linear(8, 16)`) takes 8 features per sample; the batch has 10" in message
    assert "nn.Linear(10, 16)" in message


def test_a_deeper_layer_with_a_wrong_size_is_named_without_blaming_the_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(12, 3))  # 16 out, 12 in
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # not the data's fault: torch's own
        _fit(model, torch.randn(64, 8))


@pytest.mark.parametrize("shape", [(64, 3, 8, 8), (64, 1, 28, 28), (64, 5, 7)])
def test_images_not_flattened_name_flatten(shape):
    per_sample = int(np.prod(shape[1:]))
    torch.manual_seed(0)
    message = _raised(nn.Sequential(nn.Linear(per_sample, 3)), torch.randn(*shape))
    assert f"takes {per_sample} features per sample" in message and "nn.Flatten()" in message


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_last_images_name_permute(channels):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    message = _raised(model, torch.randn(64, 8, 8, channels))
    assert "channels-last" in message and "x.permute(0, 3, 1, 2)" in message


def test_batchnorm_on_a_last_batch_of_one_names_drop_last():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    message = _raised(model, torch.randn(65, 8), steps=None)  # 4 batches of 16, then one of 1
    assert "one sample" in message and "drop_last=True" in message


def test_errors_the_inputs_do_not_explain_stay_torchs():
    model = _mlp()
    for exc in (RuntimeError("boom"), RuntimeError("mat1 and mat2 must have the same dtype")):
        explain_forward_failure(model, torch.randn(4, 8), exc, "`model(inputs)`")  # float32 inputs: fine
    explain_forward_failure(
        model, torch.randn(4, 8), ValueError("Expected more than 1 value per channel when training"), "x"
    )  # a batch of 4, not of one
    explain_forward_failure(model, [torch.randn(4, 8)], RuntimeError("dtype"), "x")  # not a tensor
