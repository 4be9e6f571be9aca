"""Where SafeTrainer's extra work per step goes: torch ops and Python calls, against the bare loop.

Instruction counts (``benchmarks/instructions.py``) say how much a step costs; this says what the
difference is made of, from the same loops (``instructions.py``'s ``run_bare`` and
``run_safeloop``), counted over a run of ``--long`` steps minus one of ``--short`` steps so that
set-up and the first step cancel:

- torch ops per step by name (``torch.profiler``, CPU): every op dispatched, the loop's own and
  those of safeloop's guards and diagnostics. A small op costs a few thousand instructions of
  dispatch whatever its size, so on a small model the count of ops is most of the overhead.
- Python calls per step of safeloop's own functions (``cProfile``), with their own time.

    python benchmarks/step_profile.py                    # the 3x512 MLP at batch 64, log_every=10
    python benchmarks/step_profile.py --short 20 --long 60 --top 30
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from instructions import add_loop_arguments, run_bare, run_safeloop


def _reset() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _ops(loop: str, steps: int, args: argparse.Namespace) -> collections.Counter[str]:
    _reset()
    args.steps = steps
    run = run_bare if loop == "bare" else run_safeloop
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        if loop == "no-diagnostics":
            run_safeloop(args, diagnostics=False)
        else:
            run(args)
    counts: collections.Counter[str] = collections.Counter()
    for event in prof.events():
        if event.name.startswith("aten::"):
            counts[event.name] += 1
    return counts


def _calls(steps: int, args: argparse.Namespace) -> dict[str, tuple[int, float]]:
    _reset()
    args.steps = steps
    profiler = cProfile.Profile()
    profiler.enable()
    run_safeloop(args)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    out = {}
    for (file, line, name), (_, calls, own, _cum, _) in stats.items():
        if "/safeloop/" in file:
            out[f"{Path(file).parent.name}/{Path(file).name}:{line} {name}"] = (calls, own)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_loop_arguments(parser, long=60)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    extra = args.long - args.short
    per_step = {}
    for loop in ("bare", "safeloop", "no-diagnostics"):
        long, short = _ops(loop, args.long, args), _ops(loop, args.short, args)
        per_step[loop] = {name: (long[name] - short[name]) / extra for name in long | short}
        print(f"{loop:<15} {sum(per_step[loop].values()):8.1f} aten ops per step")
    diff = {
        name: per_step["safeloop"].get(name, 0) - per_step["bare"].get(name, 0)
        for name in per_step["safeloop"]
    }
    print(f"\nSafeTrainer - bare loop: {sum(diff.values()):+.1f} ops per step; the largest:")
    for name, value in sorted(diff.items(), key=lambda item: -abs(item[1]))[: args.top]:
        print(f"  {value:+7.2f}  {name}")
    diag = {
        name: per_step["safeloop"].get(name, 0) - per_step["no-diagnostics"].get(name, 0)
        for name in per_step["safeloop"]
    }
    print(f"\ndiagnostics on - off: {sum(diag.values()):+.1f} ops per step")
    long, short = _calls(args.long, args), _calls(args.short, args)
    rows = []
    for key, (calls, own) in long.items():
        base_calls, base_own = short.get(key, (0, 0.0))
        rows.append(((calls - base_calls) / extra, (own - base_own) / extra, key))
    print(
        f"\nsafeloop's Python functions per step (calls, own time in microseconds), "
        f"the {args.top} most called:"
    )
    for calls, own, key in sorted(rows, key=lambda row: -row[0])[: args.top]:
        if calls > 0:
            print(f"  {calls:7.2f}  {own * 1e6:8.1f} us  {key}")
    print(f"\nthe {args.top} with the most own time per step (log-step work included, averaged):")
    for calls, own, key in sorted(rows, key=lambda row: -row[1])[: args.top]:
        print(f"  {calls:7.2f}  {own * 1e6:8.1f} us  {key}")
    print(f"  total own time of safeloop's functions per step: {sum(r[1] for r in rows) * 1e6:.1f} us")


if __name__ == "__main__":
    main()
