"""Time safeloop's checkpoint save and load against plain safetensors on the same tensors.

The model is ~100 MB of float32 weights (25M parameters) with AdamW state (two moments: another
~200 MB). The save baseline writes the same tensors with `safetensors.torch.save_file` and
fsyncs them; safeloop adds the JSON state, chunked SHA-256 digests, fsyncs of files and folders,
and an atomic rename. Two load baselines bring the same tensors into memory: `load_file` with
the pread backend (the fastest plain way) and reading the bytes then `safetensors.torch.load`;
safeloop's load also verifies every digest. Loads are timed with the files in the page cache
("warm", as for a rollback to a checkpoint just written) and evicted from it with
`posix_fadvise(DONTNEED)` ("cold", as for a resume after a restart). Runs alternate; the best of
each is reported.

``--processes 2`` times sharded checkpoints instead: the same model under FSDP2 on 2 CPU
processes (gloo, launched through torchrun by the script itself). safeloop's sharded save (the
shards planned by DCP and streamed by safeloop's writer in the layout of DCP's
``HuggingFaceStorageWriter``, the JSON state, per-process files, the hashed manifest, fsyncs and
the rename) against DCP's default ``FileSystemWriter`` (``.distcp`` files and a pickled
``.metadata``, fsynced), against torch's ``HuggingFaceStorageWriter`` alone and safeloop's shard
writer alone (hashing as it writes, no manifest), and safeloop's save with torch's writer in place
of its own, all starting from the live model with ``get_state_dict``, in an order that alternates per round
(each round's ratio is printed too);
loads back into the live model (safeloop: every file's hash checked, then DCP's
``HuggingFaceStorageReader``), warm and cold; and, for scale, ``save_file`` of the same whole state
by one process. Every timing is the slowest process's, after a barrier. ``--engine deepspeed``
times the same under DeepSpeed ZeRO (``--stage``, default 3) against DeepSpeed's own
``save_checkpoint`` / ``load_checkpoint`` (``zero_io.py``). Usage:

    python benchmarks/checkpoint_io.py [--rounds 5] [--processes 2 [--engine deepspeed --stage 3]]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file, save_file
from torch import nn

from safeloop.checkpoint.format import split_state
from safeloop.checkpoint.state import read_state, state_files
from safeloop.checkpoint.store import write_checkpoint


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(6)])  # 25.2M parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 2048)).sum().backward()
    optimizer.step()
    return model, optimizer


def baseline_save(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    _, opt_tensors = split_state(optimizer.state_dict(), "optimizer")
    for name, tensors in (("model.safetensors", model.state_dict()), ("optimizer.safetensors", opt_tensors)):
        path = folder / name
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        with path.open("rb") as fh:
            os.fsync(fh.fileno())


_NAMES = ("model.safetensors", "optimizer.safetensors")


def baseline_load_file(folder: Path) -> None:
    # pread: the tensors are in memory afterwards (the default mmap backend touches nothing yet)
    for name in _NAMES:
        load_file(folder / name, backend="pread")


def baseline_read_load(folder: Path) -> None:
    for name in _NAMES:
        load_tensors((folder / name).read_bytes())


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (they are clean: fsynced)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def safeloop_save(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    files = state_files(model.state_dict(), {"optimizer": optimizer.state_dict()}, {"global_step": 1})
    return write_checkpoint(root, 1, files, meta={"healthy": True})


def safeloop_load(path: Path) -> None:
    read_state(path)  # verifies every SHA-256 while it deserialises


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=1, help="2: sharded checkpoints under FSDP2")
    parser.add_argument("--engine", choices=("fsdp2", "deepspeed"), default="fsdp2", help="with --processes")
    parser.add_argument("--stage", type=int, default=3, help="the ZeRO stage with --engine deepspeed")
    args = parser.parse_args()
    if args.processes > 1:
        from sharded_io import launch, run_sharded  # beside this script

        if "RANK" not in os.environ:
            extra = ("--engine", args.engine, "--stage", str(args.stage))
            launch(args.processes, args.rounds, __file__, build, baseline_save, extra)
        elif args.engine == "deepspeed":
            from zero_io import run_zero

            run_zero(args.rounds, build, args.stage)
        else:
            run_sharded(args.rounds, build)
        return
    model, optimizer = build()
    loads = ("load_file", "read+load", "safeloop")
    results: dict[str, list[float]] = {"base save": [], "safe save": []}
    results.update({f"{cache} {name}": [] for cache in ("warm", "cold") for name in loads})
    for _ in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
        try:
            start = time.perf_counter()
            baseline_save(work, model, optimizer)
            results["base save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            path = safeloop_save(work / "run", model, optimizer)
            results["safe save"].append(time.perf_counter() - start)
            runs = {
                "load_file": functools.partial(baseline_load_file, work),
                "read+load": functools.partial(baseline_read_load, work),
                "safeloop": functools.partial(safeloop_load, path),
            }
            for cache in ("warm", "cold"):
                for name, run in runs.items():
                    if cache == "cold":
                        evict(work)
                        evict(path)
                    else:
                        run()  # fill the page cache
                    start = time.perf_counter()
                    run()
                    results[f"{cache} {name}"].append(time.perf_counter() - start)
            size = sum(p.stat().st_size for p in path.iterdir())
            count = len(list(path.iterdir()))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"checkpoint: {size / 1e6:.0f} MB in {count} files, rounds: {args.rounds}, cores: {os.cpu_count()}")
    for key, values in results.items():
        print(f"{key:<15} best {min(values):7.3f} s   median {statistics.median(values):7.3f} s")

    def ratio(ours: str, base: str) -> str:
        return f"{min(results[ours]) / min(results[base]):.2f}"

    print(f"save ratio (best/best): {ratio('safe save', 'base save')}")
    for cache in ("warm", "cold"):
        ours = f"{cache} safeloop"
        print(
            f"{cache} load ratio (best/best): {ratio(ours, f'{cache} load_file')} vs load_file, "
            f"{ratio(ours, f'{cache} read+load')} vs read+load"
        )


if __name__ == "__main__":
    main()
