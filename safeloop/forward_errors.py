"""Why ``model(inputs)`` failed on a batch of tensors: dtype, features, channels, a batch of one.

The commonest first errors of a hand-written training script come from the data, yet torch names
the kernel ("mat1 and mat2 shapes cannot be multiplied (16x10 and 8x3)", "mat1 and mat2 must have
the same dtype, but got Double and Float"). When the model raises, :func:`explain_forward_failure`
compares the inputs with the model and, where they explain the error, raises a ``ConfigError``
that names the input's shape and dtype, the layer, the likely cause and the fix, with torch's
error as its ``__cause__``. Each rule checks the tensors, not only the message: an error the
inputs do not explain is left as torch raised it. Healthy steps never run this.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from safeloop.errors import ConfigError

__all__ = ["explain_forward_failure"]

_MATMUL_SHAPES = re.compile(r"shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)")
_CHANNELS = re.compile(r"expected input\[([\d, ]+)\] to have (\d+) channels, but got (\d+) channels")
_DTYPE_WORDS = ("dtype", "scalar type", "Input type", "should be the same")
_BATCHNORM_ONE = "Expected more than 1 value per channel when training"


def explain_forward_failure(model: nn.Module, inputs: object, exc: Exception, call: str) -> None:
    """Raise a ``ConfigError`` from ``exc`` when ``inputs`` explains why ``model`` raised.

    Args:
        model (`nn.Module`): the model (a wrapper of it is fine: modules are found by name).
        inputs (`object`): what the model was called with.
        exc (`Exception`): what it raised.
        call (`str`): the call as the user reads it (``"`model(inputs)`"``).
    """
    if not isinstance(inputs, torch.Tensor):
        return
    text = str(exc)
    seen = f"{call} failed on inputs of shape {tuple(inputs.shape)}, {inputs.dtype}."
    message = (
        _dtype(model, inputs, text, seen)
        or _batch_of_one(inputs, text, seen)
        or _features(model, inputs, text, seen)
        or _channels(inputs, text, seen)
    )
    if message is not None:
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise ConfigError(f"{message}\n(torch's error: {type(exc).__name__}: {first})") from exc


def _weights_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _dtype(model: nn.Module, inputs: torch.Tensor, text: str, seen: str) -> str | None:
    weights = _weights_dtype(model)
    if weights is None or inputs.dtype == weights or not any(word in text for word in _DTYPE_WORDS):
        return None
    if inputs.is_floating_point():
        cause = (
            f"the data was made in {inputs.dtype} (NumPy arrays are float64, and `torch.from_numpy` keeps it)"
        )
        fix = f"convert once in the dataset: `x.to({weights})`, or `torch.tensor(x, dtype={weights})`"
    elif inputs.dtype == torch.bool:
        cause = "masks or flags given as booleans"
        fix = f"`x.to({weights})`"
    else:
        cause = "integer data: pixel values (0-255) or token ids"
        fix = (
            f"for pixels, `x.to({weights}) / 255` (then normalise); for token ids, start the model "
            "with an `nn.Embedding`, which takes integers"
        )
    return (
        f"{seen} The model's weights are {weights}, and a layer cannot mix the two. Likely cause: "
        f"{cause}. Fix: {fix}."
    )


def _batch_of_one(inputs: torch.Tensor, text: str, seen: str) -> str | None:
    if _BATCHNORM_ONE not in text or inputs.dim() == 0 or inputs.shape[0] != 1:
        return None
    return (
        f"{seen} This batch holds one sample, and a BatchNorm layer in training mode needs more than "
        "one to compute its statistics. Likely cause: the epoch's last batch, where the dataset's "
        "length leaves a remainder of 1 after the full batches. Fix: `DataLoader(..., "
        "drop_last=True)`, or a batch size that divides the dataset."
    )


def _linear_named(model: nn.Module, in_features: int, out_features: int) -> list[str]:
    return [
        f"`{name}`"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.in_features == in_features
        and module.out_features == out_features
    ]


def _features(model: nn.Module, inputs: torch.Tensor, text: str, seen: str) -> str | None:
    match = _MATMUL_SHAPES.search(text)
    if match is None or inputs.dim() < 2:
        return None
    rows, got, takes, out = (int(v) for v in match.groups())
    names = _linear_named(model, takes, out)
    layer = f"{' or '.join(names[:2])} (`nn.Linear({takes}, {out})`)" if names else f"a layer taking {takes}"
    per_sample = int(torch.Size(inputs.shape[1:]).numel())
    if inputs.dim() > 2 and per_sample == takes and got == inputs.shape[-1]:
        return (
            f"{seen} {layer} takes {takes} features per sample, and {takes} is what one sample of "
            f"shape {tuple(inputs.shape[1:])} holds, but it received the last dimension ({got}) as "
            f"features, over {rows} rows. Likely cause: no flatten before the first `nn.Linear`. "
            "Fix: add `nn.Flatten()` before it (or `x.flatten(1)` in `forward`)."
        )
    if inputs.dim() == 2 and got == inputs.shape[1] and rows == inputs.shape[0] and names:
        return (
            f"{seen} {layer} takes {takes} features per sample; the batch has {got}. Likely cause: "
            f"the layer's `in_features` does not match the data, or the data holds extra columns "
            f"(an id, the label itself). Fix: build it as `nn.Linear({got}, {out})`, or drop the "
            "extra columns in the dataset."
        )
    return None


def _channels(inputs: torch.Tensor, text: str, seen: str) -> str | None:
    match = _CHANNELS.search(text)
    if match is None or inputs.dim() != 4:
        return None
    expected = int(match.group(2))
    if inputs.shape[-1] != expected or inputs.shape[1] == expected:
        return None
    return (
        f"{seen} The convolution takes (batch, channels, height, width) with {expected} channels, "
        f"and these images are channels-last (batch, height, width, {expected}). Likely cause: "
        "images loaded with PIL, NumPy or OpenCV, which put the channels last. Fix: "
        "`x.permute(0, 3, 1, 2)` (in the dataset: `torchvision.transforms.ToTensor()` or "
        "`torch.from_numpy(img).permute(2, 0, 1)`)."
    )
