"""Trains the deep sigmoid MLP under DeepSpeed ZeRO-0/1/2/3 or DDP on CPU ranks, with optional faults.

Run by ``tests/distributed/test_deepspeed.py`` under torchrun (2 processes, gloo). ``MODE=ds`` with
``STAGE`` 0-3 prepares the model through Accelerate's ``DeepSpeedPlugin``; ``MODE=ddp`` is the
reference. ``FAULT=nanloss`` adds a detached NaN to the loss of training call 3 (the gradients stay
finite, so only safeloop's guard can refuse the step); ``FAULT=nangrad`` multiplies that loss by NaN
(the gradients go non-finite too). ``GUARD`` is the ``nan_guard``; ``UNUSED=1`` adds a layer the
forward never calls; ``MODEL=zero`` trains the model of ``reinit_fsdp_ranks.py`` (a stuck all-zero
weight and a learning one) instead of the deep sigmoid MLP; ``OPTIMIZER=other-model`` builds the
optimizer from another instance of the model; ``ACCUM`` sets gradient accumulation (both
Accelerate's and the DeepSpeed config's); ``LOOP=hand-written`` runs Accelerate's documented loop
instead of SafeTrainer (only the final weights are recorded); ``SCHEDULER=1`` halves the learning
rate every 2 steps; ``FIND_LR=N`` runs ``find_lr(num_steps=N)`` before ``fit`` (its curve is
recorded: the fit after it must still equal the hand-written loop). Each rank writes
``<out_dir>/result_<rank>.json`` (named on a ``RESULT`` line): findings, events, losses, each step's
whole gradient norm per parameter (read by a callback before the step: ``safe_get_full_grad`` under
DeepSpeed, a test-only collective), and the final fp32 weights. Rank 0's tracker writes every
``accelerator.log`` call to ``<out_dir>/metrics.jsonl``.

Accelerate 1.15 sets the DeepSpeed distributed type for GPU-like devices only; on CPU the script
sets it itself (as the FSDP script does), with the plugin marked selected (``select`` would need
``transformers`` for a ZeRO-3 init hook these plain modules do not use). It exits with code 3 and a
``SKIP`` line when DeepSpeed is not installed or cannot start here.
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, set_seed

from safeloop import Callback, NonFiniteError, SafeTrainer
from safeloop.diagnostics.sharded import shard_layout
from safeloop.zero import zero_engine
from tests.distributed.scripts.reinit_fsdp_ranks import zero_weights_model
from tests.distributed.scripts.train_fsdp_ranks import deep_sigmoid_mlp
from tests.helpers.models import WithUnused, classification_data
from tests.helpers.recording import JsonLinesTracker, end_run

SKIP_CODE = 3
MICRO_BATCH = 16


def skip(reason: str) -> None:
    sys.stdout.write(f"SKIP {reason}\n")
    sys.stdout.flush()
    sys.exit(SKIP_CODE)


def build_accelerator(mode: str, tracker: JsonLinesTracker) -> Accelerator:
    accumulation = int(os.environ.get("ACCUM", "1"))
    if mode == "ddp":
        return Accelerator(cpu=True, log_with=[tracker], gradient_accumulation_steps=accumulation)
    try:
        import deepspeed  # noqa: F401
        from accelerate import DeepSpeedPlugin
    except ImportError as error:
        skip(f"deepspeed is not installed: {error!r}")
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": int(os.environ["STAGE"])},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": float(os.environ.get("DS_CLIP", "0")),
    }
    plugin = DeepSpeedPlugin(hf_ds_config=config)
    accelerator = Accelerator(
        cpu=True, deepspeed_plugin=plugin, log_with=[tracker], gradient_accumulation_steps=accumulation
    )
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    plugin.set_mixed_precision("no")
    plugin._set_selected(True)
    accelerator.state.deepspeed_plugins = plugin
    accelerator.state._mixed_precision = "no"
    return accelerator


def whole(param: torch.Tensor, attribute: str) -> torch.Tensor | None:
    """A parameter's whole gradient or fp32 weight: gathered under DeepSpeed (every rank calls it)."""
    if os.environ["MODE"] == "ds":
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        value = (safe_get_full_grad if attribute == "grad" else safe_get_full_fp32_param)(param)
        if value is not None or os.environ["STAGE"] != "0":
            return value
    # DDP, and ZeRO stage 0 (whole parameters and reduced `.grad`, which DeepSpeed hands back as None)
    return param.grad if attribute == "grad" else param.detach()


class StepNorms(Callback):
    """Each step's whole gradient norm per parameter, before the step (nothing is clipped)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        norms = {}
        for name, param in model.named_parameters():
            grad = whole(param, "grad")
            norms[name] = 0.0 if grad is None else float(grad.float().norm())
        self.steps.append(norms)


class FirstTargets(Callback):
    """The targets of this process's first micro-batches: what the baseline loss is measured on."""

    def __init__(self, count: int = 8) -> None:
        self.count = count
        self.targets: list[int] = []
        self.batches = 0

    def on_train_batch_start(self, trainer, batch, batch_idx) -> None:
        if self.batches < self.count:
            self.targets += batch[1].tolist()
            self.batches += 1


def loss_function(fault: str):
    if not fault:
        return nn.CrossEntropyLoss()  # recognised: the run measures its baseline loss
    base, calls = nn.CrossEntropyLoss(), [0]

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = base(outputs, targets)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 3 and fault == "nanloss":
                loss = loss + torch.tensor(float("nan"))  # detached: the gradients stay finite
            elif calls[0] == 3 and fault == "nangrad":
                loss = loss * float("nan")
        return loss

    return loss_fn


def hand_written_loop(accelerator: Accelerator, out_dir: str) -> None:
    """Accelerate's documented loop under DeepSpeed (``backward`` runs the engine's step), seeded as
    ``seed=0`` seeds SafeTrainer: the reference for the trainer's own DeepSpeed step."""
    built = model_optimizer_loader()
    set_seed(0)  # after building, before `prepare`: Accelerate seeds its shuffling generator there
    model, optimizer, loader = accelerator.prepare(*built)
    set_seed(0)
    model.train()
    loss_fn, steps = nn.CrossEntropyLoss(), 0
    while steps < int(os.environ.get("MAX_STEPS", "20")):
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
                steps += accelerator.sync_gradients
            if steps == int(os.environ.get("MAX_STEPS", "20")):
                break
    unwrapped = accelerator.unwrap_model(model)
    record = {"rank": accelerator.process_index, "steps": steps}
    record["weights"] = {
        n: whole(p, "weight").float().reshape(-1).tolist() for n, p in unwrapped.named_parameters()
    }
    write_record(accelerator, out_dir, record)


def model_optimizer_loader() -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    model = zero_weights_model() if os.environ.get("MODEL") == "zero" else deep_sigmoid_mlp()
    if os.environ.get("UNUSED") == "1":
        model = WithUnused(model)
    x, y = classification_data(n=128).tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=MICRO_BATCH, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if os.environ.get("OPTIMIZER") == "other-model":  # built from another instance of the model
        optimizer = torch.optim.SGD(deep_sigmoid_mlp().parameters(), lr=0.1)
    return model, optimizer, loader


def write_record(accelerator: Accelerator, out_dir: str, record: dict) -> None:
    end_run(accelerator)
    # the record (the weights) is longer than one atomic pipe write: to a file, named on stdout
    path = os.path.join(out_dir, f"result_{accelerator.process_index}.json")
    with open(path, "w") as fh:
        json.dump(record, fh)
    sys.stdout.write("RESULT " + json.dumps({"rank": accelerator.process_index, "file": path}) + "\n")
    sys.stdout.flush()


def main() -> None:
    out_dir, mode = sys.argv[1], os.environ["MODE"]
    tracker = JsonLinesTracker(os.path.join(out_dir, "metrics.jsonl"))
    accelerator = build_accelerator(mode, tracker)
    if os.environ.get("LOOP") == "hand-written":
        hand_written_loop(accelerator, out_dir)
        return
    accelerator.init_trackers("deepspeed-test")
    model, optimizer, loader = model_optimizer_loader()
    norms, first = StepNorms(), FirstTargets()
    options = {}
    if "CLIP" in os.environ:
        options["clip_grad_norm"] = float(os.environ["CLIP"])
    if os.environ.get("SCHEDULER") == "1":  # the learning rate halves every 2 steps
        options["lr_scheduler"] = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    try:
        trainer = SafeTrainer(
            model,
            optimizer,
            loader,
            loss_fn=loss_function(os.environ.get("FAULT", "")),
            seed=0,
            accelerator=accelerator,
            progress_bar=False,
            max_steps=int(os.environ.get("MAX_STEPS", "20")),
            log_every=5,
            nan_guard=os.environ.get("GUARD", "skip"),
            callbacks=[norms, first],
            **options,
        )
    except RuntimeError as error:  # DeepSpeed refused to start on this machine
        if "ConfigError" in type(error).__name__:
            raise
        skip(f"DeepSpeed could not start on CPU: {error!r}")
    record = {"rank": accelerator.process_index, "distributed_type": str(accelerator.distributed_type)}
    if os.environ.get("FIND_LR"):
        found = trainer.find_lr(num_steps=int(os.environ["FIND_LR"]))
        record["find_lr"] = {
            "lrs": found.lrs,
            "losses": found.losses,
            "suggestion": found.suggestion,
            "verdict": found.verdict,
            "passes": found.loader_passes,
            "stop": found.stop_reason,
        }
    try:
        result = trainer.fit()
        record.update(
            steps=result.global_step,
            skipped=result.skipped_steps,
            losses=[h["loss"] for h in result.history],
            findings=[[f.code, f.severity, list(f.params), f.step] for f in result.findings],
            events=[[e.kind, e.step] for e in result.events],
            reinit=[e.detail for e in result.events if e.kind == "reinit"],
            baseline=result.baseline_loss,
            first_targets=first.targets,
        )
    except NonFiniteError as error:
        record.update(error=type(error).__name__, steps=trainer.global_step)
    unwrapped = accelerator.unwrap_model(trainer.model)
    record["weights"] = {
        n: whole(p, "weight").float().reshape(-1).tolist() for n, p in unwrapped.named_parameters()
    }
    record["step_norms"] = norms.steps
    # the layout the diagnostics measure by, worked out from the prepared engine as they do
    layout = shard_layout(
        accelerator, unwrapped.parameters(), trainer.model, zero_engine(accelerator, trainer.model)
    )
    record["layout"] = [layout.shard_count, layout.per_param, layout.reach_hooks]
    write_record(accelerator, out_dir, record)


if __name__ == "__main__":
    main()
