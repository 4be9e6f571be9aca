"""The DeepSpeed mode of ``checkpoint_io.py``: ZeRO save and load, safeloop against DeepSpeed's own.

Run through ``python benchmarks/checkpoint_io.py --processes 2 --engine deepspeed [--stage 3]``.
The model of ``checkpoint_io.py`` (25M parameters, AdamW state) under DeepSpeed ZeRO on CPU
processes (gloo). safeloop's save (every process gathers the whole tensors with
``safe_get_full_*`` and writes its share as safetensors, then the JSON state, per-process files,
the hashed manifest, fsyncs and the rename; ``gather``: the gathers alone) against DeepSpeed's
``engine.save_checkpoint`` (its own per-process partition files, ``torch.save``); loads back into
the live engine (safeloop: every file's hash checked, then each tensor's part written and the
weights repartitioned) against ``engine.load_checkpoint``, warm and cold. Every timing is the
slowest process's, after a barrier.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist
from accelerate import Accelerator
from deepspeed_overhead import deepspeed_accelerator  # beside this script
from sharded_io import _evict, _timed, load_through_manager, print_timings, save_through_manager
from torch import nn

from safeloop.checkpoint.manager import CheckpointManager
from safeloop.checkpoint.zero_state import ZeroState

Build = Callable[[], tuple[nn.Module, torch.optim.Optimizer]]


def _accelerator(stage: int) -> Accelerator:
    """Accelerate's DeepSpeed plugin on CPU, as ``deepspeed_overhead.py`` builds it."""
    return deepspeed_accelerator(argparse.Namespace(ddp=False, batch=4, stage=stage))


def run_zero(rounds: int, build: Build, stage: int) -> None:
    """One process of the DeepSpeed benchmark (under torchrun)."""
    accelerator = _accelerator(stage)
    model, _ = build()
    model.zero_grad(set_to_none=True)
    engine, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    accelerator.backward(engine(torch.randn(4, 2048)).sum())  # AdamW moments to save
    optimizer.step()
    optimizer.zero_grad()
    state = ZeroState(
        engine, accelerator.unwrap_model(engine), accelerator.process_index, accelerator.num_processes
    )
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-")) if accelerator.is_main_process else None
    holder = [str(root)]
    dist.broadcast_object_list(holder)  # a path string, between the benchmark's own processes
    root = Path(holder[0])
    manager = CheckpointManager(root / "safeloop", accelerator, every=1, keep=rounds + 1)
    results: dict[str, list[float]] = {
        key: [] for key in ("safe save", "gather", "ds save", "warm safe", "warm ds", "cold safe", "cold ds")
    }

    def safeloop_save(step: int) -> None:
        save_through_manager(manager, state, step)

    def safeloop_load(step: int) -> None:
        load_through_manager(manager, state, step)

    def deepspeed_save(step: int) -> None:
        engine.save_checkpoint(str(root / "ds"), tag=f"step{step}")

    def deepspeed_load(step: int) -> None:
        engine.load_checkpoint(str(root / "ds"), tag=f"step{step}")

    try:
        for step in range(1, rounds + 1):
            results["safe save"].append(_timed(accelerator, functools.partial(safeloop_save, step)))
            results["gather"].append(_timed(accelerator, state.capture))  # the gathers alone
            results["ds save"].append(_timed(accelerator, functools.partial(deepspeed_save, step)))
            for cache in ("warm", "cold"):
                for name, run in (("safe", safeloop_load), ("ds", deepspeed_load)):
                    if cache == "cold":
                        if accelerator.is_main_process:
                            _evict(root)
                        accelerator.wait_for_everyone()
                    else:
                        run(step)  # fill the page cache
                    results[f"{cache} {name}"].append(_timed(accelerator, functools.partial(run, step)))
        if accelerator.is_main_process:
            _report(results, root, rounds, accelerator.num_processes, stage)
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()


def _report(results: dict[str, list[float]], root: Path, rounds: int, processes: int, stage: int) -> None:
    safe = root / "safeloop" / f"step-{rounds:08d}"
    size = sum(p.stat().st_size for p in safe.rglob("*") if p.is_file())
    ds_size = sum(p.stat().st_size for p in (root / "ds" / f"step{rounds}").rglob("*") if p.is_file())
    print(f"{processes} processes (DeepSpeed ZeRO-{stage}, gloo), rounds: {rounds}, cores: {os.cpu_count()}")
    print(f"safeloop checkpoint {size / 1e6:.0f} MB, DeepSpeed's own {ds_size / 1e6:.0f} MB")
    print_timings(results)

    def ratio(ours: str, base: str) -> str:
        return f"{min(results[ours]) / min(results[base]):.2f}"

    print(f"save ratio vs DeepSpeed's save_checkpoint (best/best): {ratio('safe save', 'ds save')}")
    print(f"share of safeloop's save spent gathering the whole tensors: {ratio('gather', 'safe save')}")
    warm, cold = ratio("warm safe", "warm ds"), ratio("cold safe", "cold ds")
    print(f"load ratio vs DeepSpeed's load_checkpoint, warm: {warm}, cold: {cold}")
    single = float(os.environ.get("SAVE_FILE_BEST", "nan"))
    print(
        f"save ratio vs one process's save_file of the whole state: {min(results['safe save']) / single:.2f}"
    )
