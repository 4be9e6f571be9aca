"""Time SafeTrainer against the bare Accelerate loop under DeepSpeed ZeRO, on 2 CPU processes.

The bare loop is the one Accelerate documents for DeepSpeed (``accelerator.backward(loss)``, which
runs the engine's backward and step; ``optimizer.step()`` and ``zero_grad()`` are no-ops there).
SafeTrainer calls the engine's backward and step apart, measures the gradient partitions (one
scalar all-reduce per step for the global norm), agrees the NaN/Inf flag (one more) and reads it
once on the host. Rounds alternate bare, SafeTrainer, SafeTrainer with ``diagnostics=False`` in
one process pair; time is each process's CPU time over the timed steps (as in ``overhead.py``),
the slower process's. Accelerate runs DeepSpeed only on GPU-like devices, so the distributed type
is forced as in ``tests/distributed/scripts/train_deepspeed_ranks.py``. CPU gloo figures say what
safeloop adds per step around the engine, not what a GPU run costs. Usage:

    torchrun --nproc_per_node 2 benchmarks/deepspeed_overhead.py --stage 2          # CPU time
    torchrun --nproc_per_node 2 benchmarks/deepspeed_overhead.py --stage 3 --wall   # wall time
    torchrun --nproc_per_node 2 benchmarks/deepspeed_overhead.py --ddp              # DDP reference
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType
from overhead import make_loader, make_model  # benchmarks/overhead.py, beside this script
from torch import nn

from safeloop import Callback, SafeTrainer

# CPU time by default (as overhead.py); --wall: wall time (gloo's waiting threads count as CPU time)
CLOCK = time.process_time


def deepspeed_accelerator(args: argparse.Namespace) -> Accelerator:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    if args.ddp:  # the reference: the same loops under DDP, same processes and clock
        return Accelerator(cpu=True)
    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    plugin = DeepSpeedPlugin(hf_ds_config=config)
    accelerator = Accelerator(cpu=True, deepspeed_plugin=plugin)
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    plugin.set_mixed_precision("no")
    plugin._set_selected(True)
    accelerator.state.deepspeed_plugins = plugin
    accelerator.state._mixed_precision = "no"
    return accelerator


def bare(args: argparse.Namespace) -> float:
    accelerator = deepspeed_accelerator(args)
    model = make_model(args.width, args.depth, args.classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, make_loader(args.width, args.classes, args.samples, args.batch)
    )
    loss_fn = nn.CrossEntropyLoss()
    start, step = 0.0, 0
    while step < args.warmup + args.steps:
        for x, y in loader:
            if step == args.warmup:
                torch.distributed.barrier()
                start = CLOCK()
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == args.warmup + args.steps:
                break
    return CLOCK() - start


class Clock(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start = warmup, 0.0

    def on_train_batch_start(self, trainer, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            torch.distributed.barrier()
            self.start = CLOCK()


def safe(args: argparse.Namespace, diagnostics: bool) -> float:
    accelerator = deepspeed_accelerator(args)
    model = make_model(args.width, args.depth, args.classes)
    clock = Clock(args.warmup)
    trainer = SafeTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        make_loader(args.width, args.classes, args.samples, args.batch),
        loss_fn=nn.CrossEntropyLoss(),
        accelerator=accelerator,
        max_steps=args.warmup + args.steps,
        log_every=args.log_every,
        diagnostics=diagnostics,
        rollback=False,
        progress_bar=False,
        callbacks=[clock],
    )
    trainer.fit()
    return CLOCK() - clock.start


def slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--wall", action="store_true", help="time wall clock instead of CPU time")
    parser.add_argument("--ddp", action="store_true", help="the same comparison under DDP, for reference")
    args = parser.parse_args()
    if args.wall:
        global CLOCK
        CLOCK = time.perf_counter
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"bare": [], "safeloop": [], "safeloop, diagnostics off": []}
    for _ in range(args.rounds):
        times["bare"].append(slowest(bare(args)))
        times["safeloop"].append(slowest(safe(args, diagnostics=True)))
        times["safeloop, diagnostics off"].append(slowest(safe(args, diagnostics=False)))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    clock = "wall time" if args.wall else "CPU time"
    kind = "DDP" if args.ddp else f"ZeRO-{args.stage}"
    print(f"{kind}, 2 CPU processes, {args.steps} timed steps, {args.rounds} rounds, {clock}")
    for name, values in times.items():
        print(
            f"  {name:28s} best {1e3 * min(values) / args.steps:7.2f} ms/step  median "
            f"{1e3 * statistics.median(values) / args.steps:7.2f} ms/step"
        )
    for name in ("safeloop", "safeloop, diagnostics off"):
        per_round = [s / b for s, b in zip(times[name], times["bare"], strict=True)]
        print(
            f"  {name} / bare: best/best {min(times[name]) / min(times['bare']):.3f}, "
            f"median per round {statistics.median(per_round):.3f}"
        )


if __name__ == "__main__":
    main()
