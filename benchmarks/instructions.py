"""Count the instructions of one optimizer step with valgrind's callgrind: SafeTrainer vs bare loop.

Wall and CPU time on a shared 2-core machine vary by +-20% between identical runs; instruction
counts do not (the same binary, inputs and environment give the same count, whatever else the
machine does). Each loop runs once under callgrind with collection off (start-up and imports are
not counted); it is switched on when the data loader fetches the first sample of batch
``--short`` and off at the first sample of batch ``--long``. Accelerate's loader fetches one
batch ahead, so the count covers exactly the ``long - short`` steps ``short .. long - 1`` (1-based:
their data, forward, backward, optimizer step, and the log steps among them, one in
``log_every``), with the first step's checks, the set-up and the end of ``fit`` outside it.
Per step = that count / (long - short).

For the functions that make the difference, ``--keep DIR`` keeps the callgrind files and
``--functions DIR`` compares them (exclusive instructions per function and per step, SafeTrainer
minus bare, ``callgrind_annotate``). Python's own functions appear as the interpreter's C
functions; ``step_profile.py`` names the Python side. Needs ``valgrind`` on the PATH; a run takes
about 10 minutes per loop on this 2-core machine (the loops run side by side). Usage:

    python benchmarks/instructions.py                      # bare loop and SafeTrainer (defaults)
    python benchmarks/instructions.py --loops safeloop     # SafeTrainer only
    python benchmarks/instructions.py --width 1536         # a larger model
    python benchmarks/instructions.py --loops safeloop no-diagnostics  # the diagnostics' cost
    python benchmarks/instructions.py --accumulation 4 --loops safeloop noise-scale-off  # noise scale
    python benchmarks/instructions.py --processes 2 --jobs 1  # DDP on 2 CPU processes, per process
    python benchmarks/instructions.py --keep /tmp/cg && python benchmarks/instructions.py --functions /tmp/cg

``--run LOOP`` is the inner call that runs under valgrind.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import make_loader, make_model
from torch.utils.data import DataLoader, TensorDataset

_COLLECTED = re.compile(r"Collected : (\d+)")


class _WindowedDataset(TensorDataset):
    """Switches callgrind's collection on at sample ``first`` and off at sample ``last``."""

    def __init__(self, dataset: TensorDataset, first: int, last: int) -> None:
        super().__init__(*dataset.tensors)
        self.toggles, self.fetched = {first, last}, 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if self.fetched in self.toggles:
            torch._C._valgrind_toggle()
        self.fetched += 1
        return super().__getitem__(index)


def make_windowed_loader(args: argparse.Namespace) -> DataLoader:
    """``overhead.make_loader``'s data; under ``--window`` callgrind counts steps short .. long - 1."""
    loader = make_loader(args.width, args.classes, args.samples, args.batch)
    if not getattr(args, "window", False):  # step_profile.py's arguments have no --window
        return loader
    dataset = _WindowedDataset(loader.dataset, args.short * args.batch, args.long * args.batch)
    return DataLoader(dataset, batch_size=args.batch, shuffle=True)


def run_bare(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    model = make_model(args.width, args.depth, args.classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = make_windowed_loader(args)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accumulation)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    while steps < args.steps:
        for inputs, targets in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model(inputs), targets)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            steps += 1
            if steps >= args.steps:
                break


def run_safeloop(args: argparse.Namespace, diagnostics: bool = True, noise_scale: str = "auto") -> None:
    from safeloop import SafeTrainer

    model = make_model(args.width, args.depth, args.classes)
    accumulation = getattr(args, "accumulation", 1)
    SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        make_windowed_loader(args),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=max(1, args.steps // accumulation),
        gradient_accumulation_steps=accumulation,
        gradient_noise_scale=noise_scale,
        clip_grad_norm=1.0,
        log_every=args.log_every,
        progress_bar=False,
        diagnostics=diagnostics,
    ).fit()


def count(loop: str, args: argparse.Namespace) -> int:
    """Instructions of the counted steps of ``loop`` (the most of any process), by callgrind.

    With ``--processes N`` (N > 1) the loop runs under ``torchrun`` on N CPU processes (DDP,
    gloo), each under its own callgrind, and each process's count is printed. With ``--keep DIR``
    the callgrind output is kept as ``DIR/LOOP.out`` (``DIR/LOOP.RANK-PID.out`` per process) for
    ``--functions``.
    """
    name = f"{loop}.out" if args.processes == 1 else f"{loop}.%q{{LOCAL_RANK}}-%p.out"
    out_file = "/dev/null" if args.keep is None else str(Path(args.keep) / name)
    command = [
        "valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out_file}",
        sys.executable, __file__, "--run", loop, "--window", "--steps", str(args.long + 1),
        "--short", str(args.short), "--long", str(args.long),
        "--width", str(args.width), "--depth", str(args.depth), "--batch", str(args.batch),
        "--log-every", str(args.log_every), "--samples", str(args.samples),
        "--accumulation", str(args.accumulation),
    ]  # fmt: skip
    if args.processes > 1:
        command = ["torchrun", "--nproc_per_node", str(args.processes), "--no-python", *command]
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    found = [int(n) for n in _COLLECTED.findall(done.stderr + done.stdout)]
    if len(found) != args.processes:
        raise RuntimeError(
            f"{len(found)} callgrind totals for {args.processes} processes:\n{done.stderr[-2000:]}"
        )
    if args.processes > 1:
        print(
            f"{loop}: per process {', '.join(f'{n / (args.long - args.short) / 1e6:.3f} M' for n in found)}"
        )
    return max(found)


_FUNCTION_LINE = re.compile(r"^\s*([\d,]+) \([ \d.]+%\)\s+(.*?)(?: \[(.*)\])?$")


def function_counts(out_file: Path) -> dict[str, int]:
    """Exclusive instructions per function of one callgrind output file (``callgrind_annotate``)."""
    listing = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--inclusive=no", str(out_file)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    counts: dict[str, int] = {}
    for line in listing.split("file:function", 1)[-1].splitlines():
        match = _FUNCTION_LINE.match(line)
        if match is None:
            continue
        where = match.group(2)
        # the function's name alone: callgrind names an inlined template after whichever library
        # it met first, which differs between runs
        name = re.sub(r"'\d+$", "", where.split(":", 1)[-1])  # f'2: f called recursively
        counts[name] = counts.get(name, 0) + int(match.group(1).replace(",", ""))
    return counts


def compare_functions(folder: Path, steps: int, top: int) -> None:
    """Print the functions that differ most per step between the kept SafeTrainer and bare runs."""
    per_step = {}
    for loop in ("bare", "safeloop"):
        per_step[loop] = {name: n / steps for name, n in function_counts(folder / f"{loop}.out").items()}
    bare, safe = per_step["bare"], per_step["safeloop"]
    added = {name: safe.get(name, 0.0) - bare.get(name, 0.0) for name in bare | safe}
    print(f"per step: bare {sum(bare.values()) / 1e6:.3f} M, SafeTrainer {sum(safe.values()) / 1e6:.3f} M, "
          f"added {sum(added.values()) / 1e6:+.3f} M; the functions that differ most:")  # fmt: skip
    for name, value in sorted(added.items(), key=lambda item: -abs(item[1]))[:top]:
        print(f"{value / 1e3:+10.1f} k  {name[:150]}")


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
    parser.add_argument(
        "--accumulation",
        type=int,
        default=1,
        help="micro-batches per step; --short/--long count micro-batches",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_loop_arguments(parser, long=60)
    # safeloop: every default; noise-scale-off / split: gradient_noise_scale="off" / "split"
    loops = ["bare", "safeloop", "no-diagnostics", "noise-scale-off", "split"]
    parser.add_argument("--loops", nargs="+", default=["bare", "safeloop"], choices=loops)
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind output files in DIR")
    parser.add_argument(
        "--functions", metavar="DIR", help="compare per function the bare and safeloop runs kept in DIR"
    )
    parser.add_argument("--jobs", type=int, default=2, help="loops counted at the same time")
    parser.add_argument("--processes", type=int, default=1, help="DDP processes per loop (torchrun, gloo)")
    parser.add_argument("--top", type=int, default=40, help="with --functions: how many to print")
    parser.add_argument("--run", choices=loops, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--window", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is not None:  # the inner call, under valgrind
        torch.set_num_threads(1)
        if args.run == "bare":
            run_bare(args)
        else:
            noise_scale = {"noise-scale-off": "off", "split": "split"}.get(args.run, "auto")
            run_safeloop(args, diagnostics=args.run != "no-diagnostics", noise_scale=noise_scale)
        return
    if args.functions is not None:
        compare_functions(Path(args.functions), args.long - args.short, args.top)
        return
    steps = (args.long - args.short) / args.accumulation
    if args.keep is not None:  # callgrind cannot create the folder and fails at the first write
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    print(
        f"model: {args.depth}x{args.width} MLP, batch {args.batch}, accumulation {args.accumulation}, AdamW, "
        f"clip_grad_norm=1.0, log_every={args.log_every}; per step = instructions of micro-batches "
        f"{args.short}..{args.long - 1} / {steps:g}"
    )
    # one process per loop, side by side (instruction counts do not depend on the machine's load)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        counted = dict(zip(args.loops, pool.map(lambda loop: count(loop, args), args.loops), strict=True))
    per_step = {}
    for loop, total in counted.items():
        per_step[loop] = total / steps
        print(f"{loop:<14} {total:>16,} instructions -> {per_step[loop] / 1e6:9.3f} M per step")
    for other, what in (
        ("bare", "SafeTrainer / bare loop"),
        ("no-diagnostics", "diagnostics on / off"),
        ("noise-scale-off", "noise scale on / off"),
    ):
        if "safeloop" in per_step and other in per_step:
            ratio = per_step["safeloop"] / per_step[other]
            print(f"{what}, instructions per step: {ratio:.4f} ({(ratio - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
