"""Count the instructions of one optimizer step with valgrind's callgrind: SafeTrainer vs bare loop.

Wall and CPU time on a shared 2-core machine vary by +-20% between identical runs; instruction
counts do not (the same binary, inputs and environment give the same count, whatever else the
machine does). Each loop runs twice under callgrind, for ``--short`` and ``--long`` steps, and the
difference divided by the extra steps is the count of one step: start-up, imports, the first
step's checks and the end of ``fit`` cancel out. Whole-process totals still vary by about 0.1%
between identical runs (threads that wait on timers: checkpoint hashing, gloo), which is 0.4M
instructions per step over 40 extra steps; 100 extra steps (the default) divide that by 2.5. For
a before/after comparison of the same loop, compare per function (``callgrind_annotate`` of the
two runs' output files): that isolates the change. Needs ``valgrind`` on the PATH; each run takes
4-8 minutes on this 2-core machine. Usage:

    python benchmarks/instructions.py                      # bare loop and SafeTrainer (defaults)
    python benchmarks/instructions.py --loops safeloop     # SafeTrainer only
    python benchmarks/instructions.py --width 1536         # a larger model
    python benchmarks/instructions.py --loops safeloop no-diagnostics  # the diagnostics' cost

``--run LOOP --steps N`` is the inner call that runs under valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import make_loader, make_model

_COLLECTED = re.compile(r"Collected : (\d+)")


def run_bare(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    model = make_model(args.width, args.depth, args.classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = make_loader(args.width, args.classes, args.samples, args.batch)
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    while steps < args.steps:
        for inputs, targets in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model(inputs), targets)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            steps += 1
            if steps >= args.steps:
                break


def run_safeloop(args: argparse.Namespace, diagnostics: bool = True) -> None:
    from safeloop import SafeTrainer

    model = make_model(args.width, args.depth, args.classes)
    SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        make_loader(args.width, args.classes, args.samples, args.batch),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=args.steps,
        clip_grad_norm=1.0,
        log_every=args.log_every,
        progress_bar=False,
        diagnostics=diagnostics,
    ).fit()


def count(loop: str, steps: int, args: argparse.Namespace) -> int:
    """Instructions of one whole process running ``loop`` for ``steps`` steps under callgrind."""
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--run", loop, "--steps", str(steps),
        "--width", str(args.width), "--depth", str(args.depth), "--batch", str(args.batch),
        "--log-every", str(args.log_every),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    found = _COLLECTED.findall(done.stderr)
    if not found:
        raise RuntimeError(f"no callgrind total in the output:\n{done.stderr[-2000:]}")
    return int(found[-1])


def add_loop_arguments(parser: argparse.ArgumentParser, long: int) -> None:
    """The model, data and run lengths both loops share (also ``step_profile.py``'s)."""
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--short", type=int, default=20)
    parser.add_argument("--long", type=int, default=long)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_loop_arguments(parser, long=120)
    loops = ["bare", "safeloop", "no-diagnostics"]
    parser.add_argument("--loops", nargs="+", default=["bare", "safeloop"], choices=loops)
    parser.add_argument("--run", choices=loops, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is not None:  # the inner call, under valgrind
        torch.set_num_threads(1)
        if args.run == "bare":
            run_bare(args)
        else:
            run_safeloop(args, diagnostics=args.run == "safeloop")
        return
    print(
        f"model: {args.depth}x{args.width} MLP, batch {args.batch}, AdamW, clip_grad_norm=1.0, "
        f"log_every={args.log_every}; per step = (count({args.long}) - count({args.short})) / "
        f"{args.long - args.short}"
    )
    per_step = {}
    for loop in args.loops:
        short, long = count(loop, args.short, args), count(loop, args.long, args)
        per_step[loop] = (long - short) / (args.long - args.short)
        print(f"{loop:<9} {short:>16,} / {long:>16,} instructions -> {per_step[loop] / 1e6:9.3f} M per step")
    for other, what in (("bare", "SafeTrainer / bare loop"), ("no-diagnostics", "diagnostics on / off")):
        if "safeloop" in per_step and other in per_step:
            ratio = per_step["safeloop"] / per_step[other]
            print(f"{what}, instructions per step: {ratio:.4f} ({(ratio - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
