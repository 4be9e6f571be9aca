"""Trains a deep sigmoid MLP whose first layers' gradients vanish, under FSDP2, FSDP1 or DDP, on CPU ranks.

Run by ``tests/distributed/test_fsdp.py`` under torchrun (2 processes, gloo). ``MODE=fsdp2``
shards the model with Accelerate's ``FullyShardedDataParallelPlugin(fsdp_version=2)``;
``MODE=fsdp1`` with ``fsdp_version=1`` and ``use_orig_params=True``, each 16x16 layer in its own
FSDP module and the first and last layers in the root's; ``ORIG=0`` wraps the model in FSDP1
with ``use_orig_params=False`` itself, before building the optimizer on its FlatParameters
(Accelerate 1.15 does not move an optimizer built before ``prepare`` onto them, so the
first-batch check would refuse the run);
``MODE=ddp`` is the unsharded reference. Each rank prints one ``RESULT`` JSON line: findings,
and, per optimizer step, each parameter's whole gradient norm measured by a callback (a full
gather under FSDP2, an all-reduce of squared slice norms under FSDP1: test-only cost). Rank 0's
tracker writes every ``accelerator.log`` call to ``<out_dir>/metrics.jsonl``.

Accelerate 1.15 ignores an FSDP plugin on CPU (``AcceleratorState`` only sets FSDP for GPU-like
distributed types), while ``fully_shard`` itself runs on a gloo CPU mesh; the script sets the
distributed type itself, in both shared states (``AcceleratorState`` copies ``PartialState``'s
when it is built again during ``prepare``). FSDP1 also needs the device without an index: for
a CPU process group Accelerate's device is ``cpu:0`` (``torch.device("cpu", local_rank %
torch.cpu.device_count())``), which it passes to FSDP1 as ``device_id``, while FSDP1 takes its
compute device from ``torch.cpu.current_device()``, plain ``cpu``, and refuses the pair
("Inconsistent compute device and `device_id`"). It exits with code 3 and a ``SKIP`` line when
FSDP cannot be set up here.
"""

import os
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

from safeloop import Callback, ConfigError, SafeTrainer
from safeloop.diagnostics.sharded import shard_layout
from tests.helpers.models import WithUnused, classification_data
from tests.helpers.recording import JsonLinesTracker, end_run, print_result

SKIP_CODE = 3


def deep_sigmoid_mlp() -> nn.Module:
    """20 Linear layers with sigmoids between them: the first layers' gradients vanish."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.Sigmoid()]
    for _ in range(18):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 3))


class StepNorms(Callback):
    """Each step's whole gradient norm per parameter (before the update; nothing is clipped)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, optimizer) -> None:
        norms = {}
        named = list(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
        if os.environ.get("MODE") == "fsdp1":
            # flat slices of each gradient, empty ones with `.grad = None`: their squares sum up
            squares = torch.stack(
                [
                    torch.zeros(()) if p.grad is None else p.grad.detach().float().square().sum()
                    for _, p in named
                ]
            )
            dist.all_reduce(squares)
            self.steps.append(
                {unwrapped(n): float(s) ** 0.5 for (n, _), s in zip(named, squares.tolist(), strict=True)}
            )
            return
        for name, param in named:
            grad = param.grad
            if hasattr(grad, "full_tensor"):  # an FSDP2 shard: gather it (every rank calls this)
                grad = grad.full_tensor()
            norms[name] = float(grad.norm()) if grad is not None else 0.0
        self.steps.append(norms)


def unwrapped(name: str) -> str:
    """A parameter's name in the model as built (FSDP1's auto-wrapped layers add a component)."""
    return name.replace("_fsdp_wrapped_module.", "")


def build_accelerator(
    mode: str, tracker: JsonLinesTracker | None, *, accumulation: int | None = None, **fsdp2_options: Any
) -> Accelerator:
    """An Accelerator for ``mode`` on CPU; ``accumulation`` (else ``ACCUM``), FSDP2 plugin options."""
    options = {
        "cpu": True,
        "log_with": None if tracker is None else [tracker],
        "gradient_accumulation_steps": accumulation or int(os.environ.get("ACCUM", "1")),
    }
    if mode == "ddp":
        return Accelerator(**options)
    if mode == "fsdp1":
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=1,
            use_orig_params=os.environ.get("ORIG", "1") == "1",
            # each 16x16 layer (272 elements) in its own FSDP module; the first (144) and last
            # (51) layers are left to the root's: nested FlatParameters and uneven slices
            auto_wrap_policy="size_based_wrap",
            min_num_params=200,
        )
        plugin.set_auto_wrap_policy(None)  # the callable, for a model wrapped by hand (ORIG=0)
    else:
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, **fsdp2_options)
    accelerator = Accelerator(fsdp_plugin=plugin, **options)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if mode == "fsdp1":
        # FSDP1 compares its CPU compute device, `cpu`, with the `device_id` Accelerate passes
        # (its state's device, `cpu:0` for a CPU process group): the same device without the index
        cpu = torch.device("cpu")
        accelerator.state.device = cpu
        PartialState._shared_state["device"] = cpu
    return accelerator


def sharded_trainer(
    mode: str, model: nn.Module, loader: DataLoader, accelerator: Accelerator, **kwargs: Any
) -> SafeTrainer:
    """A SafeTrainer (SGD 0.1, cross-entropy, seed 0) on ``accelerator``; exit SKIP_CODE if FSDP refuses."""
    try:
        return SafeTrainer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader,
            loss_fn=nn.CrossEntropyLoss(),
            seed=0,
            accelerator=accelerator,
            progress_bar=False,
            **kwargs,
        )
    except ConfigError:
        raise
    except (RuntimeError, ValueError, NotImplementedError) as error:  # fully_shard refused here
        sys.stdout.write(f"SKIP {mode} could not shard the model on CPU: {error!r}\n")
        sys.stdout.flush()
        sys.exit(SKIP_CODE)


def wrap_flat(model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """FSDP1 with ``use_orig_params=False``, wrapped here with the plugin's policy before the
    optimizer is built on its FlatParameters (Accelerate leaves an FSDP model as it is)."""
    return FSDP1(
        model,
        auto_wrap_policy=accelerator.state.fsdp_plugin.auto_wrap_policy,
        use_orig_params=False,
        device_id=accelerator.device,
    )


def main() -> None:
    out_dir, mode = sys.argv[1], os.environ.get("MODE", "fsdp2")
    # MODE: fsdp2, fsdp1 or ddp; ORIG=0: FSDP1 with use_orig_params=False;
    # UNUSED=1: a layer never called; ACCUM: gradient accumulation steps; FIND_LR=N: find_lr first
    tracker = JsonLinesTracker(os.path.join(out_dir, "metrics.jsonl"))
    accelerator = build_accelerator(mode, tracker)
    accelerator.init_trackers("fsdp-test")
    model = deep_sigmoid_mlp()
    if os.environ.get("UNUSED") == "1":  # the first-batch gradient-reach check must name `aux`
        model = WithUnused(model)
    if mode == "fsdp1" and os.environ.get("ORIG") == "0":
        model = wrap_flat(model, accelerator)
    x, y = classification_data(n=128).tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    norms = StepNorms()
    trainer = sharded_trainer(
        mode,
        model,
        loader,
        accelerator,
        max_steps=int(os.environ.get("MAX_STEPS", "20")),
        log_every=5,
        callbacks=[norms],
    )
    found = None
    if os.environ.get("FIND_LR"):  # a range test first: the fit after it must train as without it
        found = trainer.find_lr(num_steps=int(os.environ["FIND_LR"]))
    result = trainer.fit()
    # the layout the diagnostics measure by, worked out from the prepared model as they do
    layout = shard_layout(accelerator, accelerator.unwrap_model(trainer.model).parameters(), trainer.model)
    record = {
        "rank": accelerator.process_index,
        "distributed_type": str(accelerator.distributed_type),
        "param_types": sorted({type(p).__name__ for p in trainer.model.parameters()}),
        "steps": result.global_step,
        "losses": [h["loss"] for h in result.history],
        "findings": [[f.code, f.severity, list(f.params), f.step] for f in result.findings],
        "step_norms": norms.steps,
        # what the diagnostics measure, and this rank's slice of each parameter (FSDP1: flat)
        "shard_count": layout.shard_count,
        "per_param": layout.per_param,
        "local_numels": {unwrapped(n): p.numel() for n, p in trainer.model.named_parameters()},
        "find_lr": None if found is None else [found.lrs, found.losses, found.suggestion, found.verdict],
    }
    end_run(accelerator)
    print_result(record)


if __name__ == "__main__":
    main()
