"""Sharded checkpoints under FSDP2 on two CPU ranks: stop, resume, roll back.

Run by ``tests/distributed/test_sharded_checkpoints.py`` under torchrun (2 processes, gloo). An
MLP with AdamW and StepLR, a shuffled loader (4 micro-batches per rank per epoch), seed 0,
``checkpoint_every=3``. ``MAX_STEPS`` bounds the run, ``RESUME=1`` resumes from the newest
checkpoint of ``CKPT_DIR`` (``RESUME_FROM``: from that folder), ``MODE=ddp`` runs unsharded
(also as one plain process, to resume a sharded checkpoint there), ``SPIKE_ON_RANK1_AT_STEP=k``
multiplies rank 1's loss by 50 from step k on for 3 steps, once (only there: the spike is seen
through the reduced log values). Each rank prints one ``RESULT`` JSON line: the whole parameters
and optimizer state (gathered from the shards), the steps, the history's losses, the events
(tensors as digests of their bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

from torch.distributed.tensor import DTensor

from safeloop import SafeTrainer
from tests.distributed.scripts.train_fsdp_ranks import build_accelerator
from tests.helpers.models import classification_data
from tests.helpers.recording import JsonLinesTracker


def whole(value: object) -> object:
    """A whole tensor (gathered from its shards) as the SHA-256 of its bytes: exact and short."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return hashlib.sha256(data).hexdigest()[:16]
    return value


def main() -> None:
    out_dir = sys.argv[1]
    tracker = JsonLinesTracker(os.path.join(out_dir, "metrics.jsonl"))
    accelerator = build_accelerator(os.environ.get("MODE", "fsdp2"), tracker)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = classification_data(n=128).tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    spike_at = int(os.environ.get("SPIKE_ON_RANK1_AT_STEP", "0"))
    spiked: set[int] = set()  # each step spikes once: after the rollback the run goes on cleanly

    def training_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.cross_entropy(model(inputs), targets)
        step = trainer.global_step + 1
        if (
            accelerator.process_index == 1
            and spike_at
            and spike_at <= step < spike_at + 3
            and step not in spiked
        ):
            spiked.add(step)
            loss = loss * 50  # this rank only
        return loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # moments: optimizer state to check
    trainer = SafeTrainer(
        model,
        optimizer,
        loader,
        training_step=training_step,
        lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5),
        seed=0,
        accelerator=accelerator,
        progress_bar=False,
        max_steps=int(os.environ.get("MAX_STEPS", "12")),
        checkpoint_dir=os.environ.get("CKPT_DIR"),
        checkpoint_every=3,
        log_every=int(os.environ.get("LOG_EVERY", "3")),
        spike_warmup=int(os.environ.get("SPIKE_WARMUP", "20")),
    )
    resume_from = os.environ.get("RESUME_FROM") or ("latest" if os.environ.get("RESUME") == "1" else None)
    result = trainer.fit(resume_from=resume_from)
    state = trainer.optimizer.state_dict()["state"]
    record = {
        "rank": accelerator.process_index,
        "steps": result.global_step,
        "losses": {h["step"]: h["loss"] for h in result.history},
        "events": [[e.kind, e.step, e.detail.get("path")] for e in result.events],
        "params": {n: whole(p) for n, p in trainer.model.named_parameters()},
        "optimizer": {str(k): {n: whole(v) for n, v in s.items()} for k, s in state.items()},
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "rollbacks": result.rollbacks,
    }
    accelerator.end_training()
    sys.stdout.write("RESULT " + json.dumps(record) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
