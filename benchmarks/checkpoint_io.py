"""Time safeloop's checkpoint save and load against plain safetensors on the same tensors.

The model is ~100 MB of float32 weights (25M parameters) with AdamW state (two moments: another
~200 MB). The baseline writes the same tensors with `safetensors.torch.save_file` and fsyncs
them; safeloop adds the JSON state, a SHA-256 manifest, fsyncs of files and folders, and an atomic
rename, and on load verifies every hash. Runs alternate; the best of each is reported. Usage:

    python benchmarks/checkpoint_io.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file
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


def baseline_load(folder: Path) -> None:
    # read into memory as safeloop does: load_file alone maps the file lazily and touches nothing
    for name in ("model.safetensors", "optimizer.safetensors"):
        load_tensors((folder / name).read_bytes())


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
    args = parser.parse_args()
    model, optimizer = build()
    results: dict[str, list[float]] = {k: [] for k in ("base save", "base load", "safe save", "safe load")}
    for _ in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
        try:
            start = time.perf_counter()
            baseline_save(work, model, optimizer)
            results["base save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            baseline_load(work)
            results["base load"].append(time.perf_counter() - start)
            start = time.perf_counter()
            path = safeloop_save(work / "run", model, optimizer)
            results["safe save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            safeloop_load(path)
            results["safe load"].append(time.perf_counter() - start)
            size = sum(p.stat().st_size for p in path.iterdir())
            count = len(list(path.iterdir()))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"checkpoint: {size / 1e6:.0f} MB in {count} files, rounds: {args.rounds}")
    for key, values in results.items():
        print(f"{key:<10} best {min(values):7.3f} s")
    print(f"save ratio (best/best): {min(results['safe save']) / min(results['base save']):.3f}")
    print(f"load ratio (best/best): {min(results['safe load']) / min(results['base load']):.3f}")


if __name__ == "__main__":
    main()
