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
    python benchmarks/instructions.py --processes 2 --jobs 1  # DDP on 2 CPU processes, per rank
    python benchmarks/instructions.py --processes 2 --loops noise-scale-off no-agree  # DDP's parts
    python benchmarks/instructions.py --keep /tmp/cg && python benchmarks/instructions.py --functions /tmp/cg
    python benchmarks/instructions.py --simulate           # + simulated cache misses, branches

With ``--processes 2`` each loop takes about 20 minutes here (two callgrinds, one per rank; the
count is per rank, and ``--functions`` compares rank by rank). ``no-agree`` drops the NaN/Inf
guard's all-reduce (a measurement only). Callgrind counts user-space instructions of valgrind's
CPU, which has no AVX-512: torch and MKL run their AVX2 kernels under it, AVX-512 ones natively,
and the kernel's work (system calls, waking threads) is not counted; ``process_time.py`` times
the training thread natively.

``--inner LOOP`` is the inner call that runs under valgrind (not ``--run``: torchrun, which
parses the arguments after the script too, would take it for an abbreviation of its ``--run-path``).
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


def count(loop: str, args: argparse.Namespace) -> list[int]:
    """Instructions of the counted steps of ``loop``, one count per process, by callgrind.

    With ``--processes N`` (N > 1) the loop runs under ``torchrun --standalone`` (a free port) on
    N CPU processes (DDP, gloo), each under its own callgrind; the counts are in rank order. With
    ``--keep DIR`` the callgrind output is kept as ``DIR/LOOP.out`` (``DIR/LOOP.RANK.out`` per
    process) for ``--functions``.
    """
    name = f"{loop}.out" if args.processes == 1 else f"{loop}.%q{{LOCAL_RANK}}.out"
    out_file = "/dev/null" if args.keep is None else str(Path(args.keep) / name)
    command = [
        "valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out_file}",
        *(["--cache-sim=yes", "--branch-sim=yes"] if args.simulate else []),
        sys.executable, __file__, "--inner", loop, "--window", "--steps", str(args.long + 1),
        "--short", str(args.short), "--long", str(args.long),
        "--width", str(args.width), "--depth", str(args.depth), "--batch", str(args.batch),
        "--log-every", str(args.log_every), "--samples", str(args.samples),
        "--accumulation", str(args.accumulation),
    ]  # fmt: skip
    if args.processes > 1:
        command = [
            "torchrun",
            "--standalone",
            "--nproc_per_node",
            str(args.processes),
            "--no-python",
            *command,
        ]
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    output = done.stderr + done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"{loop}: exit status {done.returncode}:\n{output[-4000:]}")
    # valgrind's lines start with ==PID==; each process prints its rank and PID (``--run``)
    found = _collected_by_rank(output) if args.processes > 1 else [int(n) for n in _COLLECTED.findall(output)]
    if len(found) != args.processes:
        raise RuntimeError(f"{len(found)} callgrind totals for {args.processes} processes:\n{output[-4000:]}")
    if args.simulate:
        print_simulated(loop, output, (args.long - args.short) / args.accumulation)
    return found


_EVENTS = re.compile(r"^==(\d+)== Events    : (.*)$", re.MULTILINE)
_ALL_COLLECTED = re.compile(r"^==(\d+)== Collected : (.*)$", re.MULTILINE)


def print_simulated(loop: str, output: str, steps: float) -> None:
    """``--simulate``: callgrind's simulated cache misses and mispredicted branches, per step.

    The estimate is ``callgrind_annotate``'s: Ir + 10 x (L1 misses + mispredicted branches) +
    100 x last-level misses. A model of one core with the host's cache sizes, not the time.
    """
    names = dict(_EVENTS.findall(output))
    for pid, values in _ALL_COLLECTED.findall(output):
        events = dict(zip(names[pid].split(), (int(v) for v in values.split()), strict=True))
        l1 = events["I1mr"] + events["D1mr"] + events["D1mw"]
        last = events["ILmr"] + events["DLmr"] + events["DLmw"]
        branches = events["Bcm"] + events["Bim"]
        estimate = events["Ir"] + 10 * (l1 + branches) + 100 * last
        print(
            f"{loop} (pid {pid}) per step: Ir {events['Ir'] / steps / 1e6:.3f} M, L1 misses "
            f"{l1 / steps / 1e3:.1f} k (I1 {events['I1mr'] / steps / 1e3:.1f} k), last-level misses "
            f"{last / steps / 1e3:.1f} k, mispredicted branches {branches / steps / 1e3:.1f} k, "
            f"cycle estimate {estimate / steps / 1e6:.3f} M",
            flush=True,
        )


_RANK_LINE = re.compile(r"^safeloop-rank (\d+) pid (\d+)$", re.MULTILINE)
_PID_COLLECTED = re.compile(r"^==(\d+)== Collected : (\d+)", re.MULTILINE)


def _collected_by_rank(output: str) -> list[int]:
    """The callgrind totals of a ``torchrun`` run in rank order (each process prints its rank)."""
    rank_of = {int(pid): int(rank) for rank, pid in _RANK_LINE.findall(output)}
    by_rank = {rank_of[int(pid)]: int(n) for pid, n in _PID_COLLECTED.findall(output) if int(pid) in rank_of}
    return [by_rank[rank] for rank in sorted(by_rank)]


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


def compare_functions(folder: Path, steps: float, top: int) -> None:
    """Print the functions that differ most per step between the kept SafeTrainer and bare runs.

    With files kept by ``--processes N`` (``LOOP.RANK.out``), one comparison per rank.
    """
    ranks = sorted(int(f.name.split(".")[1]) for f in folder.glob("bare.*.out"))
    for rank in ranks or [None]:
        suffix = ".out" if rank is None else f".{rank}.out"
        per_step = {}
        for loop in ("bare", "safeloop"):
            counts = function_counts(folder / f"{loop}{suffix}")
            per_step[loop] = {name: n / steps for name, n in counts.items()}
        bare, safe = per_step["bare"], per_step["safeloop"]
        added = {name: safe.get(name, 0.0) - bare.get(name, 0.0) for name in bare | safe}
        where = "" if rank is None else f"rank {rank}, "
        print(
            f"{where}per step: bare {sum(bare.values()) / 1e6:.3f} M, "
            f"SafeTrainer {sum(safe.values()) / 1e6:.3f} M, "
            f"added {sum(added.values()) / 1e6:+.3f} M; the functions that differ most:"
        )
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
    # safeloop: every default; noise-scale-off / split: gradient_noise_scale="off" / "split";
    # no-agree: the NaN/Inf guard's flag not all-reduced (a measurement only: under several
    # processes the ranks could then disagree on a skip)
    loops = ["bare", "safeloop", "no-diagnostics", "noise-scale-off", "split", "no-agree"]
    parser.add_argument("--loops", nargs="+", default=["bare", "safeloop"], choices=loops)
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind output files in DIR")
    parser.add_argument(
        "--functions", metavar="DIR", help="compare per function the bare and safeloop runs kept in DIR"
    )
    parser.add_argument("--jobs", type=int, default=2, help="loops counted at the same time")
    parser.add_argument("--processes", type=int, default=1, help="DDP processes per loop (torchrun, gloo)")
    parser.add_argument("--top", type=int, default=40, help="with --functions: how many to print")
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="also simulate the caches and branch predictor (--cache-sim, --branch-sim; slower)",
    )
    parser.add_argument("--inner", choices=loops, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--window", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner is not None:  # the inner call, under valgrind
        torch.set_num_threads(1)
        if "LOCAL_RANK" in os.environ:  # under torchrun: which valgrind output is which rank's
            print(f"safeloop-rank {os.environ['LOCAL_RANK']} pid {os.getpid()}", file=sys.stderr, flush=True)
        if args.inner == "bare":
            run_bare(args)
        else:
            noise_scale = {"noise-scale-off": "off", "split": "split"}.get(args.inner, "auto")
            if args.inner == "no-agree":
                import safeloop.optimizer_step

                safeloop.optimizer_step.agree_all_finite = lambda accelerator, flag: flag
            run_safeloop(args, diagnostics=args.inner != "no-diagnostics", noise_scale=noise_scale)
        return
    if args.functions is not None:
        compare_functions(Path(args.functions), (args.long - args.short) / args.accumulation, args.top)
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
    per_step = {}  # per process, in rank order
    for loop, totals in counted.items():
        per_step[loop] = [total / steps for total in totals]
        for rank, total in enumerate(totals):
            where = "" if args.processes == 1 else f" rank {rank}"
            print(f"{loop + where:<21} {total:>16,} instructions -> {total / steps / 1e6:9.3f} M per step")
    for other, what in (
        ("bare", "SafeTrainer / bare loop"),
        ("no-diagnostics", "diagnostics on / off"),
        ("noise-scale-off", "noise scale on / off"),
    ):
        if "safeloop" in per_step and other in per_step:
            for rank, (safe, base) in enumerate(zip(per_step["safeloop"], per_step[other], strict=True)):
                where = "" if args.processes == 1 else f", rank {rank}"
                ratio = safe / base
                print(f"{what}, instructions per step{where}: {ratio:.4f} ({(ratio - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
