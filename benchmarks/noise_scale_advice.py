"""Check the ``batch-size`` advice: does the batch it recommends reach the same loss in fewer steps?

A 10-class classifier (an MLP on overlapping Gaussian clusters, so the loss has a floor above 0)
is trained three times with Adam, each run long enough to reach the target:

1. at a small batch, with ``gradient_noise_scale="split"`` measuring the noise scale; its
   ``batch-size`` finding names the batch to use;
2. at that batch (rounded to a power of two), the learning rate scaled with the square root of
   the batch ratio, as the finding's fix says for Adam;
3. at 8x that batch, the same scaling: the side the finding calls wasteful.

The target is the held-out loss the small-batch run reaches at the end, smoothed over 5
evaluations; each run reports the optimizer steps and samples it needed to first reach it, next to
what the noise-scale model of McCandlish et al. predicts (steps ``S = S_min (1 + B_noise/B)``,
samples ``E = E_min (1 + B/B_noise)``, relative to the small batch). Usage:

    python benchmarks/noise_scale_advice.py             # the defaults behind the table in the docs
    python benchmarks/noise_scale_advice.py --small 4 --steps 4000
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from safeloop import Callback, SafeTrainer


def make_data(n: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(seed)
    centers = 0.45 * torch.randn(10, 32, generator=generator)
    labels = torch.randint(0, 10, (n + 4096,), generator=generator)
    inputs = centers[labels] + torch.randn(n + 4096, 32, generator=generator)
    return TensorDataset(inputs[:n], labels[:n]), TensorDataset(inputs[n:], labels[n:])


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


class HeldOut(Callback):
    """The held-out loss every ``every`` optimizer steps (smoothed over the last 5)."""

    def __init__(self, data: TensorDataset, every: int) -> None:
        self.inputs, self.targets = data.tensors
        self.every = every
        self.curve: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, loss, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or (self.curve and self.curve[-1][0] == step):
            return
        model = trainer.model
        model.eval()
        with torch.no_grad():
            value = float(nn.functional.cross_entropy(model(self.inputs), self.targets))
        model.train()
        self.curve.append((step, value))

    def smoothed(self) -> list[tuple[int, float]]:
        values = [v for _, v in self.curve]
        return [
            (step, statistics.fmean(values[max(0, i - 4) : i + 1])) for i, (step, _) in enumerate(self.curve)
        ]


def train(train_data: TensorDataset, held_out: TensorDataset, batch: int, lr: float, steps: int, **kwargs):
    model = make_model()
    watch = HeldOut(held_out, every=max(1, steps // 200))
    result = SafeTrainer(
        model,
        torch.optim.Adam(model.parameters(), lr=lr),
        DataLoader(train_data, batch_size=batch, shuffle=True),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=steps,
        seed=0,
        log_every=20,
        callbacks=[watch],
        progress_bar=False,
        summary=False,
        **kwargs,
    ).fit()
    return result, watch.smoothed()


def first_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, value in curve if value <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=8, help="the small batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate at the small batch")
    parser.add_argument("--steps", type=int, default=3000, help="steps of the small-batch run")
    parser.add_argument("--samples", type=int, default=200_000, help="training samples")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_data, held_out = make_data(args.samples)

    small_result, small_curve = train(
        train_data, held_out, args.small, args.lr, args.steps, gradient_noise_scale="split"
    )
    estimate = small_result.gradient_noise_scale
    if estimate is None:
        sys.exit("the noise scale was not measured: run longer")
    [advice] = [f for f in small_result.findings if f.code == "batch-size"]
    noise = estimate.value
    recommended = 2 ** round(math.log2(max(noise, args.small * 2)))
    target = small_curve[-1][1]
    print(f"noise scale: first ~{estimate.first:.0f} (step {estimate.first_step}), end ~{noise:.0f}")
    print(f"advice ({advice.severity}): {advice.message}\n")
    print(f"target held-out loss (the batch-{args.small} run's last, smoothed): {target:.4f}\n")

    rows = [(args.small, args.lr, small_curve)]
    for batch in (recommended, 8 * recommended):
        lr = args.lr * math.sqrt(batch / args.small)
        steps = max(200, int(args.steps * 3 * args.small / batch) + 200)
        _, curve = train(train_data, held_out, batch, lr, steps, gradient_noise_scale="off")
        rows.append((batch, lr, curve))

    base_steps = first_reaching(small_curve, target) or args.steps
    print("| batch | lr | steps to target | samples to target | steps vs batch", args.small, "| predicted |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch, lr, curve in rows:
        steps = first_reaching(curve, target)
        predicted = (1 + noise / batch) / (1 + noise / args.small)
        shown = "not reached" if steps is None else f"{steps}"
        samples = "-" if steps is None else f"{steps * batch:,}"
        ratio = "-" if steps is None else f"{steps / base_steps:.2f}"
        print(f"| {batch} | {lr:.2e} | {shown} | {samples} | {ratio} | {predicted:.2f} |")


if __name__ == "__main__":
    main()
