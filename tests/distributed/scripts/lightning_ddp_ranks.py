"""Trains small LightningModules under Lightning's DDP with SafeLoopCallback; run under torchrun.

One launch, several fits in the same two processes (the process group is made once), each
printing one ``RESULT`` JSON line per rank with its name under ``"fit"``:

- ``automatic`` and ``manual``: rank 1's loss goes NaN at batch 2 (optimizer step 3) only; the
  model has an auxiliary layer its forward never calls. The line holds the skips, the findings,
  whether step 3 left parameters and optimizer state as they were, and a digest of the final
  parameters.
- ``rollback`` and ``rollback-manual``: rank 1's loss is multiplied by 1000 at step 25 only; the
  mean loss spikes on both, and both roll back to the checkpoint of step 20 (in
  ``OUT_DIR/<fit>/``). The line also holds whether the parameters right after the rollback are
  bitwise the checkpoint's ``model.safetensors``, the hook and step it was made at, and the
  learning rate after it.
- ``rollback-end``: the same at steps 31-33 of 33: the spike is confirmed by the last log step,
  in ``on_train_end``, and both roll back there to the checkpoint of step 30.
- ``rollback-two-steps``: manual optimization with two ``opt.step()`` per ``training_step``; the
  spike at step 31 is read at the log step of step 35, whose boundary runs inside step 36: both
  roll back at the end of that batch (step 36) to the checkpoint of step 30.
- ``noise-ddp``: ``noisy_regression`` at ``lr=0``, batches of 16 per process: the gradient noise
  scale from the communication hook on Lightning's DDP module (16 samples against 32); the line
  holds the estimate, the closed form, the finding codes and the logged values.

With ``STRICT=1`` one fit only, under plain ``"ddp"`` (no ``find_unused_parameters``); its line
holds the ``ConfigError`` the first backward raises instead.
"""

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

try:
    import lightning.pytorch as pl
except ImportError:
    print("SKIP lightning is not installed", flush=True)
    sys.exit(0)

from safeloop import ConfigError
from safeloop.checkpoint.state import read_state
from safeloop.lightning import SafeLoopCallback
from tests.helpers.lightning_models import Classifier, Regression, batches, noise_record, optimizer_tensors
from tests.helpers.models import noisy_regression

warnings.filterwarnings("ignore")
POISON_STEP = 25
# the steps of rank 1's x1000 loss where they are not POISON_STEP: the mean loss must spike on 3
# steps in a row by the last log step (33 of 33); with two steps a batch, one poisoned update does
POISON_AT = {"rollback-end": {31, 32, 33}, "rollback-two-steps": {31}}


class RankOne(Classifier):
    """Classifier with an unused layer; rank 1's loss is NaN at batch 2, or x1000 at the steps ``poison_at``.

    With ``two_steps``, two ``opt.step()`` per ``training_step`` (manual), one per half batch.
    """

    def __init__(
        self,
        *,
        manual: bool,
        spike: bool,
        poison_at: frozenset[int] = frozenset({POISON_STEP}),
        two_steps: bool = False,
    ) -> None:
        optimizer = (lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)) if spike else None
        super().__init__(optimizer, manual=manual or two_steps)
        self.aux = nn.Linear(16, 3)
        self.spike, self.poison_at, self.two_steps = spike, poison_at, two_steps

    def loss(self, batch, batch_idx):
        return self.faulty(super().loss(batch, batch_idx), batch_idx)

    def faulty(self, loss, batch_idx):
        if self.global_rank != 1:
            return loss
        if self.spike:
            return loss * 1000.0 if self.trainer.global_step + 1 in self.poison_at else loss
        return loss * float("nan") if batch_idx == 2 else loss

    def training_step(self, batch, batch_idx):
        if not self.two_steps:
            return super().training_step(batch, batch_idx)
        inputs, targets = batch
        optimizer = self.optimizers()
        for half in (slice(0, len(inputs) // 2), slice(len(inputs) // 2, None)):
            loss = nn.functional.cross_entropy(self(inputs[half]), targets[half])
            optimizer.zero_grad()
            self.manual_backward(self.faulty(loss, batch_idx))
            optimizer.step()
        return None


class Watch(pl.Callback):
    """Whether step 3 changed anything; the parameters right after a rollback against its checkpoint."""

    def __init__(self, guard: SafeLoopCallback) -> None:
        self.guard = guard
        self.before: list[torch.Tensor] = []
        self.unchanged: bool | None = None
        self.restored: list[bool] = []
        self.restored_at: list[list] = []  # [hook, Lightning's step] of each rollback
        self.lr_after: list[float] = []

    def _state(self, trainer, module):
        return [p.detach().clone() for p in module.parameters()] + optimizer_tensors(trainer.optimizers[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 == 3:
            self.before = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3 and self.unchanged is None:
            after = self._state(trainer, pl_module)
            self.unchanged = all(torch.equal(a, b) for a, b in zip(self.before, after, strict=True))
        self._note("on_train_batch_end", trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._note("on_train_end", trainer, pl_module)

    def _note(self, hook, trainer, pl_module):
        rollbacks = [e for e in self.guard.events if e.kind == "rollback"]
        if len(rollbacks) > len(self.restored):  # after SafeLoopCallback's hook: restored in place
            saved = read_state(Path(rollbacks[-1].detail["path"])).model
            state = pl_module.state_dict()
            self.restored.append(
                saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
            )
            self.restored_at.append([hook, trainer.global_step])
            self.lr_after.append(trainer.optimizers[0].param_groups[0]["lr"])


def fit(name: str, out_dir: Path, *, strict: bool = False) -> None:
    spike, manual = name.startswith("rollback"), name.endswith("manual")
    guards = {"log_every": 2, "summary": False}
    if spike:
        guards = {"log_every": 5, "spike_warmup": 10, "checkpoint_every": 10, "summary": False}
        guards["checkpoint_dir"] = str(out_dir / name)
    callback = SafeLoopCallback(**guards)
    watch = Watch(callback)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp" if strict else "ddp_find_unused_parameters_true",
        max_steps={"rollback-end": 33, "rollback-two-steps": 50}.get(name, 60) if spike else 6,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, watch],
    )
    module = RankOne(
        manual=manual,
        spike=spike,
        poison_at=frozenset(POISON_AT.get(name, {POISON_STEP})),
        two_steps=name == "rollback-two-steps",
    )
    record: dict = {"fit": name, "rank": int(os.environ["RANK"])}
    try:
        trainer.fit(module, batches(n=960 if spike else 96))
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
        restored=watch.restored,
        restored_at=watch.restored_at,
        lr_after=watch.lr_after,
        skipped=None if result is None else result.skipped_steps,
        events=[[event.kind, event.step] for event in callback.events],
        rollbacks=[e.detail for e in callback.events if e.kind == "rollback"],
        findings=sorted([finding.code, list(finding.params)] for finding in callback.findings),
        losses=[] if result is None else [entry["loss"] for entry in result.history],
    )
    # one write per line (print writes the newline apart): the ranks share torchrun's stdout
    sys.stdout.write("RESULT " + json.dumps(record) + "\n")
    sys.stdout.flush()


def noise_fit(steps: int = 600) -> None:
    dataset, model, true = noisy_regression(n=65536)
    callback = SafeLoopCallback(summary=False, rollback=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(Regression(model), torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True))
    record = noise_record("noise-ddp", int(os.environ["RANK"]), true, callback.result)
    sys.stdout.write("RESULT " + json.dumps(record) + "\n")
    sys.stdout.flush()


def main() -> None:
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    if os.environ.get("STRICT") == "1":
        fit("automatic", out_dir, strict=True)
    else:
        for name in (
            "automatic",
            "manual",
            "rollback",
            "rollback-manual",
            "rollback-end",
            "rollback-two-steps",
        ):
            fit(name, out_dir)
        noise_fit()
    if torch.distributed.is_initialized():
        # after an error Lightning 2.4 leaves the group up, and gloo's threads can abort the
        # process at exit: every rank leaves it together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
