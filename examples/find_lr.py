"""Pick the learning rate with a range test, then train with it (data generated here).

The optimizer starts at a rate far too low (1e-6): `find_lr()` sweeps 1e-7..10 on the trainer's
own model and data, suggests a rate, and leaves the run bitwise as it was; the run then trains at
the suggested rate. With matplotlib installed
(`pip install "safeloop[report]"`) the curve is written to lr_find.png.

Run:
    python examples/find_lr.py
    accelerate launch --num_processes 2 examples/find_lr.py   # the same curve on both processes
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from torch.utils.data import DataLoader

from safeloop import SafeTrainer

try:
    from quickstart import make_blobs
except ImportError:  # run from the repository root as a module path
    from examples.quickstart import make_blobs


def main() -> None:
    torch.manual_seed(0)
    data = make_blobs(5000)
    train, held_out = torch.utils.data.random_split(
        data, [4000, 1000], generator=torch.Generator().manual_seed(1)
    )
    model = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    total_steps = 300
    trainer = SafeTrainer(
        model,
        optimizer,
        DataLoader(train, batch_size=64, shuffle=True),
        loss_fn=nn.CrossEntropyLoss(),
        eval_dataloader=DataLoader(held_out, batch_size=256),
        max_steps=total_steps,
        clip_grad_norm=1.0,
        seed=0,
        log_every=20,
        summary=False,
    )
    found = trainer.find_lr()
    main_process = trainer.accelerator.is_main_process
    if main_process:
        print(f"find_lr: {found}")
        if importlib.util.find_spec("matplotlib") is not None:
            found.plot("lr_find.png")
            print("curve: lr_find.png")
    lr = found.suggestion if found.suggestion is not None else 1e-3
    for group in optimizer.param_groups:
        group["lr"] = lr
    result = trainer.fit()
    if main_process:
        first, last = result.history[0], result.history[-1]
        print(
            f"learning rate: {lr:.3g}\n"
            f"train loss: {first['loss']:.4f} (step {first['step']})"
            f" -> {last['loss']:.4f} (step {last['step']})\n"
            f"eval loss: {result.eval_loss:.4f}"
        )


if __name__ == "__main__":
    main()
