"""LightningModules and a quiet CPU ``Trainer`` for the tests of ``safeloop.lightning``.

Import only after ``pytest.importorskip("lightning")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.models import classification_data

# Lightning 2.6 on torch 2.13 warns from its own pytree helper; a tiny CPU loader makes it
# suggest workers; a reference run skips a step by returning None. None is what these tests
# look at.
QUIET = [
    "ignore:.*LeafSpec.*",
    "ignore:.*`training_step` returned `None`.*",
    "ignore:.*does not have many workers.*",
    "ignore:.*has a total of.*",
    "ignore:.*smaller than the logging interval.*",
]


def trainer(*callbacks: pl.Callback, **kwargs: Any) -> pl.Trainer:
    """A CPU ``Trainer`` without logger, checkpoints, bar or model summary (one epoch by default)."""
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kwargs,
    )


def batches(n: int = 96, batch_size: int = 8, data: TensorDataset | None = None) -> DataLoader:
    """The classification data of ``tests.helpers.models`` in a fixed order (12 batches of 8)."""
    return DataLoader(data or classification_data(n=n), batch_size=batch_size, shuffle=False)


class Classifier(pl.LightningModule):
    """An MLP classifier trained with cross-entropy, with faults to order.

    Args:
        optimizer (`Callable`): ``optimizer(params)``; Adam at 1e-2 by default.
        manual (`bool`): manual optimization (``manual_backward``, ``opt.step()``).
        nan_at (`Iterable[int]`): batch indices whose loss is multiplied by NaN.
        skip_at (`Iterable[int]`): batch indices whose step is skipped by hand (the reference:
            ``training_step`` returns None, or ``opt.step()`` is not called).
        scheduler (`bool`): a StepLR (step 3, gamma 0.5) stepped every optimizer step.
        seed (`int`): seeds the weights.
    """

    def __init__(
        self,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
        *,
        manual: bool = False,
        nan_at: Iterable[int] = (),
        skip_at: Iterable[int] = (),
        scheduler: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.make_optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-2))
        self.automatic_optimization = not manual
        self.nan_at, self.skip_at = set(nan_at), set(skip_at)
        self.with_scheduler = scheduler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        return loss * float("nan") if batch_idx in self.nan_at else loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss = self.loss(batch, batch_idx)
        if self.automatic_optimization:
            return None if batch_idx in self.skip_at else loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if batch_idx not in self.skip_at:
            optimizer.step()
        return None

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer(self.parameters())
        if not self.with_scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Regression(pl.LightningModule):
    """``noisy_regression``'s linear model under the mean squared error, SGD at ``lr=0``.

    Args:
        model (`nn.Module`): the regression's model.
        nan_at (`set[int]`): batch indices whose loss is made NaN.
    """

    def __init__(self, model: nn.Module, nan_at: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__()
        self.model = model
        self.nan_at = nan_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.model(inputs), targets)
        return loss * float("nan") if batch_idx in self.nan_at else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def noise_record(fit: str, rank: int, true: float, result: Any) -> dict[str, Any]:
    """One process's noise-scale outcome of a fit, as the multi-process scripts print it."""
    found = result.gradient_noise_scale
    return {
        "fit": fit,
        "rank": rank,
        "true": true,
        "value": None if found is None else found.value,
        "steps": None if found is None else found.steps,
        "batch": None if found is None else found.batch_size,
        "codes": sorted(f.code for f in result.findings),
        "logged": [
            result.history[0].get("gradient_noise_scale"),
            result.history[-1].get("gradient_noise_scale"),
        ],
    }


class RecordingLogger(Logger):
    """A Lightning logger that keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def logged_keys(self) -> set[str]:
        return {key for _, metrics in self.logged for key in metrics}


def acted(callback: Any) -> list[Any]:
    """The callback's events but its checkpoints (written at the start of every fit with rollback on)."""
    return [event for event in callback.events if event.kind != "checkpoint"]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state, in a fixed order."""
    state = optimizer.state_dict()["state"]
    return [
        value for key in sorted(state) for value in state[key].values() if isinstance(value, torch.Tensor)
    ]


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
