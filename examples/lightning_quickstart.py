"""safeloop's guards and diagnostics in a Lightning run: ``SafeLoopCallback`` (nothing is downloaded).

A classifier on data made here, with two faults a real project meets: one sample of the
training set holds a NaN (a missing value), and the model has an auxiliary head that
``forward`` never calls. The callback skips each step whose batch holds the NaN, once per epoch
(the weights and the AdamW state stay exactly as they were), names the unused head at the first
batch, and the run trains on.

Run:
    pip install "safeloop[lightning]"
    python examples/lightning_quickstart.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop.lightning import SafeLoopCallback


def make_blobs(n: int, features: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Gaussian blobs around random class centres: learnable, not trivially separable."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=gen) * 0.45
    labels = torch.randint(0, classes, (n,), generator=gen)
    inputs = centres[labels] + torch.randn(n, features, generator=gen)
    return TensorDataset(inputs, labels)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.head = nn.Linear(128, 4)
        self.aux_head = nn.Linear(128, 4)  # meant for an auxiliary loss, forgotten in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self(inputs), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)


def main() -> None:
    pl.seed_everything(0, verbose=False)
    data = make_blobs(4000)
    data.tensors[0][1234, 5] = float("nan")  # one missing value, in one batch of every epoch
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1))

    callback = SafeLoopCallback(clip_grad_norm=1.0, log_every=20)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(), loader)

    # after fit the callback holds what SafeTrainer's FitResult holds
    result = callback.result
    assert result is not None
    first, last = result.history[0], result.history[-1]
    print(
        f"steps: {result.global_step} (skipped {result.skipped_steps})\n"
        f"train loss: {first['loss']:.4f} (step {first['step']})"
        f" -> {last['loss']:.4f} (step {last['step']})\n"
        f"events: {[(event.kind, event.step) for event in callback.events]}\n"
        f"findings: {sorted({finding.code for finding in callback.findings})}"
    )


if __name__ == "__main__":
    main()
