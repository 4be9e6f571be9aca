"""Train a small classifier with SafeTrainer on data generated here (nothing is downloaded).

Run:
    python examples/quickstart.py
    accelerate launch --num_processes 2 examples/quickstart.py   # two CPU processes, gloo
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import SafeTrainer


def make_blobs(n: int, features: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Gaussian blobs around random class centres: learnable, not trivially separable."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=gen) * 0.45
    labels = torch.randint(0, classes, (n,), generator=gen)
    inputs = centres[labels] + torch.randn(n, features, generator=gen)
    return TensorDataset(inputs, labels)


def main() -> None:
    torch.manual_seed(0)
    data = make_blobs(5000)
    train, held_out = torch.utils.data.random_split(
        data, [4000, 1000], generator=torch.Generator().manual_seed(1)
    )
    model = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    # a step budget rather than epochs: with N processes each takes 1/N of every epoch, while
    # the schedule below must span the steps actually taken
    total_steps = 300
    train_loader = DataLoader(train, batch_size=64, shuffle=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    trainer = SafeTrainer(
        model,
        optimizer,
        train_loader,
        loss_fn=nn.CrossEntropyLoss(),
        eval_dataloader=DataLoader(held_out, batch_size=256),
        lr_scheduler=scheduler,
        max_steps=total_steps,
        clip_grad_norm=1.0,
        seed=0,
        log_every=20,
    )
    result = trainer.fit()

    if trainer.accelerator.is_main_process:
        first, last = result.history[0], result.history[-1]
        print(
            f"processes: {trainer.accelerator.num_processes}\n"
            f"steps: {result.global_step} (skipped {result.skipped_steps}, rollbacks {result.rollbacks})\n"
            f"train loss: {first['loss']:.4f} (step {first['step']})"
            f" -> {last['loss']:.4f} (step {last['step']})\n"
            f"eval loss: {result.eval_loss:.4f}\n"
            f"findings: {len(result.findings)}"
            + "".join(f"\n  [{f.severity}] {f.code}: {f.message}" for f in result.findings)
        )


if __name__ == "__main__":
    main()
