"""The 2-process mode of ``checkpoint_io.py``: sharded (FSDP2) save and load, safeloop against DCP.

Run through ``python benchmarks/checkpoint_io.py --processes 2``; see its docstring.
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from safeloop.checkpoint.manager import CheckpointManager, Snapshot
from safeloop.checkpoint.sharded import SHARD_DIR, ShardedState
from safeloop.checkpoint.staging import ShardWrite

Build = Callable[[], tuple[nn.Module, torch.optim.Optimizer]]


def launch(
    processes: int,
    rounds: int,
    script: str,
    build: Build,
    baseline_save: Callable,
    extra: tuple[str, ...] = (),
) -> None:
    """Time ``save_file`` of the whole state here (one process), then the sharded runs under torchrun."""
    model, optimizer = build()
    times = []
    for _ in range(rounds):
        work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
        try:
            start = time.perf_counter()
            baseline_save(work, model, optimizer)
            times.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    best, median = min(times), statistics.median(times)
    print(f"one process, save_file of the whole state: best {best:.3f} s, median {median:.3f} s")
    del model, optimizer
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", SAVE_FILE_BEST=str(min(times)))
    command = [str(torchrun), "--nproc_per_node", str(processes), script, "--rounds", str(rounds)]
    command += ["--processes", str(processes), *extra]
    subprocess.run(command, env=env, check=True)


def save_through_manager(manager: CheckpointManager, state: Any, step: int) -> None:
    """safeloop's sharded save of ``state`` (``ShardedState`` or ``ZeroState``): shards, JSON, manifest.

    With an asynchronous manager this returns once the shards are copied to host memory (what the
    step boundary waits for); the rest runs in the background until ``manager.poll(wait=True)``.
    """
    taken = state.capture()
    shards = ShardWrite(state, taken.tensors)
    snapshot = Snapshot(
        step=step, model=None, rank={}, trainer={"global_step": step}, meta={"healthy": True},
        shared={"optimizer_values": taken.values, "shard_info": {"shapes": taken.shapes}},
        write_shards=shards.write, stage_shards=shards.stage,
    )  # fmt: skip
    manager.save(snapshot)


def load_through_manager(manager: CheckpointManager, state: Any, step: int) -> None:
    """safeloop's load as a resume: every file hashed (the shards by all processes), then read."""
    found = manager.resolve_and_load(manager.directory / f"step-{step:08d}")
    assert found is not None
    path, saved = found
    state.load(path / SHARD_DIR, saved.parts["optimizer_values"])


def print_timings(results: dict[str, list[float]]) -> None:
    """Best and median of each timing."""
    for key, values in results.items():
        print(f"{key:<12} best {min(values):7.3f} s   median {statistics.median(values):7.3f} s")


class _TorchWriterState:
    """``ShardedState`` writing its shards with torch's ``HuggingFaceStorageWriter`` itself.

    safeloop's save before its own shard writer: the same files, each built in memory first.
    """

    def __init__(self, shards: ShardedState) -> None:
        self.capture = shards.capture
        self.copy_to_host = shards.copy_to_host

    def write(self, tensors: dict[str, torch.Tensor], folder: Path, group: Any = None) -> None:
        writer = HuggingFaceStorageWriter(str(folder), save_distributed=True)
        dcp.save(tensors, storage_writer=writer, process_group=group)


def _evict(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _timed(accelerator: Accelerator, run: Callable[[], object]) -> float:
    """Seconds the slowest process took for ``run``, all starting together."""
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    run()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def run_sharded(rounds: int, build: Build) -> None:
    """One process of the sharded benchmark (under torchrun)."""
    accelerator = Accelerator(cpu=True)  # the processes and their gloo group
    model, _ = build()
    for layer in model:  # FSDP2, as Accelerate's plugin applies it: each layer, then the root
        fully_shard(layer)
    fully_shard(model)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 2048)).sum().backward()  # AdamW moments to save
    inner.step()
    inner.zero_grad()
    shards = ShardedState(model, inner)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-")) if accelerator.is_main_process else None
    holder = [str(root)]
    dist.broadcast_object_list(holder)  # a path string, between the benchmark's own processes
    root = Path(holder[0])
    manager = CheckpointManager(root / "safeloop", accelerator, every=1, keep=rounds + 1)
    # "torch save": safeloop's whole save with torch's own safetensors writer (its writer before)
    torch_manager = CheckpointManager(root / "torch-writer", accelerator, every=1, keep=rounds + 1)
    # "async save": what the step boundary waits for with async_checkpoint=True (the shards
    # copied to host memory, the per-process files); "async rest": the background part after it
    async_manager = CheckpointManager(root / "async", accelerator, every=1, keep=rounds + 1, async_save=True)
    saves = ("safe save", "dcp save", "dcp-st save", "shard save", "torch save", "async save")
    loads = tuple(f"{cache} {name}" for cache in ("warm", "cold") for name in ("safe", "dcp", "dcp-st"))
    results: dict[str, list[float]] = {key: [] for key in (*saves, "async rest", *loads)}
    values: dict = {}

    def safeloop_save(step: int) -> None:
        save_through_manager(manager, shards, step)

    def safetensors_save(step: int) -> None:  # torch's own safetensors writer: no manifest, no hashes
        taken = shards.capture()
        values[step] = taken.values
        writer = HuggingFaceStorageWriter(str(root / f"st-{step}"), save_distributed=True)
        dcp.save(taken.tensors, storage_writer=writer)

    def shard_save(step: int) -> None:  # safeloop's shard writer alone (hashing as it writes): no manifest
        shards.write(shards.capture().tensors, root / f"sw-{step}")

    def torch_writer_save(step: int) -> None:
        save_through_manager(torch_manager, _TorchWriterState(shards), step)

    def async_save(step: int) -> None:
        save_through_manager(async_manager, shards, step)

    def safetensors_load(step: int) -> None:  # DCP's safetensors reader alone: nothing verified
        shards.load(root / f"st-{step}", values[step])

    def dcp_save(step: int) -> None:
        model_state, optim_state = get_state_dict(model, inner, options=options)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(root / f"dcp-{step}"))

    def safeloop_load(step: int) -> None:  # as a resume: every file hashed, the shards by all
        load_through_manager(manager, shards, step)

    def dcp_load(step: int) -> None:
        model_state, optim_state = get_state_dict(model, inner, options=options)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(root / f"dcp-{step}"))
        set_state_dict(
            model, inner, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
        )

    save_runs = dict(
        zip(
            saves,
            (safeloop_save, dcp_save, safetensors_save, shard_save, torch_writer_save, async_save),
            strict=True,
        )
    )
    async_save(0)  # untimed: the first asynchronous save makes the background's process group
    async_manager.poll(wait=True)
    try:
        for step in range(1, rounds + 1):
            # the order alternates: the disk's and the page cache's state carries over from one
            # save to the next, so no writer always follows the same other one
            for key in saves if step % 2 else reversed(saves):
                results[key].append(_timed(accelerator, functools.partial(save_runs[key], step)))
                if key == "async save":  # the background part, until durable, before anything else
                    results["async rest"].append(_timed(accelerator, lambda: async_manager.poll(wait=True)))
            for cache in ("warm", "cold"):
                for name, run in (("safe", safeloop_load), ("dcp", dcp_load), ("dcp-st", safetensors_load)):
                    if cache == "cold":
                        if accelerator.is_main_process:
                            _evict(root)
                    else:
                        run(step)  # fill the page cache
                    results[f"{cache} {name}"].append(_timed(accelerator, functools.partial(run, step)))
        if accelerator.is_main_process:
            _report(results, root, rounds, accelerator.num_processes)
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()


def _report(results: dict[str, list[float]], root: Path, rounds: int, processes: int) -> None:
    safe = root / "safeloop" / f"step-{rounds:08d}"
    size = sum(p.stat().st_size for p in safe.rglob("*") if p.is_file())
    dcp_size = sum(p.stat().st_size for p in (root / f"dcp-{rounds}").rglob("*") if p.is_file())
    print(f"{processes} processes (FSDP2, gloo), rounds: {rounds}, cores: {os.cpu_count()}")
    print(f"safeloop checkpoint {size / 1e6:.0f} MB, DCP default {dcp_size / 1e6:.0f} MB")
    print_timings(results)

    def ratio(ours: str, base: str) -> str:
        """Best over best, then the median of the rounds' own ratios (each round's runs are paired)."""
        paired = statistics.median(a / b for a, b in zip(results[ours], results[base], strict=True))
        return f"{min(results[ours]) / min(results[base]):.2f} (median per round {paired:.2f})"

    def per_round(ours: str, base: str) -> str:
        return " ".join(f"{a / b:.2f}" for a, b in zip(results[ours], results[base], strict=True))

    print(f"save ratio vs DCP default writer, best/best: {ratio('safe save', 'dcp save')}")
    print(f"  per round: {per_round('safe save', 'dcp save')}")
    for cache in ("warm", "cold"):
        print(
            f"{cache} load ratio vs DCP default reader, best/best: {ratio(f'{cache} safe', f'{cache} dcp')}"
        )
        print(f"  per round: {per_round(f'{cache} safe', f'{cache} dcp')}")
    print(f"torch's safetensors writer alone vs DCP's default writer: {ratio('dcp-st save', 'dcp save')}")
    print(
        "safeloop's shard writer alone (hashing as it writes) vs DCP's default writer: "
        f"{ratio('shard save', 'dcp save')}"
    )
    print(f"safeloop vs its shard writer alone: {ratio('safe save', 'shard save')}")
    print(
        f"safeloop with torch's safetensors writer vs DCP's default writer: {ratio('torch save', 'dcp save')}"
    )
    print(f"  per round: {per_round('torch save', 'dcp save')}")
    warm, cold = ratio("warm dcp-st", "warm dcp"), ratio("cold dcp-st", "cold dcp")
    print(f"DCP's safetensors reader alone vs its default reader, warm: {warm}, cold: {cold}")
    warm, cold = ratio("warm safe", "warm dcp-st"), ratio("cold safe", "cold dcp-st")
    print(f"safeloop load vs DCP's safetensors reader, warm: {warm}, cold: {cold}")
    boundary, rest = results["async save"], results["async rest"]
    print(
        f"async_checkpoint: the step boundary waits {min(boundary):.3f} s best, "
        f"{statistics.median(boundary):.3f} s median ({ratio('async save', 'safe save')} of the "
        f"synchronous save); the background part then takes {min(rest):.3f} s best, "
        f"{statistics.median(rest):.3f} s median"
    )
    single = float(os.environ.get("SAVE_FILE_BEST", "nan"))
    print(
        f"save ratio vs one process's save_file of the whole state: {min(results['safe save']) / single:.2f}"
    )
