"""A learning rate that makes training blow up: a hand-written loop ends in NaN, SafeTrainer recovers.

A small Tanh MLP is fitted to a noisy linear target (the data is made here, nothing is
downloaded) with SGD at learning rate 0.3, five epochs of 16 batches. The plain PyTorch loop
diverges: the loss grows about fivefold per step until it is inf, then NaN. The same model, data
and learning rate through ``SafeTrainer`` with its default guards: the loss spike is detected,
the state before the first step is restored, the learning rate halved, the batches already used
skipped, and training goes on: the loss ends at 0.18, from 12 at the first step.

Run:
    python examples/divergence.py

Lines on stderr that start with ``safeloop`` are the library's own log (the rollback warning and
the end-of-run report); the story on stdout is read from the returned ``FitResult``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import Event, FitResult, SafeTrainer

LEARNING_RATE = 0.3
EPOCHS = 5
BATCH_SIZE = 32
SEED = 1


def make_data(n: int = 512, seed: int = 0) -> TensorDataset:
    """Inputs in 16 dimensions, a linear target plus noise of standard deviation 0.1."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 16, generator=gen)
    targets = inputs @ torch.randn(16, 1, generator=gen) + 0.1 * torch.randn(n, 1, generator=gen)
    return TensorDataset(inputs, targets)


def make_model() -> nn.Module:
    """The same initial weights on every call, so that both runs start from one point."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))


def hand_written_loop(data: TensorDataset) -> None:
    """Plain PyTorch at the same learning rate: nothing stops the divergence."""
    print(f"1. Hand-written PyTorch loop, SGD lr {LEARNING_RATE}, {EPOCHS} epochs")
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    torch.manual_seed(SEED)  # the shuffle order SafeTrainer(seed=SEED) also draws
    losses = []
    for _ in range(EPOCHS):
        for inputs, targets in DataLoader(data, batch_size=BATCH_SIZE, shuffle=True):
            loss = nn.functional.mse_loss(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    print("   step  loss (mean of the 10 steps up to it, as SafeTrainer logs it)")
    for step in range(10, len(losses) + 1, 10):
        print(f"   {step:4d}  {sum(losses[step - 10 : step]) / 10:.3g}")
    first_bad = next((i + 1 for i, value in enumerate(losses) if not math.isfinite(value)), None)
    broken = sum(not torch.isfinite(p).all() for p in model.parameters())
    print(
        f"   the loss was first non-finite at step {first_bad}; after {len(losses)} steps it is "
        f"{losses[-1]}, and {broken} of {len(list(model.parameters()))} parameter tensors hold NaN or inf"
    )


def describe_rollback(rollback: Event, lr_scale: Event) -> list[str]:
    """The lines of one rollback, from its ``rollback`` and ``lr_scale`` events."""
    d = rollback.detail
    if d["reason"] == "loss-spike":
        what = (
            f"loss spike from step {d['anomaly_start']}: loss {d['loss']:.3g} against a running mean "
            f"of {d['mean']:.3g} (z = {d['zscore']:.0f}), confirmed at step {d['confirmed_at']}"
        )
    else:
        what = f"{d['consecutive']} non-finite steps in a row from step {d['anomaly_start']}"
    target = "the state before the first step" if rollback.step == 0 else "the newest healthy checkpoint"
    before, after = lr_scale.detail["lr_before"][0], lr_scale.detail["lr_after"][0]
    return [
        f"   ! {what}",
        f"   ! read at log step {d['detected_at']}: rolled back to step {rollback.step} ({target}), "
        f"skipping the {d['skipped_batches']} batches used since",
        f"   ! learning rate {before:.3g} -> {after:.3g}",
    ]


def print_story(result: FitResult, batches: int) -> None:
    """The logged history, with each rollback where it happened."""
    rollbacks = [e for e in result.events if e.kind == "rollback"]
    scales = [e for e in result.events if e.kind == "lr_scale"]
    print("   step  loss       lr")
    done = 0
    for entry in result.history:
        # history keeps the abandoned branch: after a rollback the step numbers start again
        while done < entry["rollbacks"]:
            print("\n".join(describe_rollback(rollbacks[done], scales[done])))
            done += 1
        print(f"   {entry['step']:4d}  {entry['loss']:<9.3g}  {entry['lr']:.3g}")
    last = result.history[-1]
    skipped = sum(e.detail["skipped_batches"] for e in rollbacks)
    print(
        f"   rollbacks: {result.rollbacks}, skipped steps: {result.skipped_steps}, optimizer steps: "
        f"{result.global_step} ({EPOCHS} epochs of {batches} batches, {skipped} skipped after rollbacks)"
    )
    print(f"   final loss: {last['loss']:.4f} (the last history entry, step {last['step']})")


def main() -> None:
    data = make_data()
    hand_written_loop(data)

    print("\n2. SafeTrainer, the same model, data and learning rate, default guards")
    model = make_model()
    result = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=LEARNING_RATE),
        DataLoader(data, batch_size=BATCH_SIZE, shuffle=True),
        loss_fn=nn.MSELoss(),
        max_epochs=EPOCHS,
        seed=SEED,
        progress_bar=False,  # keeps the printed story readable
    ).fit()
    print_story(result, len(data) // BATCH_SIZE)


if __name__ == "__main__":
    main()
