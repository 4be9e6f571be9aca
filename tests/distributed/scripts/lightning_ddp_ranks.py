"""Trains a small LightningModule under Lightning's DDP with SafeLoopCallback; run under torchrun.

Rank 1's loss goes NaN at batch 2 (optimizer step 3) only; the model has an auxiliary layer its
forward never calls. Prints one ``RESULT`` JSON line per rank: the skips, the findings, whether
step 3 left parameters and optimizer state as they were, and a digest of the final parameters.
With ``STRICT=1`` the strategy is plain ``"ddp"`` (no ``find_unused_parameters``), and the line
holds the ``ConfigError`` the first backward raises instead.
"""

import hashlib
import json
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

try:
    import lightning.pytorch as pl
except ImportError:
    print("SKIP lightning is not installed", flush=True)
    sys.exit(0)

from safeloop import ConfigError
from safeloop.lightning import SafeLoopCallback
from tests.helpers.lightning_models import Classifier, batches, optimizer_tensors

warnings.filterwarnings("ignore")


class RankOneNaN(Classifier):
    """Classifier with an unused layer; rank 1's loss is NaN at batch 2."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(16, 3)

    def loss(self, batch, batch_idx):
        loss = super().loss(batch, batch_idx)
        return loss * float("nan") if batch_idx == 2 and self.global_rank == 1 else loss


class StepThree(pl.Callback):
    """Whether optimizer step 3 changed the parameters or the optimizer state."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.unchanged: bool | None = None

    def _state(self, trainer, module):
        return [p.detach().clone() for p in module.parameters()] + optimizer_tensors(trainer.optimizers[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 == 3:
            self.before = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3 and self.unchanged is None:
            after = self._state(trainer, pl_module)
            self.unchanged = all(torch.equal(a, b) for a, b in zip(self.before, after, strict=True))


def main() -> None:
    torch.set_num_threads(1)
    strict = os.environ.get("STRICT") == "1"
    watch, callback = StepThree(), SafeLoopCallback(log_every=2, summary=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp" if strict else "ddp_find_unused_parameters_true",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[watch, callback],
    )
    module = RankOneNaN()
    record: dict = {"rank": int(os.environ["RANK"])}
    try:
        trainer.fit(module, batches())
    except ConfigError as error:
        record["error"] = str(error)
    sha = hashlib.sha256()
    for param in module.parameters():
        sha.update(param.detach().numpy().tobytes())
    result = callback.result
    record.update(
        world_size=trainer.world_size,
        digest=sha.hexdigest(),
        unchanged=watch.unchanged,
        skipped=None if result is None else result.skipped_steps,
        events=[[event.kind, event.step] for event in callback.events],
        findings=sorted([finding.code, list(finding.params)] for finding in callback.findings),
        losses=[] if result is None else [entry["loss"] for entry in result.history],
    )
    # one write per line (print writes the newline apart): the ranks share torchrun's stdout
    sys.stdout.write("RESULT " + json.dumps(record) + "\n")
    sys.stdout.flush()
    if torch.distributed.is_initialized():
        # after the error Lightning 2.4 leaves the group up, and gloo's threads can abort the
        # process at exit: every rank leaves it together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
