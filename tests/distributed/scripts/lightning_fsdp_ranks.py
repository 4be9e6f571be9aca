"""Trains LightningModules under FSDP2 (``ModelParallelStrategy``) with SafeLoopCallback, under torchrun.

One launch, several fits in the same two processes, each printing one ``RESULT`` JSON line per
rank with its name under ``"fit"``. Every module applies ``fully_shard`` to its layers and to
itself in ``configure_model``, so each process holds half the rows of every parameter (``Shard(0)``):

- ``nan`` (Adam): rank 1's loss goes NaN at batch 2 (optimizer step 3) only. The line holds the
  skips, the findings, whether step 3 left this process's local shards and Adam state bitwise as
  they were, and a digest of the final local shards. ``reference``: the same fit without the
  callback and without the batch of step 3 (5 steps; Lightning refuses a ``training_step`` that
  returns None in distributed training): its digest must be the guarded fit's.
- ``zero``: ``mid.weight`` and ``mid.bias`` start all zeros (stuck: ReLU's gradient at 0 is 0),
  and ``first.weight`` is zero in rank 0's rows only. The line holds the re-initialisation events,
  whether this process's shard of ``mid.weight`` after the first step's check is its rows of the
  whole Xavier draw an unsharded run makes, whether rank 0's ``first.weight`` shard is still zero
  then (a global decision, not per shard), and, on rank 0, each layer's logged gradient norm
  against the norm of the reduced (``full_tensor``) gradient, step by step.
- ``rollback`` (SGD with momentum): rank 1's loss is multiplied by 1000 at step 25 only; the mean
  loss spikes on both, both roll back in place to the sharded checkpoint of step 20 (in
  ``OUT_DIR/rollback/``). The line holds whether this process's local shards right after the
  rollback are bitwise those of its own shard file in that checkpoint and those it held at step
  20, and whether its momentum buffers are those of step 20.
- ``tensor-parallel`` and ``not-sharded``: ``tensor_parallel_size=2``, and a module without
  ``fully_shard``: the line holds the ``ConfigError`` of ``on_fit_start``.
- ``noise``: ``noisy_regression`` at ``lr=0``, its ``Linear`` and the module ``fully_shard``-ed,
  batches of 16 per process, 600 steps: the gradient noise scale from each process's gradient at
  FSDP2's reduce-scatter, against the regression's closed form. Every line also holds whether
  each FSDP module's reduce-scatter went through the measuring comm (``nan``: yes, and its digest
  must still be the reference's) and the INFO lines saying why the noise scale was not measured
  (``nan-accumulate``: accumulation).
"""

import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
except ImportError as missing:
    print(f"SKIP {missing}", flush=True)
    sys.exit(0)

from safetensors.torch import load_file

from safeloop import ConfigError
from safeloop.checkpoint.sharded import SHARD_DIR, shard_file_name
from safeloop.diagnostics.noise_probe_fsdp import MeasuredReduceScatter, _comms, fsdp2_modules
from safeloop.guards.reinit import initial_values
from safeloop.lightning import SafeLoopCallback
from tests.helpers.lightning_models import RecordingLogger, Regression, batches, noise_record
from tests.helpers.lightning_ranks import (
    INFO,
    callback_record,
    leave_group,
    logged_grad_norms,
    same,
    write_result,
)
from tests.helpers.models import classification_data, noisy_regression

warnings.filterwarnings("ignore")
RANK = int(os.environ.get("RANK", "0"))
# rank 1's NaN loss: batch 2 (step 3), or with 2 micro-batches a step batch 4 (the window of step 3)
NAN_BATCH = {"nan": 2, "nan-accumulate": 4}
# the steps of rank 1's x1000 loss: one spike at 25 (found at the log step of 30), or 31-33 of 33
# (confirmed by the last log step, read in on_train_end)
POISON_AT = {"rollback": {25}, "rollback-end": {31, 32, 33}}


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``tensor`` (a copy)."""
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach().clone()


class Sharded(pl.LightningModule):
    """An MLP ``first -> mid -> last`` (8 -> 16 -> 16 -> 3), every layer and the module ``fully_shard``-ed.

    Args:
        kind (`str`): the fit (its fault and its optimizer).
        shard (`bool`): apply ``fully_shard`` in ``configure_model``.
    """

    def __init__(self, kind: str, *, shard: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.mid, self.last = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.kind, self.shard = kind, shard
        if kind == "zero":
            with torch.no_grad():
                self.mid.weight.zero_()
                self.mid.bias.zero_()
                self.first.weight[:8].zero_()  # rank 0's shard only

    def configure_model(self) -> None:
        if not self.shard:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.first, self.mid, self.last):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.mid(torch.relu(self.first(x)))))

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self(inputs), targets)
        if self.global_rank == 1 and batch_idx == NAN_BATCH.get(self.kind):
            return loss * float("nan")
        if self.global_rank == 1 and self.trainer.global_step + 1 in POISON_AT.get(self.kind, ()):
            return loss * 1000.0
        return loss

    def configure_optimizers(self):
        if self.kind.startswith("rollback"):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ShardedManual(Sharded):
    """``Sharded`` in manual optimization: ``manual_backward`` and ``opt.step()`` in ``training_step``.

    Args:
        kind (`str`): the fit.
        clip (`bool`): clip to norm 0.05 by hand before ``opt.step()`` (the reference, without the
            callback, whose ``clip_grad_norm=0.05`` clips the guarded fit).
    """

    def __init__(self, kind: str, *, clip: bool = False) -> None:
        super().__init__(kind)
        self.automatic_optimization = False
        self.clip = clip

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.parameters(), 0.05)
        optimizer.step()
        return loss.detach()


def optimizer_locals(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This process's shards of every tensor of the optimizer's state, in parameter order."""
    out = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key in sorted(optimizer.state.get(param, {})):
                value = optimizer.state[param][key]
                if isinstance(value, torch.Tensor):
                    out.append(local(value))
    return out


class Watch(pl.Callback):
    """Placed after SafeLoopCallback: sees each hook once the callback's work in it is done."""

    def __init__(self, guard: SafeLoopCallback | None) -> None:
        self.guard = guard
        self.before: list[torch.Tensor] = []
        self.unchanged: bool | None = None
        self.grad_norms: dict[int, dict[str, float]] = {}
        self.first_step: dict[str, bool] = {}
        # each process's shards and momentum at each checkpoint step (10, 20, 30), the rollback targets
        self.shards_at: dict[int, list[torch.Tensor]] = {}
        self.momentum_at: dict[int, list[torch.Tensor]] = {}
        self.restored: list[dict] = []

    def _state(self, trainer, module):
        return [local(p) for p in module.parameters()] + optimizer_locals(trainer.optimizers[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step + 1
        if step == 3:
            self.before = self._state(trainer, pl_module)
        # the reduced gradient, whole (a collective: every process calls it)
        self.grad_norms[step] = {
            name: float(p.grad.full_tensor().norm())
            for name, p in pl_module.named_parameters()
            if p.grad is not None
        }
        if pl_module.kind == "zero" and step == 1:  # after the first step's check, before the update
            expected = initial_values(
                (16, 16), "xavier", std=0.02, generator=torch.Generator().manual_seed(0)
            )
            rows = slice(8 * RANK, 8 * RANK + 8)
            self.first_step = {
                "mid_is_whole_draw": torch.equal(local(pl_module.mid.weight), expected[rows]),
                "first_shard_zero": not local(pl_module.first.weight).any().item(),
            }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3 and self.unchanged is None and self.before:
            self.unchanged = same(self.before, self._state(trainer, pl_module))
        step = trainer.global_step
        if step in (10, 20, 30) and step not in self.shards_at and not self.restored:
            self.shards_at[step] = [local(p) for p in pl_module.parameters()]
            self.momentum_at[step] = optimizer_locals(trainer.optimizers[0])
        self._restored_since(trainer, pl_module, "on_train_batch_end")

    def on_train_end(self, trainer, pl_module):
        self._restored_since(trainer, pl_module, "on_train_end")

    def _restored_since(self, trainer, pl_module, hook: str) -> None:
        """What the callback's rollback in this hook restored, if it made one."""
        if self.guard is None:
            return
        rollbacks = [e for e in self.guard.events if e.kind == "rollback"]
        if len(rollbacks) > len(self.restored):  # SafeLoopCallback's hook ran: restored in place
            target = rollbacks[-1].step
            path = Path(rollbacks[-1].detail["path"]) / SHARD_DIR / shard_file_name(RANK + 1)
            saved = load_file(path)
            shards = {name: local(p) for name, p in pl_module.named_parameters()}
            self.restored.append(
                {
                    "file": all(torch.equal(saved[f"model.{n}"], t) for n, t in shards.items()),
                    "shards": same(self.shards_at.get(target, []), list(shards.values())),
                    "momentum": same(
                        self.momentum_at.get(target, []), optimizer_locals(trainer.optimizers[0])
                    ),
                    "same_objects": [id(p) for p in trainer.optimizers[0].param_groups[0]["params"]]
                    == [id(p) for p in pl_module.parameters()],
                    "at": trainer.global_step,
                    "hook": hook,
                    "lr": trainer.optimizers[0].param_groups[0]["lr"],
                }
            )


def loader(name: str) -> torch.utils.data.DataLoader:
    """This process's batches (every other row, in order); the reference's lack batch 2 (step 3 of ``nan``).

    Dealt here, not by Lightning's sampler (``use_distributed_sampler=False``), so that dropping
    one batch leaves every other batch as it was.
    """
    inputs, targets = classification_data(n=960 if name.startswith("rollback") else 96).tensors
    rows = torch.arange(RANK, len(inputs), 2)
    if name == "reference-accumulate":
        rows = rows[:32]  # without the window of batches 4 and 5
    elif name.startswith("reference"):
        rows = torch.cat([rows[:16], rows[24:]])
    return batches(data=TensorDataset(inputs[rows], targets[rows]))


# optimizer steps per fit (6 otherwise); a reference has one step less than the fit it checks
MAX_STEPS = {
    "rollback": 30,
    "rollback-end": 33,
    "zero": 3,
    "reference": 5,
    "reference-manual": 5,
    "nan-accumulate": 3,
    "reference-accumulate": 2,
}


class ShardedRegression(Regression):
    """``Regression`` with its ``Linear`` and the module ``fully_shard``-ed."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.model, mesh=mesh)
        fully_shard(self, mesh=mesh)


def noise_fit(steps: int = 600) -> None:
    dataset, model, true = noisy_regression(n=65536)
    callback = SafeLoopCallback(summary=False, rollback=False)
    INFO.lines.clear()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"
        ),
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)
    trainer.fit(ShardedRegression(model), loader)
    record = {
        **noise_record("noise", RANK, true, callback.result),
        "unmeasured": INFO.about("noise scale not measured"),
    }
    write_result(record)


def fit(name: str, out_dir: Path) -> None:
    if name == "noise":
        noise_fit()
        return
    INFO.lines.clear()
    guards: dict = {"log_every": 2, "summary": False}
    if name == "zero":
        guards["log_every"] = 1
    if name.startswith("rollback"):
        guards = {"log_every": 5, "spike_warmup": 10, "checkpoint_every": 10, "summary": False}
        guards["checkpoint_dir"] = str(out_dir / name)
    if name == "nan-manual":
        guards["clip_grad_norm"] = 0.05  # the callback clips; the reference clips by hand
    callback = None if name.startswith("reference") else SafeLoopCallback(**guards)
    watch = Watch(callback)
    logger = RecordingLogger()
    tensor_parallel = 2 if name == "tensor-parallel" else 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(
            data_parallel_size=2 // tensor_parallel,
            tensor_parallel_size=tensor_parallel,
            process_group_backend="gloo",
        ),
        max_steps=MAX_STEPS.get(name, 6),
        accumulate_grad_batches=2 if name.endswith("-accumulate") else 1,
        max_epochs=-1,
        logger=logger if name == "zero" else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[c for c in (callback, watch) if c is not None],
    )
    if name in ("nan-manual", "reference-manual"):
        module: Sharded = ShardedManual(
            "nan" if name == "nan-manual" else name, clip=name == "reference-manual"
        )
    else:
        module = Sharded(name, shard=name != "not-sharded")
    record: dict = {"fit": name, "rank": RANK}
    try:
        trainer.fit(module, loader(name))
    except ConfigError as error:
        record["error"] = str(error)
    sha = hashlib.sha256()
    for param in module.parameters():
        sha.update(local(param).numpy().tobytes())
    result = None if callback is None else callback.result
    record.update(
        digest=sha.hexdigest(),
        unchanged=watch.unchanged,
        first_step=watch.first_step,
        restored=watch.restored,
        grad_norms={str(k): v for k, v in watch.grad_norms.items()},
        logged_grad_norms=logged_grad_norms(logger.logged),
        noise=None
        if result is None or result.gradient_noise_scale is None
        else result.gradient_noise_scale.value,
        **callback_record(callback),
        # every FSDP module's reduce-scatter goes through the measuring comm (the noise scale's)
        measuring_comm=[
            isinstance(comm, MeasuredReduceScatter) for m in fsdp2_modules(module) for comm in _comms(m)
        ],
        unmeasured=INFO.about("noise scale not measured"),
    )
    write_result(record)


def main() -> None:
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    for name in os.environ.get(
        "FITS",
        "nan,reference,nan-manual,reference-manual,nan-accumulate,reference-accumulate,zero,rollback,rollback-end,tensor-parallel,not-sharded,noise",
    ).split(","):
        fit(name, out_dir)
    leave_group()


if __name__ == "__main__":
    main()
