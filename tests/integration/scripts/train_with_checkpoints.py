"""Trains with a checkpoint after every step, printing each step; killed at random by a test."""

import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

from safeloop import Callback, SafeTrainer


class PrintStep(Callback):
    def on_checkpoint(self, trainer, event):
        sys.stdout.write(f"SAVED {event.step}\n")
        sys.stdout.flush()

    def on_fit_end(self, trainer, result):
        sys.stdout.write(f"END {result.status} {result.global_step}\n")
        sys.stdout.flush()


def main() -> None:
    checkpoint_dir, steps = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    # about 1.3M parameters: each checkpoint (weights plus AdamW moments) is ~16 MB
    model = nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    data = TensorDataset(torch.randn(512, 256), torch.randint(0, 10, (512,)))
    result = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        DataLoader(data, batch_size=32, shuffle=True),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=steps,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=1,
        keep_checkpoints=2,
        seed=0,
        callbacks=[PrintStep()],
        progress_bar=False,
        summary=False,
    ).fit(resume_from="latest")
    preempt = [e for e in result.events if e.kind == "preempt"]
    detail = preempt[0].detail if preempt else {}
    sys.stdout.write(f"DONE {result.global_step} {detail.get('signal')} {detail.get('path')}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
