"""The gradient noise scale under DDP on 2 CPU processes, and the updates its hook leaves alone.

Run by ``tests/distributed/test_noise_scale.py`` under torchrun (gloo). Part one: the closed-form
regression of ``tests.helpers.models.noisy_regression`` at ``lr=0`` (the weights, and so the true
noise scale, stay put), 16 samples per process without accumulation: each process's gradient
before the all-reduce (read in the communication hook) against the reduced one. Part two: a
classifier trained by the hand-written Accelerate loop and by SafeTrainer, whose communication
hook must not change one bit of the updates. Prints one ``RESULT`` JSON line per rank.
"""

import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

from accelerate import Accelerator

from safeloop import SafeTrainer
from tests.helpers.models import classification_data, mlp, noisy_regression
from tests.helpers.recording import print_result


def estimate(steps: int) -> dict:
    dataset, model, true = noisy_regression(n=65536)
    trainer = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(dataset, batch_size=16, shuffle=True),
        loss_fn=nn.MSELoss(),
        max_steps=steps,
        seed=0,
        rollback=False,
        progress_bar=False,
        summary=False,
    )
    result = trainer.fit()
    found = result.gradient_noise_scale
    return {
        "true": true,
        "value": None if found is None else found.value,
        "steps": None if found is None else found.steps,
        "batch": None if found is None else found.batch_size,
        "codes": [f.code for f in result.findings],
        # the first and last log entries only: a long line risks interleaving with the other rank's
        "logged": [
            result.history[0].get("gradient_noise_scale"),
            result.history[-1].get("gradient_noise_scale"),
        ],
    }


def weights(model: nn.Module) -> list[list[float]]:
    return [p.detach().flatten().tolist() for p in model.parameters()]


def hand_written(steps: int) -> list[list[float]]:
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = mlp(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(classification_data(n=128), batch_size=8, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn = nn.CrossEntropyLoss()
    done = 0
    while done < steps:
        for inputs, targets in loader:
            loss = loss_fn(model(inputs), targets)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == steps:
                break
    return weights(accelerator.unwrap_model(model))


def trained(steps: int) -> list[list[float]]:
    model = mlp(seed=0)
    trainer = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        DataLoader(classification_data(n=128), batch_size=8, shuffle=False),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=steps,
        clip_grad_norm=1.0,
        rollback=False,
        progress_bar=False,
        summary=False,
    )
    trainer.fit()
    assert trainer._diagnostics is not None and trainer._diagnostics.noise is not None  # the hook is on
    return weights(trainer.accelerator.unwrap_model(trainer.model))


def main() -> None:
    record = estimate(int(os.environ.get("STEPS", "800")))
    loop, ours = hand_written(12), trained(12)
    record |= {"rank": int(os.environ["RANK"]), "parity": loop == ours}
    print_result(record)


if __name__ == "__main__":
    main()
