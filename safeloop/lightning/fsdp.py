"""FSDP under Lightning: FSDP2 (``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy``).

Under ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` Lightning wraps
nothing: the ``LightningModule`` applies ``fully_shard`` itself in ``configure_model``, and from
then on every parameter is a DTensor sharded by rows (``Shard(0)``) over the data-parallel
processes. At ``on_before_optimizer_step`` each gradient is a DTensor too, already
reduce-scattered: this process's shard of the mean gradient over all processes, exactly what its
optimizer uses. The optimizer's parameters are the module's own objects.

So ``SafeTrainer``'s FSDP2 components apply unchanged once :class:`LightningProcesses` answers
``DistributedType.FSDP``: the all-zero weight check decides on sums over the shards
(``guards/reinit.py``), the diagnostics sum squared shard norms (``diagnostics/sharded.py``), the
checkpoints are sharded safetensors (``checkpoint/sharded.py``).

Under ``FSDPStrategy`` (FSDP1) Lightning wraps the ``LightningModule`` in a root
``FullyShardedDataParallel`` (and its ``auto_wrap_policy`` submodules in their own). With
``use_orig_params=True``, Lightning's default, the module keeps its parameter objects, each a flat
view of this process's slice of it, and so is its ``.grad`` after the reduce-scatter: again the
gradient the optimizer uses, and ``SafeTrainer``'s FSDP1 components read it (the diagnostics' flat
slices, FSDP1's sharded state dict in the checkpoints). The global norm is computed as the root's
``clip_grad_norm_`` computes it (Lightning's FSDP precision refuses norm clipping: it has no root
to call).

This module holds the rest: which set-ups are FSDP2 or FSDP1 (:func:`is_fsdp2`,
:func:`is_fsdp1`), which are refused (:func:`fsdp2_problems`, :func:`fsdp1_problems`), and the
step's gradient norms measured and clipped on sharded gradients (:func:`measure_and_clip_sharded`,
:class:`Fsdp1Norms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safeloop.errors import ConfigError
from safeloop.guards.clipping import GradNorms, measure_and_clip, shard_grad_norms

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support: no FSDP2 either
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "is_fsdp1",
    "is_fsdp2",
    "fsdp1_problems",
    "fsdp2_problems",
    "fsdp_noise_refusal",
    "Fsdp1Norms",
    "measure_and_clip_sharded",
]

# why the gradient noise scale stays off under FSDP2 with accumulation (INFO, docs/lightning.md)
FSDP2_NOISE_ACCUMULATION = (
    "under Lightning's ModelParallelStrategy (FSDP2) with `accumulate_grad_batches` > 1 every "
    "micro-batch reduce-scatters its own gradient (Lightning blocks the gradient sync of DDP only), "
    "so no process's whole window gradient is seen; `accumulate_grad_batches=1` on several "
    "processes measures it"
)
FSDP1_NOISE = (
    "under Lightning's FSDPStrategy (FSDP1) a process's own gradient exists only inside FSDP1's "
    "reduction (a communication hook would replace that reduction, not watch it); FSDP2 through "
    "`ModelParallelStrategy` with `fully_shard` is measured"
)
FSDP2_NOISE_FP16 = (
    "under Lightning's ModelParallelStrategy (FSDP2) with fp16 FSDP2 reduces gradients divided by a "
    'factor of its own, so a process\'s gradient cannot be read there; `precision="bf16-mixed"` or '
    "32-bit is measured"
)


def fsdp_noise_refusal(processes: Any) -> str | None:
    """Why the gradient noise scale cannot be measured in this FSDP fit, in Lightning's terms; None.

    Checked before ``attach_sharded_probe``, whose reasons name ``SafeTrainer``'s keywords; the
    rest under FSDP2 (one process, a torch without FSDP2's custom reduce-scatter, several
    parameter groups) it says when the diagnostics are built. FSDP1 is never measured.

    Args:
        processes (`LightningProcesses`): the fit's processes, accumulation, precision and module
            (after ``configure_model``).
    """
    if is_fsdp1(processes.trainer.strategy):
        return FSDP1_NOISE
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


def is_fsdp1(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``FSDPStrategy`` (FSDP1) or a subclass of it."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def fsdp1_problems(strategy: Any) -> list[str]:
    """What SafeLoopCallback cannot guard in an ``FSDPStrategy`` fit (after its set-up).

    Args:
        strategy (`FSDPStrategy`): the trainer's strategy, its model wrapped.

    Returns:
        `list[str]`: one sentence per problem, each with its fix; empty when supported.
    """
    if strategy.kwargs.get("use_orig_params", True):
        problem = fsdp1_internals_problem(strategy.model)
        if problem is None:
            return []
        return [
            f"the strategy is FSDPStrategy, but {problem} (read as torch 2.13 has them), so the "
            "gradient norms cannot be computed as FSDP1 computes them. Fix: torch 2.13, FSDP2 through "
            "`ModelParallelStrategy`, or remove SafeLoopCallback for this run."
        ]
    return [
        "the strategy is FSDPStrategy with `use_orig_params=False`: FSDP1 then replaces each "
        "wrapped module's parameters by one FlatParameter, so the module's own parameters, whose "
        "gradients SafeLoopCallback measures, gates and checkpoints, are not the optimizer's. "
        "Fix: `FSDPStrategy(use_orig_params=True)` (Lightning's default), FSDP2 through "
        "`ModelParallelStrategy`, or remove SafeLoopCallback for this run."
    ]


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


class Fsdp1Norms:
    """The step's gradient norms under FSDP1, as the root's ``clip_grad_norm_`` computes them.

    ``FullyShardedDataParallel.clip_grad_norm_`` refuses to run while the root's forward is open,
    and under Lightning's manual optimization ``training_step`` (and the ``opt.step()`` in it) is
    that forward. So the norm is computed here the way FSDP1 computes it, bitwise: each gradient
    slice's float32 norm; the norm of those over the parameters of sharded units, in FSDP1's
    order (its handles, then each handle's parameters), on the root's compute device (with CPU
    offload the slices are on the CPU), raised to the square and all-reduced over the root's
    shard group; plus the square of the same over the rest (``NO_SHARD`` units, parameters FSDP1
    does not manage), which every process holds whole. Every unit ``NO_SHARD``: torch's own
    ``clip_grad_norm_``, as FSDP1 does. The clip multiplies each gradient by the same clamped
    coefficient, cast to the gradient's dtype and device first, as FSDP1 does.

    Args:
        root (`FullyShardedDataParallel`): the root FSDP module (``trainer.strategy.model``).
        params (`Sequence[torch.nn.Parameter]`): the module's parameters (flat slices), in the
            order the norms are returned in.

    Raises:
        ConfigError: this torch's FSDP1 does not say which parameters its units hold, or over
            which group (``fsdp1_problems`` refuses such a fit at ``on_fit_start`` already).
    """

    def __init__(self, root: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> None:
        problem = fsdp1_internals_problem(root)
        if problem is None and not getattr(root, "_all_handles", None):  # listed by the first forward
            problem = (
                "this torch's FSDP1 root does not list its units (`_all_handles`) after the first forward"
            )
        if problem is not None:
            raise ConfigError(f"SafeLoopCallback cannot measure this FSDP1 fit: {problem}.")
        self.group = root.process_group
        self.device = getattr(root, "compute_device", None) or params[0].device
        position = {id(p): i for i, p in enumerate(params)}
        seen: set[int] = set()
        sharded: list[int] = []
        whole: list[int] = []
        # `_all_handles`, `uses_sharded_strategy` and `flat_param._params` are torch's FSDP1
        # internals (read in torch 2.13), the order its own clip_grad_norm_ sums in
        for handle in root._all_handles:  # type: ignore[union-attr]
            into = sharded if handle.uses_sharded_strategy else whole
            for param in handle.flat_param._params:
                i = position.get(id(param))
                if i is not None and i not in seen:
                    seen.add(i)
                    into.append(i)
        self.sharded = sharded
        self.whole = whole + [i for i in range(len(params)) if i not in seen]

    def __call__(
        self, params: Sequence[torch.nn.Parameter], *, max_norm: float | None, max_value: float | None
    ) -> GradNorms:
        """Measure the step's gradients, then clip them with that norm.

        Args:
            params (`Sequence[torch.nn.Parameter]`): the parameters given at construction.
            max_norm (`float`, *optional*): max global norm.
            max_value (`float`, *optional*): clamp for every gradient element.

        Returns:
            `GradNorms`: the norms before clipping, on the compute device: the global one (the
            same on every process), and those of this process's slices (0.0 for an empty slice),
            whose squares the log step sums over processes.
        """
        if not self.sharded:  # every unit NO_SHARD: whole gradients, torch's clip (as FSDP1's)
            return measure_and_clip(params, max_norm=max_norm, max_value=max_value)
        zero = torch.zeros((), device=self.device)
        norms = [
            None if p.grad is None else torch.linalg.vector_norm(p.grad.detach(), 2.0, dtype=torch.float32)
            for p in params
        ]
        squared = _norm_of(norms, self.sharded, zero) ** 2.0
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(squared, group=self.group)
        if self.whole:
            squared = squared + _norm_of(norms, self.whole, zero) ** 2.0  # whole on every process
        total = squared ** (1.0 / 2.0)
        if max_norm is not None:
            coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for param in params:
                if param.grad is not None:
                    param.grad.detach().mul_(coefficient.to(param.grad.device, param.grad.dtype))
        if max_value is not None:
            torch.nn.utils.clip_grad_value_(list(params), max_value)
        per_param = torch.stack([zero if n is None else n.to(self.device) for n in norms])
        return GradNorms(total=total, per_param=per_param)


def fsdp1_internals_problem(root: torch.nn.Module) -> str | None:
    """Why this torch's FSDP1 cannot be read as :class:`Fsdp1Norms` reads it, or None.

    Checked at ``on_fit_start``, before FSDP1's lazy init lists the root's units (the first
    forward): each unit's handle must say which parameters it holds and whether it shards them.

    Args:
        root (`FullyShardedDataParallel`): the root FSDP module.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if getattr(root, "process_group", None) is None:
        return "this torch's FSDP1 root does not say over which process group it shards"
    for module in FullyShardedDataParallel.fsdp_modules(root):
        handle = getattr(module, "_handle", None)
        if handle is None:  # a unit that holds no parameters of its own
            continue
        flat = getattr(handle, "flat_param", None)
        if (
            flat is None
            or getattr(flat, "_params", None) is None
            or not hasattr(handle, "uses_sharded_strategy")
        ):
            return "this torch's FSDP1 units do not say which parameters they hold (`flat_param._params`)"
    return None


def _norm_of(norms: list[torch.Tensor | None], indices: list[int], zero: torch.Tensor) -> torch.Tensor:
    """The float32 norm of the gradients at ``indices`` seen as one vector (``zero`` without any)."""
    present = [norms[i] for i in indices if norms[i] is not None]
    if not present:
        return zero
    return torch.linalg.vector_norm(torch.stack(present), 2.0, dtype=torch.float32).to(zero.device)  # type: ignore[arg-type]
