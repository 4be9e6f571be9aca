"""Test doubles: a callback that records hook calls and an Accelerate tracker that keeps logs."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from accelerate.tracking import GeneralTracker

from safeloop import Callback
from safeloop.distributed import settle_collectives


class HookRecorder(Callback):
    """Records (hook, global_step, extra) for every hook call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Any]] = []

    def on_fit_start(self, trainer):
        self.calls.append(("on_fit_start", trainer.global_step, None))

    def on_train_batch_start(self, trainer, batch, batch_idx):
        self.calls.append(("on_train_batch_start", trainer.global_step, batch_idx))

    def on_after_backward(self, trainer):
        self.calls.append(("on_after_backward", trainer.global_step, None))

    def on_before_optimizer_step(self, trainer, optimizer):
        grads = [p.grad for p in trainer.model.parameters()]
        self.calls.append(
            ("on_before_optimizer_step", trainer.global_step, all(g is not None for g in grads))
        )

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.calls.append(("on_train_batch_end", trainer.global_step, batch_idx))

    def on_validation_end(self, trainer, eval_loss):
        self.calls.append(("on_validation_end", trainer.global_step, eval_loss))

    def on_fit_end(self, trainer, result):
        self.calls.append(("on_fit_end", trainer.global_step, result.global_step))

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


class JsonLinesTracker(GeneralTracker):
    """An Accelerate tracker that appends every `log` call to a JSON-lines file (main process)."""

    name = "jsonlines"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.logged: list[tuple[int | None, dict[str, Any]]] = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.config = dict(values)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.logged.append((step, dict(values)))
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")


def end_run(accelerator: Any) -> None:
    """End a multi-process test script's run once its own collectives after ``fit`` settled.

    The scripts gather whole weights after ``fit``; a gloo worker freeing such a collective's
    tensors while the interpreter exits can abort the process, so they settle first, as ``fit``
    does for its own.
    """
    settle_collectives(accelerator)
    accelerator.end_training()


def print_result(record: dict) -> None:
    """One ``RESULT`` line: one write, as two processes share this stdout (print writes the newline apart)."""
    sys.stdout.write("RESULT " + json.dumps(record) + "\n")
    sys.stdout.flush()
