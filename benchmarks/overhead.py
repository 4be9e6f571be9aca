"""Time SafeTrainer against the bare hand-written Accelerate loop on the same model and data.

Runs alternate (bare, safeloop, bare, safeloop, ...) in one process so that both see the same
machine state. Time is the process's CPU time (`time.process_time`) on one torch thread: on a
shared virtual machine wall time also counts the time the hypervisor gives to others, which
made best-run wall times vary by 30% here. Three ratios are printed: best/best, median/median,
and the median of the per-round ratios (each round runs both loops back to back, so it cancels
slow drift in machine speed; the most stable of the three on noisy machines). Each round also runs
SafeTrainer with ``diagnostics=False``, and the same three ratios compare ``diagnostics=True``
(the default, timed as "SafeTrainer") against it: the cost of the diagnostics alone. Usage:

    python benchmarks/overhead.py                 # 3x512 MLP, AdamW, 200 steps, 7 rounds
    python benchmarks/overhead.py --clip 1.0      # both loops clip the gradient norm
    python benchmarks/overhead.py --fused         # AdamW(fused=True) in both loops
    python benchmarks/overhead.py --nan-guard off # SafeTrainer without the NaN/Inf guard
    python benchmarks/overhead.py --only-diagnostics  # skip the bare loop: diagnostics on vs off
    python benchmarks/overhead.py --instructions  # instructions per step (valgrind), not time
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from safeloop import SafeTrainer


def make_model(width: int, depth: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def make_loader(width: int, classes: int, samples: int, batch: int) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, width, generator=gen)
    y = torch.randint(0, classes, (samples,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)


def reset() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def bare_loop(args: argparse.Namespace) -> float:
    model = make_model(args.width, args.depth, args.classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=args.fused or None)
    loader = make_loader(args.width, args.classes, args.samples, args.batch)
    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    loss_fn = nn.CrossEntropyLoss()
    steps = 0
    start = time.process_time()
    while steps < args.steps:
        for inputs, targets in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model(inputs), targets)
                accelerator.backward(loss)
                if args.clip is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.clip)
                optimizer.step()
                optimizer.zero_grad()
            steps += 1
            if steps >= args.steps:
                break
    elapsed = time.process_time() - start
    reset()
    return elapsed


def safeloop_run(args: argparse.Namespace, diagnostics: bool = True) -> float:
    model = make_model(args.width, args.depth, args.classes)
    trainer = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3, fused=args.fused or None),
        make_loader(args.width, args.classes, args.samples, args.batch),
        loss_fn=nn.CrossEntropyLoss(),
        max_steps=args.steps,
        clip_grad_norm=args.clip,
        log_every=args.log_every,
        nan_guard=args.nan_guard,
        diagnostics=diagnostics,
        progress_bar=False,
    )
    start = time.process_time()
    trainer.fit()
    elapsed = time.process_time() - start
    reset()
    return elapsed


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
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--fused", action="store_true", help="AdamW(fused=True) in both loops")
    parser.add_argument("--nan-guard", default="skip", choices=["skip", "raise", "off"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noisy)")
    parser.add_argument(
        "--only-diagnostics", action="store_true", help="time only SafeTrainer, diagnostics on and off"
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per step with valgrind's callgrind instead of timing "
        "(benchmarks/instructions.py: batch 64, clip 1.0 in both loops, steps 20-59 of one run per loop); "
        "benchmarks/step_profile.py attributes the difference to torch ops and safeloop's functions",
    )
    args = parser.parse_args()
    if args.instructions:
        import instructions

        loops = ["safeloop", "no-diagnostics"] if args.only_diagnostics else ["bare", "safeloop"]
        sys.argv = [
            "instructions.py", "--width", str(args.width), "--depth", str(args.depth),
            "--log-every", str(args.log_every), "--short", "20", "--long", "60", "--loops", *loops,
        ]  # fmt: skip
        instructions.main()
        return
    torch.set_num_threads(args.threads)

    runs: dict[str, Callable[[], float]] = {}
    if not args.only_diagnostics:
        runs["bare accelerate loop"] = lambda: bare_loop(args)
    runs["SafeTrainer"] = lambda: safeloop_run(args, diagnostics=True)
    runs["diagnostics=False"] = lambda: safeloop_run(args, diagnostics=False)
    for run in runs.values():  # warm-up: allocator, thread pools, first-call costs
        run()
    times: dict[str, list[float]] = {label: [] for label in runs}
    for round_ in range(args.rounds):
        # the order turns each round, so that no loop always runs first (or after the same one)
        labels = list(runs)
        labels = labels[round_ % len(labels) :] + labels[: round_ % len(labels)]
        for label in labels:
            times[label].append(runs[label]())
    per_step = 1000 / args.steps
    print(f"model: {args.depth}x{args.width} MLP, batch {args.batch}, {args.steps} steps, AdamW")
    print(f"clip_grad_norm: {args.clip}, log_every: {args.log_every}, fused: {args.fused}")
    print(f'SafeTrainer nan_guard: {args.nan_guard}; "SafeTrainer" has diagnostics=True (the default)')
    print(f"threads: {torch.get_num_threads()}, rounds: {args.rounds}")
    for label, values in times.items():
        best, median = min(values) * per_step, statistics.median(values) * per_step
        print(f"{label:<21} best {best:7.3f} ms/step  median {median:7.3f} ms/step")
    if not args.only_diagnostics:
        print_ratios("SafeTrainer / bare loop", times["SafeTrainer"], times["bare accelerate loop"])
    print_ratios("diagnostics on / off", times["SafeTrainer"], times["diagnostics=False"])


def print_ratios(title: str, slow: list[float], base: list[float]) -> None:
    best_ratio = min(slow) / min(base)
    median_ratio = statistics.median(slow) / statistics.median(base)
    # each round runs the loops back to back, so the ratio within a round cancels slow drift
    paired = statistics.median(s / b for s, b in zip(slow, base, strict=True))
    print(f"{title}: ratio (best/best): {best_ratio:.4f}   ratio (median/median): {median_ratio:.4f}")
    print(f"{title}: ratio (median of per-round ratios): {paired:.4f}")


if __name__ == "__main__":
    main()
