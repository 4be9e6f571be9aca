"""FSDP2 under Lightning: ``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``.

Under ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` Lightning wraps
nothing: the ``LightningModule`` applies ``fully_shard`` itself in ``configure_model``, and from
then on every parameter is a DTensor sharded by rows (``Shard(0)``) over the data-parallel
processes. At ``on_before_optimizer_step`` each gradient is a DTensor too, already
reduce-scattered: this process's shard of the mean gradient over all processes, exactly what its
optimizer uses. The optimizer's parameters are the module's own objects.

So ``SafeTrainer``'s FSDP2 components apply unchanged once :class:`LightningProcesses` answers
``DistributedType.FSDP``: the all-zero weight check decides on sums over the shards
(``guards/reinit.py``), the diagnostics sum squared shard norms (``diagnostics/sharded.py``), the
checkpoints are sharded safetensors (``checkpoint/sharded.py``). This module holds the rest:
which set-ups are FSDP2 (:func:`is_fsdp2`), which are refused (:func:`fsdp2_problems`), and the
step's gradient norms measured and clipped on DTensor gradients (:func:`measure_and_clip_sharded`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safeloop.guards.clipping import GradNorms, shard_grad_norms

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support: no FSDP2 either
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["is_fsdp2", "fsdp2_problems", "fsdp2_noise_refusal", "measure_and_clip_sharded"]

# why the gradient noise scale stays off under FSDP2 with accumulation (INFO, docs/lightning.md)
FSDP2_NOISE_ACCUMULATION = (
    "under Lightning's ModelParallelStrategy (FSDP2) with `accumulate_grad_batches` > 1 every "
    "micro-batch reduce-scatters its own gradient (Lightning blocks the gradient sync of DDP only), "
    "so no process's whole window gradient is seen; `accumulate_grad_batches=1` on several "
    "processes measures it"
)
FSDP2_NOISE_FP16 = (
    "under Lightning's ModelParallelStrategy (FSDP2) with fp16 FSDP2 reduces gradients divided by a "
    'factor of its own, so a process\'s gradient cannot be read there; `precision="bf16-mixed"` or '
    "32-bit is measured"
)


def fsdp2_noise_refusal(processes: Any) -> str | None:
    """Why the gradient noise scale cannot be measured in this FSDP2 fit, in Lightning's terms; None.

    Checked before ``attach_sharded_probe``, whose fp16 reason names ``SafeTrainer``'s keyword; the
    rest (one process, a torch without FSDP2's custom reduce-scatter, several parameter groups)
    it says when the diagnostics are built.

    Args:
        processes (`LightningProcesses`): the fit's processes, accumulation, precision and module
            (after ``configure_model``).
    """
    if processes.gradient_accumulation_steps > 1:
        return FSDP2_NOISE_ACCUMULATION
    module = processes.pl_module
    if processes.mixed_precision == "fp16" or any(p.dtype == torch.float16 for p in module.parameters()):
        return FSDP2_NOISE_FP16
    return None


def is_fsdp2(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallel)."""
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # Lightning before 2.4 has none (and is refused by the version check)
        return False
    return isinstance(strategy, ModelParallelStrategy)


def fsdp2_problems(strategy: Any, module: torch.nn.Module) -> list[str]:
    """What SafeLoopCallback cannot guard in a ``ModelParallelStrategy`` fit (after its set-up).

    Args:
        strategy (`ModelParallelStrategy`): the trainer's strategy, set up (its mesh exists).
        module (`LightningModule`): the module, after ``configure_model``.

    Returns:
        `list[str]`: one sentence per problem, each with its fix; empty when supported.
    """
    problems = []
    size = getattr(strategy, "_tensor_parallel_size", 1)  # "auto" is resolved by the set-up
    tensor_parallel = size if isinstance(size, int) else 1
    if tensor_parallel > 1:
        problems.append(
            f"the strategy is ModelParallelStrategy with tensor_parallel_size={tensor_parallel}; "
            "SafeLoopCallback supports data parallelism only (FSDP2, `tensor_parallel_size=1`): "
            "under tensor parallelism the gradient norms, the all-zero weight check and the "
            "checkpoints would have to combine shards over a second mesh dimension, which is not "
            "built yet. Fix: `ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)` "
            "with `fully_shard` in `configure_model`, or remove SafeLoopCallback for this run "
            '(the default `tensor_parallel_size="auto"` means every device).'
        )
        return problems
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    plain = [name for name, p in trainable if DTensor is None or not isinstance(p, DTensor)]
    if plain:
        shown = ", ".join(f"`{name}`" for name in plain[:5]) + (" ..." if len(plain) > 5 else "")
        problems.append(
            f"under ModelParallelStrategy {len(plain)} of {len(trainable)} trainable parameters are "
            f"not DTensors ({shown}): `fully_shard` was not applied to them in `configure_model`, so "
            "their gradients are neither reduced nor sharded, and each process would train its own "
            "copy. Fix: call `torch.distributed.fsdp.fully_shard(module, "
            'mesh=self.device_mesh["data_parallel"])` on the submodules and on `self` in '
            "`configure_model`."
        )
    return problems


def measure_and_clip_sharded(
    params: Sequence[torch.nn.Parameter], *, max_norm: float | None, max_value: float | None
) -> GradNorms:
    """Measure the step's DTensor gradients, then clip them with that norm (FSDP2).

    The global norm is torch's own for DTensors (``get_total_norm``: each process's shard norms,
    reduced over the mesh by ``full_tensor``, the same value on every process), clipped as
    ``torch.nn.utils.clip_grad_norm_`` clips; the per-parameter norms are this process's shard
    norms, whose squares the log step sums over processes (``diagnostics/sharded.py``).

    Args:
        params (`Sequence[torch.nn.Parameter]`): the module's parameters (DTensors).
        max_norm (`float`, *optional*): max global norm.
        max_value (`float`, *optional*): clamp for every gradient element.

    Returns:
        `GradNorms`: the norms before clipping: the total whole (a plain 0-dim tensor), the
        per-parameter ones of this process's shards.
    """
    per_param = shard_grad_norms(params)  # before clipping, as without sharding
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        device = params[0].to_local().device if params else None  # type: ignore[attr-defined]
        return GradNorms(total=torch.zeros((), device=device), per_param=per_param)
    total = torch.nn.utils.get_total_norm(grads, 2.0)  # a DTensor: the shards' norms, not reduced yet
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(list(params), max_norm, total)
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(list(params), max_value)
    if DTensor is not None and isinstance(total, DTensor):
        # one 0-dim all-reduce per step: the finite flag's all-reduce refuses a DTensor
        total = total.full_tensor()
    return GradNorms(total=total, per_param=per_param)
