"""Time Lightning with ``SafeLoopCallback`` against plain Lightning on the same model and data.

Fits alternate (plain, callback, callback without diagnostics, then the next order) in one
process, so that every variant sees the same machine state; each is a fresh ``Trainer`` and
module with the same seed and data. Two clocks: wall time (``time.perf_counter``) and the
process's CPU time (``time.process_time``) on one torch thread; on a shared virtual machine wall
time also counts the time others get, so the CPU time is the steadier of the two. Two spans:

- per step: from the start of step ``--skip + 1`` to the end of the last step (a callback placed
  first times it), the steady state the 3% target is about;
- the whole ``trainer.fit``, which adds what runs once: the callback's checkpoint before the
  first step (``rollback=True``, the default, writes model and optimizer to a temporary folder),
  the first-batch checks and the end-of-fit report.

Three ratios per comparison: best/best, median/median, and the median of the per-round ratios
(each round runs the variants back to back, which cancels slow drift in machine speed; the
steadiest of the three on a loaded machine). With ``--hooks`` every round also runs the
callback with each of its hooks timed (CPU time inside them), which measures the added work
directly, away from the noise of whole steps; Lightning's dispatch to one more callback and the
gate's own lines inside ``optimizer.step`` are left out of it. Usage:

    python benchmarks/lightning_overhead.py               # 3x512 MLP, AdamW, 200 steps, 7 rounds
    python benchmarks/lightning_overhead.py --fused       # AdamW(fused=True): no host read per step
    python benchmarks/lightning_overhead.py --manual      # manual optimization in both
    python benchmarks/lightning_overhead.py --hooks       # and the CPU time inside each hook
    python benchmarks/lightning_overhead.py --instructions --batch 64 --steps 31 --skip 10  # callgrind

``--instructions`` runs each variant once under valgrind's callgrind, collection switched on at
the start of step ``--skip + 1`` and off at the start of the last step (a callback placed first
toggles it), so the count covers whole steps ``--skip + 1 .. --steps - 1``: data, forward,
backward, update, every hook and the log steps among them. Instruction counts do not depend on
what else the machine runs; they do not see cache misses, which a loaded machine adds to small
torch ops most. Slow: with `--steps 31 --skip 10` two variants side by side had not finished after
42 minutes on a shared 2-core machine (batch 256 steps and Lightning's import, all under
callgrind); with `--batch 64 --steps 31 --skip 10` (the figures in docs/performance.md) they took
about 20 minutes beside two other callgrind runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError as error:  # the benchmark needs the extra; the message says which
    raise SystemExit(f'{error}: pip install "safeloop[lightning]"') from error

from safeloop.lightning import SafeLoopCallback

Clocks = tuple[float, float]  # (wall, cpu) seconds


class Module(pl.LightningModule):
    """A ``depth`` x ``width`` ReLU MLP classifier, cross-entropy, AdamW at 1e-3."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(args.depth):
            layers += [nn.Linear(args.width, args.width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(args.width, args.classes))
        self.fused = args.fused
        self.automatic_optimization = not args.manual

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self.net(inputs), targets)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=self.fused or None)


class StepTimer(pl.Callback):
    """Both clocks from the start of step ``skip + 1`` to the end of training (placed first)."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.start: Clocks | None = None
        self.span: Clocks | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.skip and self.start is None:
            self.start = (time.perf_counter(), time.process_time())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.start is not None  # invariant: --steps > --skip (checked in main)
        self.span = (time.perf_counter() - self.start[0], time.process_time() - self.start[1])


class InstructionWindow(pl.Callback):
    """Turns callgrind's collection on at the start of step ``skip + 1``, off at the last (placed first)."""

    def __init__(self, skip: int, last: int) -> None:
        self.toggles = {skip, last - 1}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step in self.toggles:
            self.toggles.discard(trainer.global_step)
            torch._C._valgrind_toggle()


def make_loader(args: argparse.Namespace) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, args.width, generator=gen)
    y = torch.randint(0, args.classes, (args.samples,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=True, generator=gen)


def time_hooks(callback: SafeLoopCallback, spent: dict[str, float]) -> SafeLoopCallback:
    """Wrap each ``on_*`` hook of ``callback`` (on the instance) to add its CPU time to ``spent``."""
    for name in [n for n in dir(callback) if n.startswith("on_")]:
        hook = getattr(callback, name)

        def timed(*args: Any, _hook: Callable[..., Any] = hook, _name: str = name, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return _hook(*args, **kwargs)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.process_time() - start

        setattr(callback, name, timed)
    return callback


def run(
    args: argparse.Namespace, guards: dict[str, Any] | None, spent: dict[str, float] | None = None
) -> tuple[Clocks, Clocks]:
    """One fit: (per-step span, whole fit), each (wall, cpu) seconds; ``guards`` None: no callback.

    With ``spent``, the callback's hooks are timed into it (:func:`time_hooks`).
    """
    timer = StepTimer(args.skip)
    callbacks: list[pl.Callback] = [timer]
    if args.inner is not None:
        callbacks.insert(0, InstructionWindow(args.skip, args.steps))
    if guards is not None:
        callback = SafeLoopCallback(summary=False, **guards)
        callbacks.append(callback if spent is None else time_hooks(callback, spent))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    module, loader = Module(args), make_loader(args)
    start = (time.perf_counter(), time.process_time())
    trainer.fit(module, loader)
    whole = (time.perf_counter() - start[0], time.process_time() - start[1])
    assert timer.span is not None  # set at on_train_end
    return timer.span, whole


# the variants of --instructions: the callback's keywords (None: plain Lightning)
COUNTED: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "callback": {},
    "no-diagnostics": {"diagnostics": False},
}
_COLLECTED = re.compile(r"Collected : (\d+)")


def count_instructions(args: argparse.Namespace, variant: str) -> int:
    """Instructions of steps ``--skip + 1 .. --steps - 1`` of ``variant``, counted by callgrind."""
    command = [
        "valgrind", "--tool=callgrind", "--collect-atstart=no", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--inner", variant, "--steps", str(args.steps), "--skip", str(args.skip),
        "--width", str(args.width), "--depth", str(args.depth), "--batch", str(args.batch),
        "--samples", str(args.samples),
        *(["--fused"] if args.fused else []), *(["--manual"] if args.manual else []),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = _COLLECTED.findall(done.stderr + done.stdout)
    if done.returncode != 0 or len(found) != 1:
        raise RuntimeError(
            f"{variant}: exit status {done.returncode}:\n{(done.stderr + done.stdout)[-4000:]}"
        )
    return int(found[0])


def instructions(args: argparse.Namespace) -> None:
    """Print the instructions per step of each variant and the callback's ratio to plain Lightning."""
    counted = args.steps - 1 - args.skip
    variants = ["plain", *(v for v in args.counted if v != "plain")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        totals = dict(zip(variants, pool.map(lambda v: count_instructions(args, v), variants), strict=True))
    kind = "manual" if args.manual else "automatic"
    print(f"model: {args.depth}x{args.width} MLP, batch {args.batch}, AdamW fused: {args.fused}, {kind}")
    print(f"instructions per step over steps {args.skip + 1}-{args.steps - 1} (callgrind):")
    for variant, total in totals.items():
        ratio = total / totals["plain"]
        print(f"{variant:<16} {total / counted / 1e6:10.3f} M  ({ratio:.4f} of plain)")
    if "callback" in totals:
        added = (totals["callback"] - totals["plain"]) / counted
        print(f"added by the callback: {added / 1e6:.3f} M per step")


def ratios(slow: list[float], base: list[float]) -> str:
    """best/best, median/median, and the median of the per-round ratios."""
    paired = statistics.median(s / b for s, b in zip(slow, base, strict=True))
    return (
        f"best {min(slow) / min(base):.4f}  median {statistics.median(slow) / statistics.median(base):.4f}"
        f"  per-round {paired:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip", type=int, default=20, help="steps before the per-step span starts")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--fused", action="store_true", help="AdamW(fused=True) in every variant")
    parser.add_argument("--manual", action="store_true", help="manual optimization in every variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noisy)")
    parser.add_argument("--hooks", action="store_true", help="also time the callback's hooks, in each round")
    parser.add_argument("--instructions", action="store_true", help="count instructions with callgrind")
    parser.add_argument(
        "--counted", nargs="+", choices=list(COUNTED), default=list(COUNTED), help="variants to count"
    )
    parser.add_argument("--inner", choices=list(COUNTED), help=argparse.SUPPRESS)  # one fit under callgrind
    args = parser.parse_args()
    if args.steps <= args.skip + 1:
        parser.error(f"--steps ({args.steps}) must be above --skip + 1 ({args.skip + 1})")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's advice on workers and logging intervals
    for name in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: False", per fit
        logging.getLogger(name).setLevel(logging.ERROR)

    if args.inner is not None:
        run(args, COUNTED[args.inner])
        return
    if args.instructions:
        instructions(args)
        return
    variants: dict[str, Callable[[], tuple[Clocks, Clocks]]] = {
        "plain Lightning": lambda: run(args, None),
        "+ SafeLoopCallback": lambda: run(args, {}),
        "+ callback, diagnostics=False": lambda: run(args, {"diagnostics": False}),
    }
    hook_fits: list[dict[str, float]] = []  # per timed fit: CPU seconds inside each hook

    def hooks_timed() -> tuple[Clocks, Clocks]:
        hook_fits.append({})
        return run(args, {}, hook_fits[-1])

    if args.hooks:
        variants["+ callback, hooks timed"] = hooks_timed
    load_before = os.getloadavg()
    for variant in variants.values():  # warm-up: allocator, thread pools, first-call costs
        variant()
    hook_fits.clear()
    steps: dict[str, list[Clocks]] = {label: [] for label in variants}
    fits: dict[str, list[Clocks]] = {label: [] for label in variants}
    for round_ in range(args.rounds):
        labels = list(variants)  # the order turns each round: no variant always runs first
        labels = labels[round_ % len(labels) :] + labels[: round_ % len(labels)]
        for label in labels:
            span, whole = variants[label]()
            steps[label].append(span)
            fits[label].append(whole)
    load_after = os.getloadavg()

    timed = args.steps - args.skip
    kind = "manual" if args.manual else "automatic"
    threads = torch.get_num_threads()
    print(
        f"model: {args.depth}x{args.width} MLP, batch {args.batch}, {args.steps} steps ({kind} optimization)"
    )
    print(f"AdamW fused: {args.fused}; per step: steps {args.skip + 1}-{args.steps}; threads {threads}")
    print(
        f"rounds: {args.rounds}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        f"({os.cpu_count()} CPUs)"
    )
    ours, plain, quiet = "+ SafeLoopCallback", "plain Lightning", "+ callback, diagnostics=False"
    for clock, index in (("CPU", 1), ("wall", 0)):
        print(f"-- {clock} time, ms/step (best, median) and whole fit in s (median)")
        for label in variants:
            per_step = [s[index] * 1000 / timed for s in steps[label]]
            whole = statistics.median(f[index] for f in fits[label])
            print(
                f"{label:<31} best {min(per_step):7.3f}  median {statistics.median(per_step):7.3f}"
                f"  fit {whole:6.3f}"
            )
        step_times = {label: [s[index] for s in steps[label]] for label in variants}
        fit_times = {label: [f[index] for f in fits[label]] for label in variants}
        print(f"callback / plain, per step:       {ratios(step_times[ours], step_times[plain])}")
        print(f"callback / plain, whole fit:      {ratios(fit_times[ours], fit_times[plain])}")
        print(f"diagnostics on / off, per step:   {ratios(step_times[ours], step_times[quiet])}")
    if hook_fits:  # the first step's checks are in the sum: a few ms over all the steps
        once = ("on_fit_start", "on_train_start", "on_train_end", "on_fit_end", "on_exception")
        fits_timed = len(hook_fits)
        print(f"-- CPU time in the callback's hooks, ms/step over {args.steps} (median of {fits_timed} fits)")
        per_step = [
            sum(v for k, v in spent.items() if k not in once) * 1000 / args.steps for spent in hook_fits
        ]
        for name in sorted({k for spent in hook_fits for k in spent}):
            value = statistics.median(spent.get(name, 0.0) for spent in hook_fits) * 1000
            print(
                f"{name:<31} {value / args.steps:7.4f}"
                + (f"  (once: {value:.2f} ms)" if name in once else "")
            )
        plain_median = statistics.median(s[1] for s in steps[plain]) * 1000 / timed
        share = statistics.median(per_step) / plain_median
        total = statistics.median(per_step)
        print(f"per-step hooks, sum:            {total:7.4f}  ({share:.2%} of plain's median step)")


if __name__ == "__main__":
    main()
