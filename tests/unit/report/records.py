"""Small run records written line by line with the writer's own format functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safeloop.report.format import RECORD_FILE, dump_line, log_line

LAYERS = ["0.weight", "0.bias", "2.weight", "2.bias"]
WEIGHTS = ["0.weight", "2.weight"]


def entry(step: int, loss: float, lr: float = 0.1, rollbacks: int = 0) -> dict[str, Any]:
    return {
        "step": step, "epoch": 0, "loss": loss, "lr": lr, "grad_norm": 1.0 + step / 100,
        "steps_per_sec": 10.0, "skipped_steps": 0, "overflow_skips": 0, "rollbacks": rollbacks,
    }  # fmt: skip


def log(step: int, loss: float, lr: float = 0.1, rollbacks: int = 0) -> str:
    grads = [0.5 + i + step / 1000 for i in range(len(LAYERS))]
    ratios = [1e-3 * (i + 1) for i in range(len(WEIGHTS))]
    return log_line(entry(step, loss, lr, rollbacks), grad_norms=grads, update_ratios=ratios)


def fit(step: int = 0, resumed_from: str | None = None) -> str:
    settings = {"log_every": 5, "clip_grad_norm": 1.0}
    return dump_line("fit", {"step": step, "resumed_from": resumed_from, "time": "", "settings": settings})


def layers() -> str:
    return dump_line("layers", {"grad_norms": LAYERS, "update_ratios": WEIGHTS})


def event(kind: str, step: int, **detail: Any) -> str:
    return dump_line("event", {"kind": kind, "step": step, "detail": detail})


def eventful_run() -> list[str]:
    """40 steps logged every 5: a re-initialisation at 0, a skip at 7, a spike read at 25 rolled
    back to 15 (lr halved), a preemption at 40; one eval, two findings, the end line."""
    lines = [fit(), layers(), event("reinit", 0, param="0.weight", method="xavier")]
    lines += [log(5, 2.0), event("skip", 7, cause="loss"), log(10, 1.5), log(15, 1.2), log(20, 5.0)]
    lines += [log(25, 1e6)]
    lines += [event("rollback", 15, reason="loss-spike", detected_at=25, rollback=1, path="x")]
    lines += [event("lr_scale", 15, factor=0.5, lr_before=[0.1], lr_after=[0.05], total_scale=0.5)]
    lines += [log(s, 1.0 - s / 100, lr=0.05, rollbacks=1) for s in (20, 25, 30, 35, 40)]
    lines += [dump_line("eval", {"step": 32, "loss": 0.9}), event("preempt", 40, signal="SIGTERM", path=None)]
    warning = {"code": "loss-spike", "severity": "warning", "message": "a spike", "params": [], "step": 21,
               "suggestion": "lower the lr", "count": 1}  # fmt: skip
    info = {"code": "resume-fresh-start", "severity": "info", "message": "note", "params": [], "step": None,
            "suggestion": "", "count": 1}  # fmt: skip
    error = {"code": "nonfinite-loss", "severity": "error", "message": "NaN loss", "params": ["x"], "step": 7,
             "suggestion": "check the data", "count": 2}  # fmt: skip
    lines += [dump_line("finding", info), dump_line("finding", warning), dump_line("finding", error)]
    lines.append(
        dump_line("end", {"step": 40, "status": "preempted", "baseline_loss": 2.5, "eval_loss": 0.9})
    )
    return lines


def write(folder: Path, lines: list[str], *, tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RECORD_FILE
    path.write_text("".join(lines) + tail)
    return path
