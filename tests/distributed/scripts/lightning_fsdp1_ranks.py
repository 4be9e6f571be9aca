"""Trains LightningModules under FSDP1 (``FSDPStrategy``) with SafeLoopCallback, under torchrun.

One launch, several fits in the same two processes, each printing one ``RESULT`` JSON line per
rank with its name under ``"fit"``. Every ``Linear`` is its own FSDP1 unit (``auto_wrap_policy``)
inside the root Lightning wraps, with ``use_orig_params=True`` (Lightning's default): each
parameter is a flat view of this process's slice of it (rank 0 holds the first half of each
unit's flat weights, rank 1 the rest with the bias, so rank 0's bias slices are empty).

Lightning refuses ``FSDPStrategy`` on a CPU accelerator (an exact type check), and its wrapping
passes FSDP1 ``device_id=None``, which FSDP1 refuses on a CPU process group; :class:`CPUFSDPStrategy`
wraps the module itself with ``device_id=cpu`` and leaves the rest to Lightning. Everything the
callback reads (the flat slices, the root's ``clip_grad_norm_``, the sharded state dict) is what
it reads on GPUs.

- ``nan`` (Adam, the callback clipping to norm 0.05): rank 1's loss goes NaN at batch 2
  (optimizer step 3) only. The line holds the skips, the findings, whether step 3 left this
  process's slices and Adam state bitwise as they were, each step's global norm, and a digest of
  the final slices. ``reference``: the same fit without the callback and without the batch of
  step 3, clipped by FSDP1 itself (the root's ``clip_grad_norm_(0.05)`` in
  ``on_before_optimizer_step``): its digest must be the guarded fit's.
- ``nan-bf16``, ``reference-bf16``: ``nan`` and ``reference`` with ``precision="bf16-true"`` (bf16
  parameters and gradients: FSDP1 casts its clip coefficient to bf16 before multiplying).
- ``nan-manual``: ``nan`` in manual optimization (``manual_backward``, ``opt.step()``), where the
  root's ``clip_grad_norm_`` cannot run (``training_step`` is the root's forward): the same digest.
- ``zero`` (``log_every=1``): ``mid.weight`` and ``mid.bias`` start all zeros (stuck: ReLU's
  gradient at 0 is 0), and ``first.weight`` is zero in rank 0's slice only. The line holds the
  re-initialisation events, whether ``mid.weight`` after the first step's check is, gathered
  whole, the Xavier draw an unsharded run makes, whether rank 0's slice of ``first.weight`` is
  still zero then (a global decision, not per slice), and each layer's logged gradient norm
  against the norm of the whole reduced gradient (``summon_full_params(with_grads=True)``).
- ``rollback`` (SGD with momentum): rank 1's loss is multiplied by 1000 at step 25 only; both roll
  back in place to the sharded checkpoint of step 20 (in ``OUT_DIR/rollback/``). The line holds
  whether this process's slices and momentum right after the rollback are bitwise those it held
  at step 20, and whether its shard file's rows are those of the whole parameters then.
- ``orig-false``: ``use_orig_params=False``: the line holds the ``ConfigError`` of ``on_fit_start``.
"""

import hashlib
import json
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
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
except ImportError as missing:
    print(f"SKIP {missing}", flush=True)
    sys.exit(0)

from safetensors import safe_open

from safeloop import ConfigError
from safeloop.checkpoint.sharded import SHARD_DIR, shard_file_name
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
NAN_BATCH = {"nan": 2, "nan-manual": 2, "nan-bf16": 2}  # rank 1's NaN loss: batch 2, optimizer step 3
POISON_AT = {"rollback": 25}  # rank 1's x1000 loss: found at the log step of 30
MAX_STEPS = {"rollback": 30, "zero": 3, "reference": 5, "reference-bf16": 5}


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` on CPU processes: FSDP1 gets ``device_id=cpu`` (see the module's docstring)."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        kwargs = dict(self.kwargs)
        policy = kwargs.pop("auto_wrap_policy", None)  # Lightning's wrapping drops it once wrapped
        wrapped = FSDP(
            model,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            auto_wrap_policy=policy,
            **kwargs,
        )
        return super()._setup_model(wrapped)


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone()


class Flat(pl.LightningModule):
    """An MLP ``first -> mid -> last`` (8 -> 16 -> 16 -> 3), each layer its own FSDP1 unit.

    Args:
        kind (`str`): the fit (its fault and its optimizer).
        manual (`bool`): manual optimization.
    """

    def __init__(self, kind: str, *, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.mid, self.last = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.kind = kind
        self.automatic_optimization = not manual
        if kind == "zero":
            with torch.no_grad():
                self.mid.weight.zero_()
                self.mid.bias.zero_()
                self.first.weight.view(-1)[:72].zero_()  # rank 0's slice of its unit (144 elements)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.mid(torch.relu(self.first(x)))))

    def _loss(self, batch, batch_idx) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self(inputs), targets)
        if self.global_rank == 1 and batch_idx == NAN_BATCH.get(self.kind):
            return loss * float("nan")
        if self.global_rank == 1 and self.trainer.global_step + 1 == POISON_AT.get(self.kind):
            return loss * 1000.0
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch, batch_idx)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss.detach()

    def configure_optimizers(self):
        if self.kind == "rollback":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def optimizer_locals(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimizer's state (this process's slices), in parameter order."""
    return [
        local(value)
        for group in optimizer.param_groups
        for param in group["params"]
        for _, value in sorted(optimizer.state.get(param, {}).items())
        if isinstance(value, torch.Tensor)
    ]


def clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


class RootClip(pl.Callback):
    """The reference's clipping: FSDP1's own, the root's ``clip_grad_norm_(0.05)``, before each step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        trainer.model.clip_grad_norm_(0.05)


class Watch(pl.Callback):
    """Placed after SafeLoopCallback: sees each hook once the callback's work in it is done."""

    def __init__(self, guard: SafeLoopCallback | None) -> None:
        self.guard = guard
        self.before: list[torch.Tensor] = []
        self.unchanged: bool | None = None
        self.grad_norms: dict[int, dict[str, float]] = {}
        self.first_step: dict[str, bool] = {}
        self.held_at: dict[int, list[torch.Tensor]] = {}  # slices and momentum at 10, 20, 30
        self.whole_at: dict[int, dict[str, torch.Tensor]] = {}
        self.restored: list[dict] = []

    def _state(self, trainer, module):
        return [local(p) for p in module.parameters()] + optimizer_locals(trainer.optimizers[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step + 1
        if step == 3:
            self.before = self._state(trainer, pl_module)
        if pl_module.kind != "zero":
            return
        if step == 1:  # after the first step's check, before the update
            expected = initial_values(
                (16, 16), "xavier", std=0.02, generator=torch.Generator().manual_seed(0)
            )
            self.first_step["first_slice_zero"] = not pl_module.first.weight.any().item()
        with FSDP.summon_full_params(trainer.model, with_grads=True):  # whole (a collective)
            self.grad_norms[step] = {
                clean(name): float(p.grad.norm()) for name, p in pl_module.named_parameters()
            }
            if step == 1:
                self.first_step["mid_is_whole_draw"] = torch.equal(pl_module.mid.weight, expected)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3 and self.unchanged is None and self.before:
            self.unchanged = same(self.before, self._state(trainer, pl_module))
        step = trainer.global_step
        held = step in self.held_at or self.restored
        if pl_module.kind == "rollback" and step in (10, 20, 30) and not held:
            self.held_at[step] = self._state(trainer, pl_module)
            with FSDP.summon_full_params(trainer.model):
                self.whole_at[step] = {clean(n): local(p) for n, p in pl_module.named_parameters()}
        if self.guard is None:
            return
        rollbacks = [e for e in self.guard.events if e.kind == "rollback"]
        if len(rollbacks) > len(self.restored):  # SafeLoopCallback's hook ran: restored in place
            target = rollbacks[-1].step
            path = Path(rollbacks[-1].detail["path"]) / SHARD_DIR / shard_file_name(RANK + 1)
            self.restored.append(
                {
                    "held": same(self.held_at.get(target, []), self._state(trainer, pl_module)),
                    "file": file_matches(path, self.whole_at.get(target, {})),
                    "at": trainer.global_step,
                    "lr": trainer.optimizers[0].param_groups[0]["lr"],
                }
            )


def file_matches(path: Path, whole: dict[str, torch.Tensor]) -> bool:
    """Whether this process's shard file holds the rows of the whole parameters it says it holds."""
    with safe_open(str(path), framework="pt") as handle:
        offsets = json.loads(handle.metadata()["DCP_SHARDING_INFO"])
        checked = 0
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            if not key.startswith("model."):
                continue
            rows = handle.get_tensor(key)
            start = offsets[key]["saved_offsets"][0]
            if not torch.equal(rows, whole[key[len("model.") :]][start : start + len(rows)]):
                return False
            checked += 1
    return checked > 0


def loader(name: str) -> torch.utils.data.DataLoader:
    """This process's batches (every other row, in order); a reference's lack batch 2 (step 3)."""
    inputs, targets = classification_data(n=960 if name == "rollback" else 96).tensors
    rows = torch.arange(RANK, len(inputs), 2)
    if name.startswith("reference"):
        rows = torch.cat([rows[:16], rows[24:]])
    return batches(data=TensorDataset(inputs[rows], targets[rows]))


def fit(name: str, out_dir: Path) -> None:
    INFO.lines.clear()
    guards: dict = {"log_every": 1 if name == "zero" else 2, "summary": False}
    if name == "rollback":
        guards = {"log_every": 5, "spike_warmup": 10, "checkpoint_every": 10, "summary": False}
        guards["checkpoint_dir"] = str(out_dir / name)
    if name.startswith("nan"):
        guards["clip_grad_norm"] = 0.05  # the callback clips; the reference's FSDP1 clips itself
    callback = None if name.startswith("reference") else SafeLoopCallback(**guards)
    watch = Watch(callback)
    logger = RecordingLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=CPUFSDPStrategy(
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
            process_group_backend="gloo",
            use_orig_params=name != "orig-false",
        ),
        max_steps=MAX_STEPS.get(name, 6),
        max_epochs=-1,
        precision="bf16-true" if name.endswith("bf16") else "32-true",
        logger=logger if name == "zero" else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[c for c in (callback, watch, RootClip() if callback is None else None) if c is not None],
    )
    module = Flat(name, manual=name == "nan-manual")
    record: dict = {"fit": name, "rank": RANK}
    try:
        trainer.fit(module, loader(name))
    except ConfigError as error:
        record["error"] = str(error)
    sha = hashlib.sha256()
    for param in module.parameters():
        sha.update(local(param).view(torch.uint8).numpy().tobytes())  # the bytes, any dtype
    record.update(
        digest=sha.hexdigest(),
        unchanged=watch.unchanged,
        restored=watch.restored,
        first_step=watch.first_step,
        grad_norms={str(k): v for k, v in watch.grad_norms.items()},
        logged_grad_norms=logged_grad_norms(logger.logged),
        info=list(INFO.lines),
        **callback_record(callback),
    )
    write_result(record)


def main() -> None:
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    fits = "nan,reference,nan-manual,nan-bf16,reference-bf16,zero,rollback,orig-false"
    for name in os.environ.get("FITS", fits).split(","):
        fit(name, out_dir)
    leave_group()


if __name__ == "__main__":
    main()
