"""CPU time of the training thread, SafeTrainer against the bare Accelerate loop, paired rounds.

On one process (``python benchmarks/process_time.py``) or several under torchrun (DDP, gloo):

    python benchmarks/process_time.py --rounds 21
    torchrun --standalone --nproc_per_node 2 benchmarks/process_time.py --rounds 21
    torchrun --standalone --nproc_per_node 2 benchmarks/process_time.py --loops bare safeloop guard-off

The model, data and settings are ``instructions.py``'s (the 3x512 MLP, batch 64 per process,
AdamW, ``clip_grad_norm=1.0`` in both loops, ``log_every=10``, every SafeTrainer default). Each
run trains ``--warmup + --steps`` steps; the clocks are read after the batch of step ``--warmup``
is fetched (after a barrier under several processes) and after the batch of step ``--warmup +
--steps`` is fetched, so the set-up, the first step's checks and the end of ``fit`` (its summary,
the barrier and sleep of ``settle_collectives``) are outside. Three clocks per process:

- the training thread's CPU time (``time.thread_time``: user + system time of the thread that
  runs forward, backward and the step; gloo's worker threads are not in it);
- the process's CPU time (``time.process_time``: every thread, gloo's included);
- wall time (``time.perf_counter``).

And the training thread's kernel side per step (``getrusage(RUSAGE_THREAD)``): its system
time, minor page faults, voluntary and involuntary context switches: the work that callgrind,
which counts user-space instructions only, does not see.

A round runs each loop once, the order turning each round; the ratio of a round is the loop's
time over the bare loop's of that round, per process; the printed figure is the median over
rounds of the paired ratios, per process (and the slower process's). ``guard-off`` is
``nan_guard="off"`` (no finite flag, no all-reduce, no host read); ``no-agree`` keeps the guard
but skips its all-reduce (``agree_all_finite`` replaced by the identity: a measurement only,
not a valid setting under several processes); ``noise-scale-off`` is
``gradient_noise_scale="off"`` (under DDP: no communication hook).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import make_loader, make_model, reset

LOOPS = ("bare", "safeloop", "guard-off", "no-agree", "noise-scale-off", "no-diagnostics")
CLOCKS = (("thread", time.thread_time), ("process", time.process_time), ("wall", time.perf_counter))
# the training thread's kernel side (getrusage), per step: system time (ms), minor page faults,
# voluntary and involuntary context switches
KERNEL = ("sys ms", "page faults", "voluntary switches", "involuntary switches")


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def read_clocks() -> list[float]:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    kernel = [1e3 * usage.ru_stime, usage.ru_minflt, usage.ru_nvcsw, usage.ru_nivcsw]
    return [clock() for _, clock in CLOCKS] + [float(n) for n in kernel]


class Window:
    """Reads the clocks at the fetch of step ``first`` and of step ``last``."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.start: list[float] = []
        self.spent: list[float] = []

    def at(self, step: int) -> None:
        if step == self.first:
            if distributed():
                torch.distributed.barrier()
            self.start = read_clocks()
        elif step == self.last:
            self.spent = [end - start for end, start in zip(read_clocks(), self.start, strict=True)]


def run_bare(args: argparse.Namespace, window: Window) -> None:
    model = make_model(args.width, args.depth, args.classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, make_loader(args.width, args.classes, args.samples, args.batch)
    )
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    while not window.spent:
        for inputs, targets in loader:
            window.at(step)
            if window.spent:
                break
            loss = loss_fn(model(inputs), targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1


def run_safeloop(args: argparse.Namespace, window: Window, loop: str) -> None:
    import safeloop.optimizer_step
    from safeloop import Callback, SafeTrainer

    class Clock(Callback):
        def on_train_batch_start(self, trainer, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            window.at(trainer.global_step)

    agree = safeloop.optimizer_step.agree_all_finite
    if loop == "no-agree":
        safeloop.optimizer_step.agree_all_finite = lambda accelerator, flag: flag  # type: ignore[assignment]
    try:
        model = make_model(args.width, args.depth, args.classes)
        SafeTrainer(
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-3),
            make_loader(args.width, args.classes, args.samples, args.batch),
            loss_fn=nn.CrossEntropyLoss(),
            max_steps=window.last + 1,
            clip_grad_norm=1.0,
            log_every=args.log_every,
            progress_bar=False,
            summary=False,
            nan_guard="off" if loop == "guard-off" else "skip",
            gradient_noise_scale="off" if loop == "noise-scale-off" else "auto",
            diagnostics=loop != "no-diagnostics",
            callbacks=[Clock()],
        ).fit()
    finally:
        safeloop.optimizer_step.agree_all_finite = agree


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--loops", nargs="+", default=["bare", "safeloop"], choices=LOOPS)
    args = parser.parse_args()
    if "bare" not in args.loops:
        parser.error("--loops needs bare (the ratios are against it)")
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]  # the machine's load: other work changes CPU time too
    if "LOCAL_RANK" in os.environ:
        Accelerator(cpu=True)  # starts the process group (gloo) for the barriers and the gather
        reset()
    # times[loop][round] = [thread, process, wall, then KERNEL's four] of this process
    times: dict[str, list[list[float]]] = {loop: [] for loop in args.loops}
    for round_ in range(args.rounds + 1):  # round 0: warm-up, not counted
        turn = round_ % len(args.loops)
        for loop in args.loops[turn:] + args.loops[:turn]:
            window = Window(args.warmup, args.warmup + args.steps)
            if loop == "bare":
                run_bare(args, window)
            else:
                run_safeloop(args, window, loop)
            reset()
            if round_ > 0:
                times[loop].append(window.spent)
    processes = torch.distributed.get_world_size() if distributed() else 1
    mine = torch.tensor([times[loop] for loop in args.loops], dtype=torch.float64)
    everyone = [torch.empty_like(mine) for _ in range(processes)]
    if distributed():
        torch.distributed.all_gather(everyone, mine)
    else:
        everyone = [mine]
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(
        f"{processes} process(es), {args.depth}x{args.width} MLP, batch {args.batch} per process, AdamW, "
        f"clip_grad_norm=1.0, log_every={args.log_every}; {args.steps} timed steps after {args.warmup}, "
        f"{args.rounds} rounds (+1 warm-up); load before: {load_before:.2f}"
    )
    for rank, table in enumerate(everyone):
        for index, loop in enumerate(args.loops):
            cells = []
            for c, (clock, _) in enumerate(CLOCKS):
                values = [1e3 * row[c] / args.steps for row in table[index].tolist()]
                cells.append(f"{clock} med {statistics.median(values):6.2f} min {min(values):6.2f}")
            print(f"rank {rank} {loop:<16} ms/step: " + ", ".join(cells))
            kernel = []
            for k, what in enumerate(KERNEL, start=len(CLOCKS)):
                values = [row[k] / args.steps for row in table[index].tolist()]
                kernel.append(f"{what} {statistics.median(values):.2f}")
            print(f"rank {rank} {loop:<16} training thread per step (median): " + ", ".join(kernel))
    bare = args.loops.index("bare")
    for index, loop in enumerate(args.loops):
        if loop == "bare":
            continue
        for c, (clock, _) in enumerate(CLOCKS):
            per_rank = []
            for table in everyone:
                ratios = (table[index, :, c] / table[bare, :, c]).tolist()
                per_rank.append(statistics.median(ratios))
            # the slower process's time per round, then the median of the paired ratios
            slow = torch.stack(everyone).amax(dim=0)
            slowest = statistics.median((slow[index, :, c] / slow[bare, :, c]).tolist())
            quartiles = statistics.quantiles(
                (everyone[0][index, :, c] / everyone[0][bare, :, c]).tolist(), n=4
            )
            print(
                f"{loop} / bare, {clock:<7} median of paired ratios per rank: "
                + ", ".join(f"{r:.4f}" for r in per_rank)
                + f"; slower process: {slowest:.4f}; rank 0 quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}"
            )
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
