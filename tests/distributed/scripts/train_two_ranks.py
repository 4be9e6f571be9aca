"""Trains a small classifier with SafeTrainer; run by the multi-process tests under a launcher.

Prints one JSON line per rank: rank, world size, steps, and digests of the initial and final
parameters. Logs to a per-rank tracker file so the test can see which ranks wrote files.
"""

import hashlib
import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

from safeloop import SafeTrainer
from safeloop.testing import PoisonedDataset, nonfinite_loss, spiking_loss
from tests.helpers.models import WithUnused, classification_data, mlp
from tests.helpers.recording import JsonLinesTracker


def digest(model: nn.Module) -> str:
    sha = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def main() -> None:
    out_dir = sys.argv[1]
    model = mlp(seed=0)
    if os.environ.get("DROPOUT") == "1":  # the per-process RNG then shapes every step
        model = nn.Sequential(model[0], model[1], nn.Dropout(0.3), model[2])
    if os.environ.get("ZERO_INIT") == "1":  # stuck layers: safeloop re-initialises them on every rank
        for layer in (model[0], model[2]):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    dataset = classification_data(n=128)
    shuffle = True
    if os.environ.get("UNUSED") == "1":  # a layer DDP will find no gradient for
        model = WithUnused(model)
    if os.environ.get("DIAG") == "1":  # a NaN sample in rank 1's first batch only
        dataset = PoisonedDataset(dataset, indices={9}, value=float("nan"))
        shuffle = False  # batch 0 (samples 0-7) goes to rank 0, batch 1 (8-15) to rank 1
    initial = digest(model)
    rank_tag = os.environ.get("RANK", "0")
    tracker = JsonLinesTracker(os.path.join(out_dir, f"metrics-rank{rank_tag}.jsonl"))
    loss_fn = nn.CrossEntropyLoss()
    nan_step = int(os.environ.get("NAN_ON_RANK1_AT_STEP", "0"))
    if nan_step and rank_tag == "1":  # a NaN loss on one process only
        loss_fn = nonfinite_loss(loss_fn, at_calls={nan_step})
    spike_step = int(os.environ.get("SPIKE_ON_RANK1_AT_STEP", "0"))
    if spike_step and rank_tag == "1":  # a finite loss spike on one process only
        loss_fn = spiking_loss(loss_fn, at_calls=range(spike_step, spike_step + 6), factor=30.0)
    checkpoints = {}
    if os.environ.get("CKPT_DIR"):  # checkpoint every 3 steps; MAX_STEPS stops early; RESUME=1
        checkpoints = {"checkpoint_dir": os.environ["CKPT_DIR"], "checkpoint_every": 3}
        checkpoints["async_checkpoint"] = os.environ.get("ASYNC") == "1"
    max_steps = int(os.environ["MAX_STEPS"]) if os.environ.get("MAX_STEPS") else None
    trainer = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        DataLoader(dataset, batch_size=8, shuffle=shuffle),
        loss_fn=loss_fn,
        max_epochs=int(os.environ.get("EPOCHS", "2")),
        max_steps=max_steps,
        log_every=4,
        seed=0,
        log_with=[tracker],
        project_dir=out_dir,
        **checkpoints,
    )
    result = trainer.fit(resume_from="latest" if os.environ.get("RESUME") == "1" else None)
    final = digest(trainer.accelerator.unwrap_model(trainer.model))
    record = {
        "rank": trainer.accelerator.process_index,
        "world_size": trainer.accelerator.num_processes,
        "steps": result.global_step,
        "initial": initial,
        "final": final,
        "last_loss": result.history[-1]["loss"],
        "skipped": result.skipped_steps,
        "skip_steps": [e.step for e in result.events if e.kind == "skip"],
        "reinit": [e.detail["param"] for e in result.events if e.kind == "reinit"],
        "checkpoints": [e.step for e in result.events if e.kind == "checkpoint"],
        "resumed": [e.step for e in result.events if e.kind == "resume"],
        "rollbacks": [(e.step, e.detail["detected_at"]) for e in result.events if e.kind == "rollback"],
        "lr": result.history[-1]["lr"],
        "findings": [[f.code, f.severity, list(f.params), f.step, f.message] for f in result.findings],
    }
    # one write per line: two processes share this stdout, and print() writes the newline apart
    sys.stdout.write("RESULT " + json.dumps(record) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
