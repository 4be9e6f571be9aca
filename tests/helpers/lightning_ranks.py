"""What the torchrun scripts of ``SafeLoopCallback``'s sharded tests share.

``tests/distributed/scripts/lightning_fsdp_ranks.py`` (FSDP2), ``lightning_fsdp1_ranks.py`` and
``lightning_deepspeed_ranks.py`` run several fits in the same two processes and print one
``RESULT`` JSON line per fit and rank. Import only where ``lightning`` is installed.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import torch

__all__ = ["INFO", "callback_record", "leave_group", "logged_grad_norms", "same", "write_result"]


class InfoLines(logging.Handler):
    """Keeps the messages safeloop logs at INFO and above (cleared by each fit)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def about(self, words: str) -> list[str]:
        """The kept lines that contain ``words``."""
        return [line for line in self.lines if words in line]


INFO = InfoLines()
logging.getLogger("safeloop").addHandler(INFO)
logging.getLogger("safeloop").setLevel(logging.INFO)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Two lists of tensors, bitwise equal one by one."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def logged_grad_norms(logged: list[tuple[int | None, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The per-layer gradient norms a ``RecordingLogger`` got, by step (a string) and parameter."""
    norms: dict[str, dict[str, float]] = {}
    for step, metrics in logged:
        for key, value in metrics.items():
            if key.startswith("safeloop/grad_norm/"):
                norms.setdefault(str(step), {})[key[len("safeloop/grad_norm/") :]] = value
    return norms


def callback_record(callback: Any) -> dict[str, Any]:
    """What a fit's ``SafeLoopCallback`` (or None: a reference fit) holds, as JSON values."""
    result = None if callback is None else callback.result
    events = [] if callback is None else callback.events
    return {
        "skipped": None if result is None else result.skipped_steps,
        "events": [[e.kind, e.step] for e in events],
        "reinit": [e.detail for e in events if e.kind == "reinit"],
        "rollbacks": [e.detail for e in events if e.kind == "rollback"],
        "findings": [] if callback is None else sorted([f.code, list(f.params)] for f in callback.findings),
        "losses": [] if result is None else [entry["loss"] for entry in result.history],
        "global_norms": [] if result is None else [entry["grad_norm"] for entry in result.history],
    }


def write_result(record: dict[str, Any]) -> None:
    """One ``RESULT`` line, in one write: the processes share torchrun's stdout (print writes twice)."""
    sys.stdout.write("RESULT " + json.dumps(record) + "\n")
    sys.stdout.flush()


def leave_group() -> None:
    """Every process leaves the process group together (gloo's threads can abort one at exit)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
