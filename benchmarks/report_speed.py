"""Time ``safeloop report`` on a synthetic record of a long run (100k steps by default).

The record is written with the writer's own line functions (``safeloop.report.format``), as a
run of ``--steps`` optimizer steps logged every ``--log-every`` steps with ``--layers`` measured
parameters would leave it: a cosine learning rate, a loss that falls with noise, a gradient norm
with rare spikes, per-layer norms and update ratios (one layer dying halfway), a skipped step
every few thousand, two rollbacks with their abandoned branches, an evaluation every 5k steps,
three findings. Then, ``--rounds`` times each (best and median printed):

- the command as a user runs it, ``python -m safeloop.cli report DIR`` in a new process
  (Python start, ``import safeloop``, which imports torch and accelerate, reading, drawing);
- ``import safeloop`` alone in a new process, the part of the above that is not the report's;
- the report's own work in this process (``write_report``: read, assemble, draw, encode, write).

Wall and CPU time are printed (for a new process, its own CPU time, user + system); on a
machine shared with other jobs the CPU time is the steadier figure. Usage:

    python benchmarks/report_speed.py                    # 100k steps, log_every 10 (10k lines)
    python benchmarks/report_speed.py --log-every 1      # 100k lines: every step logged
    python benchmarks/report_speed.py --keep /tmp/run    # keep the record and the report there
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safeloop.report.format import RECORD_FILE, dump_line, log_line
from safeloop.report.render import write_report


def synthetic_record(folder: Path, steps: int, log_every: int, layers: int, seed: int = 0) -> int:
    """Write a long run's ``metrics.jsonl`` into ``folder``; return its number of lines."""
    rng = random.Random(seed)
    names = [f"blocks.{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}.weight" for i in range(layers)]
    settings = {"log_every": log_every, "clip_grad_norm": 1.0, "max_steps": steps, "checkpoint_every": 1000}
    lines = [dump_line("fit", {"step": 0, "resumed_from": None, "time": "", "settings": settings})]
    lines.append(dump_line("layers", {"grad_norms": names, "update_ratios": names}))
    third = steps // 3 // log_every * log_every
    rollbacks = {  # detected at -> back to
        third: third - 2000 // log_every * log_every,
        2 * third: 2 * third - 1000 // log_every * log_every,
    }
    done: set[int] = set()
    step, scale = 0, 1.0
    while step < steps:
        step += log_every
        progress = step / steps
        lr = 3e-4 * scale * 0.5 * (1 + math.cos(math.pi * progress))
        loss = 2.5 * math.exp(-3 * progress) + 0.4 + 0.05 * rng.gauss(0, 1)
        norm = 0.8 + 0.2 * rng.random() + (30 * rng.random() if rng.random() < 0.002 else 0)
        grads = [norm * (0.3 + 0.05 * i) * (0.0 if i == 3 and progress > 0.5 else 1.0) for i in range(layers)]
        ratios = [lr * (3 + i) * (0.0 if i == 3 and progress > 0.5 else 1.0) for i in range(layers)]
        entry = {
            "step": step, "epoch": step // 5000, "loss": loss, "lr": lr, "grad_norm": norm,
            "steps_per_sec": 12.0, "skipped_steps": 0, "overflow_skips": 0, "rollbacks": len(done),
        }  # fmt: skip
        lines.append(log_line(entry, grad_norms=grads, update_ratios=ratios))
        if step % 3100 < log_every:
            lines.append(dump_line("event", {"kind": "skip", "step": step - 1, "detail": {"cause": "loss"}}))
        if step % 5000 < log_every:
            lines.append(dump_line("eval", {"step": step, "loss": loss + 0.1}))
        for found, back in rollbacks.items():
            if found not in done and step >= found:
                done.add(found)
                detail = {"reason": "loss-spike", "detected_at": step, "rollback": len(done), "path": ""}
                lines.append(dump_line("event", {"kind": "rollback", "step": back, "detail": detail}))
                scale *= 0.5
                lr_detail = {"factor": 0.5, "lr_before": [lr], "lr_after": [lr * 0.5], "total_scale": scale}
                lines.append(dump_line("event", {"kind": "lr_scale", "step": back, "detail": lr_detail}))
                step = back
    for code, severity in (("dead-units", "warning"), ("loss-spike", "warning"), ("lr-too-low", "info")):
        finding = {"code": code, "severity": severity, "message": f"synthetic {code}", "params": [names[3]],
                   "step": steps // 2, "suggestion": "a fix", "count": 1}  # fmt: skip
        lines.append(dump_line("finding", finding))
    lines.append(
        dump_line("end", {"step": steps, "status": "completed", "baseline_loss": 2.9, "eval_loss": 0.5})
    )
    (folder / RECORD_FILE).write_text("".join(lines))
    return len(lines)


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(function) -> tuple[float, float]:
    """Wall and CPU seconds of ``function()``: on a machine shared with other jobs the wall time
    also counts the time they take the cores, the CPU time does not."""
    start, cpu = time.perf_counter(), _cpu()
    function()
    return time.perf_counter() - start, _cpu() - cpu


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="write the record and report here")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="safeloop-report-"))
    folder.mkdir(parents=True, exist_ok=True)
    count = synthetic_record(folder, args.steps, args.log_every, args.layers)
    size = (folder / RECORD_FILE).stat().st_size
    shape = f"{args.steps} steps, log_every {args.log_every}, {args.layers} layers"
    print(f"record: {shape}: {count} lines, {size / 1e6:.1f} MB")
    command = [sys.executable, "-m", "safeloop.cli", "report", str(folder)]
    names = ("safeloop report (new process)", "import safeloop (new process)", "write_report (in process)")
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for _ in range(args.rounds):
        timings["safeloop report (new process)"].append(_timed(lambda: _run(command)))
        timings["import safeloop (new process)"].append(
            _timed(lambda: _run([sys.executable, "-c", "import safeloop"]))
        )
        timings["write_report (in process)"].append(_timed(lambda: write_report(folder)))
    for name, values in timings.items():
        wall, cpu = [v[0] for v in values], [v[1] for v in values]
        print(
            f"{name:32s} wall best {min(wall):6.2f} s, median {statistics.median(wall):6.2f} s;"
            f"   CPU best {min(cpu):6.2f} s, median {statistics.median(cpu):6.2f} s"
        )
    files = sorted(p.name for p in folder.glob("report*"))
    print(f"wrote {len(files)} files in {folder}: {', '.join(files)}")


if __name__ == "__main__":
    main()
