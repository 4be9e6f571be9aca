"""The gradient noise scale under DDP and FSDP2 on 2 CPU processes, and the updates its hooks leave alone.

Run by ``tests/distributed/test_noise_scale.py`` under torchrun (gloo). Part one: the closed-form
regression of ``tests.helpers.models.noisy_regression`` at ``lr=0`` (the weights, and so the true
noise scale, stay put), 16 samples per process without accumulation: each process's gradient
before the all-reduce (read in the communication hook) against the reduced one. Part two: a
classifier trained by the hand-written Accelerate loop and by SafeTrainer, whose communication
hook must not change one bit of the updates. Part three, FSDP2 (``fully_shard`` through
Accelerate's plugin, forced on CPU as in ``train_fsdp_ranks.py``; the Accelerate state stays FSDP
from there on, so it runs last): the same regression with 2 micro-batches of 8 per process
(Accelerate's ``no_sync`` leaves the sharded ``.grad`` None until the window's last backward),
each process's window gradient read at the reduce-scatter's input against the reduced one, the
same two sizes (16 and 32) as part one; and the classifier (its first layer an FSDP module of its
own) trained with and without the probe, without and with accumulation, bit for bit alike.
With ``PARITY_ONLY=1`` only part two runs (launched on 3 processes: the hook scales each bucket
by ``1 / 3`` as DDP does without a hook). Prints one ``RESULT`` JSON line per rank.
"""

import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

from accelerate import Accelerator

from safeloop import SafeTrainer
from safeloop.diagnostics.noise_probe_fsdp import MeasuredReduceScatter, _comms, fsdp2_modules
from tests.distributed.scripts.train_fsdp_ranks import build_accelerator
from tests.helpers.models import classification_data, mlp, noisy_regression
from tests.helpers.recording import print_result


def estimate(steps: int, accelerator: Accelerator | None = None, accumulation: int = 1) -> dict:
    dataset, model, true = noisy_regression(n=65536)
    trainer = SafeTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        DataLoader(dataset, batch_size=16 // accumulation, shuffle=True),
        loss_fn=nn.MSELoss(),
        max_steps=steps,
        seed=0,
        rollback=False,
        progress_bar=False,
        summary=False,
        accelerator=accelerator,
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


def fsdp2_local_weights(noise: str, accumulation: int) -> list[list[float]]:
    """This process's shards after 12 FSDP2 steps of the classifier, its first layer wrapped apart."""
    # the first Linear (144 parameters) an FSDP module of its own, the last (51) in the root's:
    # two reduce-scatters per backward, two pieces summed
    accelerator = build_accelerator(
        "fsdp2", None, accumulation=accumulation, auto_wrap_policy="size_based_wrap", min_num_params=100
    )
    model = mlp(seed=0)
    trainer = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        DataLoader(classification_data(n=128), batch_size=8 // accumulation, shuffle=False),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=12,
        clip_grad_norm=1.0,
        gradient_noise_scale=noise,
        accelerator=accelerator,
        rollback=False,
        progress_bar=False,
        summary=False,
    )
    trainer.fit()
    diagnostics = trainer._diagnostics
    assert diagnostics is not None and (diagnostics.noise is not None) == (noise == "auto"), (
        None if diagnostics is None else diagnostics.noise_scale_reason
    )
    # with the probe, both FSDP modules' reduce-scatters go through the measuring comm
    comms = [comm for module in fsdp2_modules(trainer.model) for comm in _comms(module)]
    assert len(comms) == 2 and all(isinstance(c, MeasuredReduceScatter) == (noise == "auto") for c in comms)
    return [p.detach().to_local().flatten().tolist() for p in trainer.model.parameters()]


def main() -> None:
    if os.environ.get("PARITY_ONLY"):  # part two alone (3 processes: a world not a power of two)
        ours = trained(12)  # first: SafeTrainer joins the CPU processes (a bare Accelerator() would not)
        print_result({"rank": int(os.environ["RANK"]), "parity": hand_written(12) == ours})
        return
    steps = int(os.environ.get("STEPS", "800"))
    record = estimate(steps)
    loop, ours = hand_written(12), trained(12)
    record |= {"rank": int(os.environ["RANK"]), "parity": loop == ours}
    # FSDP2 from here on (the Accelerate state stays FSDP)
    fsdp2 = estimate(steps, build_accelerator("fsdp2", None, accumulation=2), accumulation=2)
    record["fsdp2"] = {key: fsdp2[key] for key in ("value", "steps", "batch", "codes", "logged")}
    record["fsdp2_parity"] = [fsdp2_local_weights("off", k) == fsdp2_local_weights("auto", k) for k in (1, 2)]
    print_result(record)


if __name__ == "__main__":
    main()
