"""Trains a model with two all-zero Linear weights under FSDP2, FSDP1 or DDP, on CPU ranks.

Run by ``tests/distributed/test_fsdp.py`` under torchrun (2 processes, gloo), with the
accelerator of ``train_fsdp_ranks.py`` (``MODE=fsdp2``, ``fsdp1`` or ``ddp``; see there how FSDP is
forced on CPU). ``0.weight`` (5, 8) is zero and so is the weight after it, so its first gradient is
zero: it is stuck and re-initialised. ``2.weight`` (1, 5) is zero but receives gradient; under
FSDP2 its single row lives on rank 0 and rank 1's shard is empty, and ``0.weight``'s 5 rows split
3 and 2. Under FSDP1 (``use_orig_params=True``) all of them are flat slices of the root's one
FlatParameter (57 elements and FSDP1's alignment padding, 34 per rank): ``0.weight``'s 40 elements
split 34 and 6, and rank 0's slice of ``2.weight`` is empty. Each rank prints one ``RESULT``
JSON line: the events, the findings, the re-initialised ``0.weight`` gathered whole before the
first update, ``2.weight``'s zero verdict measured again then with the number of all-reduces
that took, and each parameter's local rows (FSDP1: elements). It exits with code 3 and a
``SKIP`` line when FSDP cannot be set up here.
"""

import contextlib
import os
import sys

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

from safeloop import Callback
from safeloop.guards.flat_slices import flat_slices
from safeloop.guards.reinit import find_zero_params
from tests.distributed.scripts.train_fsdp_ranks import build_accelerator, sharded_trainer
from tests.helpers.models import classification_data
from tests.helpers.recording import JsonLinesTracker, end_run, print_result


def zero_weights_model() -> nn.Module:
    """Sigmoid layers with ``0.weight`` and ``2.weight`` zero: the first is stuck, the second learns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5), nn.Sigmoid(), nn.Linear(5, 1), nn.Sigmoid(), nn.Linear(1, 3))
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[2].weight)
    return model


class FirstStep(Callback):
    """The parameters as the first update will see them: after the pre-flight re-initialisation."""

    def __init__(self) -> None:
        self.weight: list[list[float]] | None = None
        self.zero: list[list] | None = None
        self.collectives = 0
        self.local_rows: dict[str, int] = {}

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        if self.weight is not None:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        fsdp1 = isinstance(trainer.model, FSDP1)
        with FSDP1.summon_full_params(trainer.model) if fsdp1 else contextlib.nullcontext():
            weight = dict(model.named_parameters())["0.weight"].detach().clone()
        if hasattr(weight, "full_tensor"):  # an FSDP2 shard: gather it (every rank calls this)
            weight = weight.full_tensor()
        self.weight = weight.tolist()
        self.local_rows = {
            name: (p.to_local() if hasattr(p, "to_local") else p).shape[0]
            for name, p in model.named_parameters()
        }
        # every rank calls this too, counting its collectives: under FSDP2, one all-reduce
        all_reduce = torch.distributed.all_reduce

        def counted(*args, **kwargs):
            self.collectives += 1
            return all_reduce(*args, **kwargs)

        torch.distributed.all_reduce = counted
        try:
            if fsdp1:  # flat slices: read where FSDP1 keeps them
                slices = flat_slices(trainer.model, list(model.parameters()))
                found = slices.find_zero_params(list(model.named_parameters()))
            else:
                found = find_zero_params(model.named_parameters())
        finally:
            torch.distributed.all_reduce = all_reduce
        self.zero = [[z.name, z.stuck, z.grad_norm] for z in found]


def main() -> None:
    out_dir, mode = sys.argv[1], os.environ.get("MODE", "fsdp2")
    accelerator = build_accelerator(mode, JsonLinesTracker(os.path.join(out_dir, "metrics.jsonl")))
    model = zero_weights_model()
    x, y = classification_data(n=64).tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    first = FirstStep()
    trainer = sharded_trainer(mode, model, loader, accelerator, max_steps=4, log_every=2, callbacks=[first])
    result = trainer.fit()
    record = {
        "rank": accelerator.process_index,
        "distributed_type": str(accelerator.distributed_type),
        "param_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
        "losses": [h["loss"] for h in result.history],
        "events": [[e.kind, e.step, e.detail] for e in result.events if e.kind == "reinit"],
        "findings": [
            [f.code, f.severity, list(f.params)] for f in result.findings if f.code == "zero-params"
        ],
        "weight": first.weight,
        "zero_at_update": first.zero,
        "collectives": first.collectives,
        "local_rows": first.local_rows,
    }
    end_run(accelerator)
    print_result(record)


if __name__ == "__main__":
    main()
