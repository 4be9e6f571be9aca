"""Small models and data for tests, built deterministically from a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def classification_data(n: int = 96, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    w = torch.randn(features, classes, generator=gen)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


def mlp(features: int = 8, hidden: int = 16, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def loader(dataset: Dataset, batch_size: int = 8, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


class DictModel(nn.Module):
    """A Hugging Face style model: `model(**batch)` returns an object with `.loss`."""

    def __init__(self, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, classes))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.net(input_ids)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else logits.sum() * 0
        return Output(loss=loss, logits=logits)


class DictDataset(Dataset):
    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.base[i]
        return {"input_ids": x, "labels": y}


class WithUnused(nn.Module):
    """A model with a layer (``aux``) defined but never called in ``forward``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.aux = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def noisy_regression(
    features: int = 16, noise: float = 1.0, offset: float = 0.25, n: int = 8192, seed: int = 0
) -> tuple[TensorDataset, nn.Linear, float]:
    """Linear regression with Gaussian inputs and noise, whose gradient noise scale is known.

    ``y = x . w* + e`` with ``x ~ N(0, I_d)``, ``e ~ N(0, noise^2)``, a model ``w = w* + delta`` and the
    mean squared error. A sample's gradient is ``2 x (x . delta - e)``, so ``G = 2 delta`` and, by
    Isserlis' theorem, ``tr(S) = 4 ((d + 1) |delta|^2 + d noise^2)``: ``B_simple = tr(S) / |G|^2 =
    ((d + 1) |delta|^2 + d noise^2) / |delta|^2``, exact while the weights stay put (``lr=0``).

    Returns:
        `tuple[TensorDataset, nn.Linear, float]`: the data, the model at ``w* + delta`` (no bias)
        and the true ``B_simple``.
    """
    generator = torch.Generator().manual_seed(seed)
    w_star = torch.randn(features, generator=generator)
    x = torch.randn(n, features, generator=generator)
    y = (x @ w_star + noise * torch.randn(n, generator=generator)).unsqueeze(1)
    delta = offset * torch.randn(features, generator=generator)
    model = nn.Linear(features, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + delta).unsqueeze(0))
    square = float(delta.square().sum())
    return TensorDataset(x, y), model, ((features + 1) * square + features * noise**2) / square
