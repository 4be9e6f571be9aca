"""Sharded checkpoints under FSDP on two CPU ranks: stop, resume, roll back, be killed.

Run by ``tests/distributed/test_sharded_checkpoints.py`` and ``test_sharded_sigkill.py`` under
torchrun (2 processes, gloo). An MLP with AdamW and StepLR, a shuffled loader (4 micro-batches
per rank per epoch), seed 0. Environment:

- ``MODE``: ``fsdp2`` (default), ``fsdp1`` (``use_orig_params=True``, the first two layers in FSDP
  modules of their own, the last in the root's; ``ORIG=0``: ``use_orig_params=False``, the model
  wrapped here before the optimizer is built on its FlatParameters), ``zero1``/``zero2``/``zero3``
  (DeepSpeed ZeRO of that stage; exits with code 3 and a ``SKIP`` line without DeepSpeed) or
  ``ddp`` (unsharded; also as one plain process, to resume a sharded checkpoint there);
- ``MAX_STEPS`` bounds the run; ``CKPT_DIR``, ``CKPT_EVERY`` (3) and ``KEEP`` (3) set the
  checkpoints; ``RESUME=1`` resumes from the newest of ``CKPT_DIR``, ``RESUME_FROM`` from a folder;
- ``SPIKE_ON_RANK1_AT_STEP=k`` multiplies rank 1's loss by ``SPIKE_FACTOR`` (50) from step k on
  for 3 steps, once (only there: the spike is seen through the reduced log values);
  ``ROLLBACK=0`` turns rollback off; ``OPTIMIZER=sgd`` trains with SGD (momentum 0.9) instead of AdamW;
- ``WIDTH`` (32) sets the hidden layers' width; ``SAY_SAVES=1`` prints ``PID <pid>`` at the start
  and ``SAVED <step>`` per durable checkpoint;
- ``ASYNC=1`` saves asynchronously (``async_checkpoint=True``); ``SLOW_SHARDS=s`` makes every
  shard file's write wait ``s`` seconds first, and the result then says, per save, whether this
  process's shard file was on disk when the save returned; ``FAIL_SHARDS_AT=k`` makes rank 1's
  shard write of the checkpoint of step k fail (no space left), and the result holds the
  ``CheckpointError`` that ``fit`` raised instead of the state.

Each rank prints one ``RESULT`` JSON line: the whole parameters and optimizer state (by name,
gathered from the shards), the steps, the history's losses, the events (tensors as digests of
their bytes). Under DeepSpeed the optimizer part also holds each flat partition's ``step`` and, at
ZeRO-1/2, the process's own whole module weights (``local``: what its forward computes with).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.tensor import DTensor

from safeloop import Callback, SafeTrainer
from safeloop.checkpoint import sharded
from safeloop.checkpoint.manager import CheckpointManager
from safeloop.errors import CheckpointError
from tests.distributed.scripts.train_deepspeed_ranks import build_accelerator as build_deepspeed_accelerator
from tests.distributed.scripts.train_fsdp_ranks import build_accelerator, wrap_flat
from tests.helpers.models import classification_data
from tests.helpers.recording import JsonLinesTracker, end_run, print_result


def whole(value: object) -> object:
    """A whole tensor (gathered from its shards) as the SHA-256 of its bytes: exact and short."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return hashlib.sha256(data).hexdigest()[:16]
    return value


def zero_whole_state(trainer: SafeTrainer) -> tuple[dict, dict]:
    """Whole fp32 weights and Adam moments by parameter name under DeepSpeed (a collective), and
    the optimizer's ``step`` of each flat partition."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = trainer.model
    module = trainer.accelerator.unwrap_model(engine)
    stage = engine.zero_optimization_stage()
    base = engine.optimizer.optimizer if stage else engine.optimizer  # stage 0: the torch optimizer itself
    keys = ("exp_avg", "exp_avg_sq") if os.environ.get("OPTIMIZER") != "sgd" else ("momentum_buffer",)
    fresh = not any(base.state.values())
    params, optim = {}, {}
    for name, param in module.named_parameters():
        if stage:
            params[name] = safe_get_full_fp32_param(param)
            optim[name] = {} if fresh else {k: safe_get_full_optimizer_state(param, k) for k in keys}
        else:
            params[name] = param
            optim[name] = {} if fresh else {k: base.state[param][k] for k in keys}
    if stage < 3:  # each process's own whole copy, what its forward uses
        optim["local"] = {name: whole(param) for name, param in module.named_parameters()}
    optim["steps"] = {
        str(i): float(state["step"]) for i, state in enumerate(base.state.values()) if "step" in state
    }
    return params, {"state": optim}


class SaySaves(Callback):
    """Prints ``SAVED <step>`` once each checkpoint is durable (the main process's event)."""

    def on_checkpoint(self, trainer, event) -> None:
        sys.stdout.write(f"SAVED {event.step}\n")
        sys.stdout.flush()


def _shard_folder_step(path: Path) -> int:
    """The step of the checkpoint whose (temporary) shards folder holds ``path``."""
    return int(path.parent.parent.name.strip(".").split(".")[0].split("-")[1])


def inject_shard_writes(rank: int, seen: list) -> None:
    """Slow down or fail shard writes (``SLOW_SHARDS``, ``FAIL_SHARDS_AT``), and record per save
    whether this process's shard file existed when ``CheckpointManager.save`` returned."""
    slow = float(os.environ.get("SLOW_SHARDS", "0"))
    fail_at = int(os.environ.get("FAIL_SHARDS_AT", "-1"))
    original = sharded.save_hashed

    def save_hashed(tensors, path, metadata=None):
        if rank == 1 and _shard_folder_step(path) == fail_at:
            raise OSError(28, "No space left on device (injected)", str(path))
        time.sleep(slow)
        return original(tensors, path, metadata)

    sharded.save_hashed = save_hashed
    if not slow:
        return
    save = CheckpointManager.save

    def timed_save(manager, snapshot):
        start = time.perf_counter()
        path = save(manager, snapshot)
        name = f"shards/{sharded.shard_file_name(rank + 1)}"
        folders = [
            manager.directory / f".step-{snapshot.step:08d}.tmp",
            manager.directory / f"step-{snapshot.step:08d}",
        ]
        seen.append([snapshot.step, any((f / name).exists() for f in folders), time.perf_counter() - start])
        return path

    CheckpointManager.save = timed_save


def main() -> None:
    out_dir = sys.argv[1]
    if os.environ.get("SAY_SAVES") == "1":  # the test kills the processes themselves, not only torchrun
        sys.stdout.write(f"PID {os.getpid()}\n")
        sys.stdout.flush()
    tracker = JsonLinesTracker(os.path.join(out_dir, "metrics.jsonl"))
    seen: list = []  # [step, shard file on disk when the save returned, seconds the save took]
    inject_shard_writes(int(os.environ.get("RANK", "0")), seen)
    mode = os.environ.get("MODE", "fsdp2")
    if mode.startswith("zero"):
        os.environ["STAGE"] = mode[len("zero") :]
        accelerator = build_deepspeed_accelerator("ds", tracker)
    else:
        accelerator = build_accelerator(mode, tracker)
    torch.manual_seed(0)
    width = int(os.environ.get("WIDTH", "32"))
    model = nn.Sequential(
        nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
    )
    if mode == "fsdp1" and os.environ.get("ORIG") == "0":
        model = wrap_flat(model, accelerator)
    x, y = classification_data(n=128).tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    spike_at = int(os.environ.get("SPIKE_ON_RANK1_AT_STEP", "0"))
    spiked: set[int] = set()  # each step spikes once: after the rollback the run goes on cleanly

    def training_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        step = trainer.global_step + 1
        spike = accelerator.process_index == 1 and spike_at <= step < spike_at + 3 and step not in spiked
        if spike and spike_at:
            spiked.add(step)
        if spike and spike_at and os.environ.get("POISON") == "1":  # wrong labels on inputs x100
            inputs, targets = inputs * 100, (targets + 1) % 3
        loss = nn.functional.cross_entropy(model(inputs), targets)
        if spike and spike_at and os.environ.get("POISON") != "1":
            loss = loss * float(os.environ.get("SPIKE_FACTOR", "50"))  # this rank only
        return loss

    if os.environ.get("OPTIMIZER") == "sgd":  # an update as large as the gradient: a spike does harm
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
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
        checkpoint_every=int(os.environ.get("CKPT_EVERY", "3")),
        keep_checkpoints=int(os.environ.get("KEEP", "3")),
        callbacks=[SaySaves()] if os.environ.get("SAY_SAVES") == "1" else [],
        log_every=int(os.environ.get("LOG_EVERY", "3")),
        spike_warmup=int(os.environ.get("SPIKE_WARMUP", "20")),
        rollback=os.environ.get("ROLLBACK", "1") == "1",
        async_checkpoint=os.environ.get("ASYNC") == "1",
    )
    resume_from = os.environ.get("RESUME_FROM") or ("latest" if os.environ.get("RESUME") == "1" else None)
    try:
        result = trainer.fit(resume_from=resume_from)
    except CheckpointError as err:  # FAIL_SHARDS_AT: on every process, at the same point
        if "FAIL_SHARDS_AT" not in os.environ:
            raise
        end_run(accelerator)
        print_result({"rank": accelerator.process_index, "error": str(err), "steps": trainer.global_step})
        return
    if mode.startswith("zero"):
        params, optim = zero_whole_state(trainer)
    else:  # whole tensors by parameter name, the same way under FSDP2, FSDP1 and without sharding
        params, optim = get_state_dict(
            trainer.model, trainer.optimizer.optimizer, options=StateDictOptions(full_state_dict=True)
        )
    record = {
        "rank": accelerator.process_index,
        "steps": result.global_step,
        "losses": {h["step"]: h["loss"] for h in result.history},
        "events": [[e.kind, e.step, e.detail.get("path")] for e in result.events],
        "params": {n: whole(p) for n, p in params.items()},
        "optimizer": {str(k): {n: whole(v) for n, v in s.items()} for k, s in optim["state"].items()},
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "rollbacks": result.rollbacks,
        "saves": seen,
    }
    end_run(accelerator)
    print_result(record)


if __name__ == "__main__":
    main()
