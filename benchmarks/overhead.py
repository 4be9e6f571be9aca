"""Time SafeTrainer against the bare hand-written Accelerate loop on the same model and data.

Runs alternate (bare, safeloop, bare, safeloop, ...) in one process so that both see the same
machine state. Time is the process's CPU time (`time.process_time`) on one torch thread: on a
shared virtual machine wall time also counts the time the hypervisor gives to others, which
made best-run wall times vary by 30% here. Three ratios are printed: best/best, median/median,
and the median of the per-round ratios (each round runs both loops back to back, so it cancels
slow drift in machine speed; the most stable of the three on noisy machines). Usage:

    python benchmarks/overhead.py                 # 3x512 MLP, AdamW, 200 steps, 7 rounds
    python benchmarks/overhead.py --clip 1.0      # both loops clip the gradient norm
    python benchmarks/overhead.py --fused         # AdamW(fused=True) in both loops
    python benchmarks/overhead.py --nan-guard off # SafeTrainer without the NaN/Inf guard
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def safeloop_run(args: argparse.Namespace) -> float:
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bare_loop(args), safeloop_run(args)  # warm-up: allocator, thread pools, first-call costs
    bare, safe = [], []
    for _ in range(args.rounds):
        bare.append(bare_loop(args))
        safe.append(safeloop_run(args))
    per_step = 1000 / args.steps
    print(f"model: {args.depth}x{args.width} MLP, batch {args.batch}, {args.steps} steps, AdamW")
    print(f"clip_grad_norm: {args.clip}, log_every: {args.log_every}, fused: {args.fused}")
    print(f"SafeTrainer nan_guard: {args.nan_guard}")
    print(f"threads: {torch.get_num_threads()}, rounds: {args.rounds}")
    for label, times in (("bare accelerate loop", bare), ("SafeTrainer", safe)):
        best, median = min(times) * per_step, statistics.median(times) * per_step
        print(f"{label:<21} best {best:7.3f} ms/step  median {median:7.3f} ms/step")
    best_ratio = min(safe) / min(bare)
    median_ratio = statistics.median(safe) / statistics.median(bare)
    # each round runs the two loops back to back, so the ratio within a round cancels slow drift
    paired = statistics.median(s / b for s, b in zip(safe, bare, strict=True))
    print(f"ratio (best/best): {best_ratio:.4f}   ratio (median/median): {median_ratio:.4f}")
    print(f"ratio (median of per-round ratios): {paired:.4f}")


if __name__ == "__main__":
    main()
