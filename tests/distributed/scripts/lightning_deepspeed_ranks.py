"""Trains LightningModules under DeepSpeed (``DeepSpeedStrategy``) with SafeLoopCallback, under torchrun.

One launch, several fits in the same two processes, each printing one ``RESULT`` JSON line per
rank with its name under ``"fit"``; the ZeRO stage is the name's last character. DeepSpeed
partitions each reduced gradient and each fp32 master weight over the two processes.

Lightning refuses ``DeepSpeedStrategy`` without a CUDA accelerator (in ``setup_environment``, and
``setup_distributed`` wants device indices), and DeepSpeed's ``initialize`` wants a device rank:
:class:`CPUDeepSpeedStrategy` skips the first two checks and gives each process ``cpu:<local
rank>``, with ``DS_ACCELERATOR=cpu``. Everything the callback reads (the engine's partitions, its
``step``, ``was_step_applied``) is what it reads on GPUs.

- ``nan-2``, ``nan-3``, ``nan-0`` (Adam): rank 1's loss goes NaN at batch 2 (optimizer step 3)
  only. The line holds the skips, the findings, whether step 3 left the whole fp32 weights and
  Adam moments (``safe_get_full_*``; ZeRO-0 partitions nothing) bitwise as they were, and a digest
  of the final whole fp32 weights. ``reference-2``, ``reference-3``: the same fit without the
  callback and without the batch of step 3 (DeepSpeed refuses a ``training_step`` that returns
  None): its digest must be the guarded fit's.
- ``nan-manual-2``: ``nan-2`` in manual optimization (``manual_backward``, ``opt.step()``): the
  same digest.
- ``nan-accumulate-2``: ``accumulate_grad_batches=2`` (DeepSpeed counts the window: Lightning calls
  the hooks and the engine's step at every micro-batch), the NaN in a window's first micro-batch;
  ``reference-accumulate-2`` never had that window.
- ``zero-2``, ``zero-3`` (``log_every=1``): ``mid.weight`` and ``mid.bias`` start all zeros (stuck).
  The line holds the re-initialisation events, whether ``mid.weight``'s whole fp32 master after
  the first step's check is the Xavier draw an unsharded run makes, and each layer's logged
  gradient norm against the norm of the whole reduced gradient (``safe_get_full_grad``).
- ``rollback-2`` (SGD with momentum): rank 1's loss is multiplied by 1000 at step 25 only; both
  roll back in place to the checkpoint of step 20 (in ``OUT_DIR/rollback-2/``). The line holds
  whether the whole fp32 weights and momentum right after the rollback are bitwise those of step 20.
- ``clip-2``: ``SafeLoopCallback(clip_grad_norm=1.0)``: the ``ConfigError`` of ``on_fit_start``.

It prints a ``SKIP`` line and exits when DeepSpeed or Lightning is not installed.
"""

import hashlib
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

try:
    import deepspeed  # noqa: F401 - the strategy imports it; its absence is a skip
    import lightning.pytorch as pl
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
except ImportError as missing:
    print(f"SKIP {missing}", flush=True)
    sys.exit(0)

from safeloop import ConfigError
from safeloop.guards.reinit import initial_values
from safeloop.lightning import SafeLoopCallback
from tests.helpers.lightning_models import RecordingLogger, batches
from tests.helpers.lightning_ranks import (
    INFO,
    callback_record,
    leave_group,
    logged_grad_norms,
    same,
    write_result,
)
from tests.helpers.models import classification_data

warnings.filterwarnings("ignore")
RANK = int(os.environ.get("RANK", "0"))


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on CPU processes (see the module's docstring)."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # without DeepSpeedStrategy's CUDA check

    def setup_distributed(self) -> None:
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class Mlp(pl.LightningModule):
    """An MLP ``first -> mid -> last`` (8 -> 16 -> 16 -> 3), Adam at 1e-2 (SGD with momentum to roll back)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.mid, self.last = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.kind = kind
        self.automatic_optimization = "manual" not in kind
        if kind.startswith("zero"):
            with torch.no_grad():
                self.mid.weight.zero_()
                self.mid.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.mid(torch.relu(self.first(x)))))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch, batch_idx)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        self.manual_backward(loss)  # the engine's backward
        optimizer.step()  # the engine's step, after on_before_optimizer_step
        optimizer.zero_grad()
        return loss.detach()

    def _loss(self, batch, batch_idx) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self(inputs), targets)
        nan_batch = 4 if self.kind.startswith("nan-accumulate") else 2
        if self.global_rank == 1 and self.kind.startswith("nan") and batch_idx == nan_batch:
            return loss * float("nan")
        if self.global_rank == 1 and self.kind.startswith("rollback") and self.trainer.global_step + 1 == 25:
            return loss * 1000.0
        return loss

    def configure_optimizers(self):
        if self.kind.startswith("rollback"):  # momentum carries the spike on: confirmed, not a blip
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def whole_state(module: pl.LightningModule) -> list[torch.Tensor]:
    """The whole fp32 weights, then the optimizer's (a collective: every process calls it).

    ZeRO-0 partitions nothing: DeepSpeed's getters give None, the module and optimizer hold them.
    """
    params = list(module.parameters())
    engine = module.trainer.model
    stage0 = engine.zero_optimization_stage() == 0
    state = [(p.detach() if stage0 else safe_get_full_fp32_param(p)).clone() for p in params]
    moments = ("momentum_buffer",) if module.kind.startswith("rollback") else ("exp_avg", "exp_avg_sq")
    for key in moments:
        for p in params:
            if stage0:
                value = engine.optimizer.state.get(p, {}).get(key)
            else:
                value = safe_get_full_optimizer_state(p, key)
            state.append(torch.zeros(0) if value is None else value.clone())
    return state


class Watch(pl.Callback):
    """Placed after SafeLoopCallback: sees each hook once the callback's work in it is done."""

    def __init__(self, guard: SafeLoopCallback | None) -> None:
        self.guard = guard
        self.before: list[torch.Tensor] = []
        self.unchanged: bool | None = None
        self.grad_norms: dict[int, dict[str, float]] = {}
        self.first_step: dict[str, bool] = {}
        self.held_at: dict[int, list[torch.Tensor]] = {}
        self.restored: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not trainer.model.is_gradient_accumulation_boundary():
            return  # a micro-batch inside DeepSpeed's window
        step = trainer.global_step + 1
        if step == 3 and pl_module.kind.startswith("nan"):
            self.before = whole_state(pl_module)
        if not pl_module.kind.startswith("zero"):
            return
        self.grad_norms[step] = {
            name: float(safe_get_full_grad(p).norm()) for name, p in pl_module.named_parameters()
        }
        if step == 1:  # after the first step's check, before the update
            expected = initial_values(
                (16, 16), "xavier", std=0.02, generator=torch.Generator().manual_seed(0)
            )
            self.first_step["mid_is_whole_draw"] = torch.equal(
                safe_get_full_fp32_param(pl_module.mid.weight), expected
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 3 and self.unchanged is None and self.before:
            self.unchanged = same(self.before, whole_state(pl_module))
        if pl_module.kind.startswith("rollback") and step in (10, 20) and step not in self.held_at:
            self.held_at[step] = whole_state(pl_module)
        if self.guard is None:
            return
        rollbacks = [e for e in self.guard.events if e.kind == "rollback"]
        if len(rollbacks) > len(self.restored):  # SafeLoopCallback's hook ran: restored in place
            self.restored.append(
                {
                    "held": same(self.held_at.get(rollbacks[-1].step, []), whole_state(pl_module)),
                    "at": trainer.global_step,
                    "lr": trainer.optimizers[0].param_groups[0]["lr"],
                }
            )


def loader(name: str) -> torch.utils.data.DataLoader:
    """This process's batches (every other row, in order); a reference's lack step 3's batches."""
    inputs, targets = classification_data(n=960 if name.startswith("rollback") else 96).tensors
    rows = torch.arange(RANK, len(inputs), 2)
    if name.startswith("reference-accumulate"):
        rows = torch.cat([rows[:32], rows[48:]])  # without the window of batches 4 and 5
    elif name.startswith("reference"):
        rows = torch.cat([rows[:16], rows[24:]])  # without batch 2
    return batches(data=TensorDataset(inputs[rows], targets[rows]))


MAX_STEPS = {"rollback": 30, "zero": 3, "reference": 5, "nan-accumulate": 4, "reference-accumulate": 3}


def fit(name: str, out_dir: Path) -> None:
    INFO.lines.clear()
    kind, stage = name.rsplit("-", 1)
    guards: dict = {"log_every": 1 if kind == "zero" else 2, "summary": False}
    if kind == "rollback":
        guards = {"log_every": 5, "spike_warmup": 10, "checkpoint_every": 10, "summary": False}
        guards["checkpoint_dir"] = str(out_dir / name)
    if kind == "clip":
        guards["clip_grad_norm"] = 1.0
    callback = None if kind.startswith("reference") else SafeLoopCallback(**guards)
    watch = Watch(callback)
    logger = RecordingLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=CPUDeepSpeedStrategy(stage=int(stage), process_group_backend="gloo"),
        max_steps=MAX_STEPS.get(kind, 6),
        accumulate_grad_batches=2 if "accumulate" in kind else 1,
        max_epochs=-1,
        logger=logger if kind == "zero" else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[c for c in (callback, watch) if c is not None],
    )
    module = Mlp(kind)
    record: dict = {"fit": name, "rank": RANK}
    try:
        trainer.fit(module, loader(name))
    except ConfigError as error:
        record["error"] = str(error)
    digest = None
    if "error" not in record:
        sha = hashlib.sha256()
        for tensor in whole_state(module)[: len(list(module.parameters()))]:
            sha.update(tensor.numpy().tobytes())
        digest = sha.hexdigest()
    record.update(
        digest=digest,
        steps=trainer.global_step,
        unchanged=watch.unchanged,
        first_step=watch.first_step,
        restored=watch.restored,
        grad_norms={str(k): v for k, v in watch.grad_norms.items()},
        logged_grad_norms=logged_grad_norms(logger.logged),
        info=list(INFO.lines),
        **callback_record(callback),
    )
    write_result(record)


def main() -> None:
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    fits = [
        *("nan-2", "reference-2", "nan-manual-2", "nan-3", "reference-3", "nan-0"),
        *("nan-accumulate-2", "reference-accumulate-2"),
        *("zero-2", "zero-3", "rollback-2", "clip-2"),
    ]
    for name in os.environ.get("FITS", ",".join(fits)).split(","):
        fit(name, out_dir)
    leave_group()


if __name__ == "__main__":
    main()
