"""Each process's own gradient under FSDP2, for the gradient noise scale (``batch-size``).

Under FSDP2 (``fully_shard``) no process ever holds its own whole gradient in ``.grad``: the
backward of each FSDP module leaves the local gradient on the module's unsharded parameters,
and FSDP copies it at once into one flat buffer (each gradient padded with zeros to a multiple
of the shard count), hands that buffer to the module's reduce-scatter and keeps only the reduced
shard. Under Accelerate's gradient accumulation (``no_sync``, which calls
``set_requires_gradient_sync(False)``) the sharded ``.grad`` stays None until the window's last
backward: the micro-batches before it accumulate locally, unsharded, and only the last backward
reduce-scatters the window's accumulated local gradient.

The reduce-scatter's input is therefore the one place where a process's own gradient is whole,
and FSDP2 has a public way to reach it: ``FSDPModule.set_custom_reduce_scatter`` swaps the comm
that runs the reduce-scatter. :class:`MeasuredReduceScatter` computes the input's squared norm
(one device kernel, no host read) and then calls the comm it replaced with the same arguments,
so the communication, the buffers and the updates are untouched. Summed over the FSDP modules,
that is the squared norm of this process's gradient over ``micro_batch * accumulation`` samples
(the small batch), against the reduced gradient over all processes (the large one), whose norm
the step measures anyway.

Not measured, with the reason for the INFO line:

- one process: there is no reduce-scatter (FSDP copies the gradient);
- an fp16 reduction: FSDP2 divides the buffer before the comm sees it, by a factor internal to it
  (to keep fp16 sums in range), so its norm is not the gradient's;
- Accelerate's ``sync_each_batch``: every micro-batch reduce-scatters its own gradient;
- a module with several parameter groups (``shard_placement_fn`` on other meshes), where FSDP2
  refuses a custom comm;
- a torch whose FSDP2 lacks the comm API or the private attributes read here.

The comm FSDP2 uses now (its default, one from ``set_allocate_memory_from_process_group_for_comm``
or ``set_symm_mem_for_comm``, or the user's own) is read from private attributes, in
:func:`_comms` only: it must go on doing the communication, and FSDP2 has no public getter.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["MeasuredReduceScatter", "attach_sharded_probe", "fsdp2_modules", "measure_local_gradients"]

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a torch built without distributed support, or before FSDP2
    FSDPModule = None  # type: ignore[assignment,misc]


class MeasuredReduceScatter:
    """An FSDP2 reduce-scatter comm that hands the input's squared norm to a probe first.

    FSDP2 calls ``allocate`` for its buffers and then the comm itself; both go to the comm this
    one replaced, with the same arguments. Duck-typed: torch's ``ReduceScatter`` base class lives
    in a private module, and FSDP2 only calls these two methods.

    Args:
        inner (`Any`): the comm FSDP2 used before (it runs the communication).
        probe (`Any`): the noise-scale probe; its ``add_local(square)`` gets the squared norm.
            Held weakly: a model that outlives its trainer only communicates.
    """

    def __init__(self, inner: Any, probe: Any) -> None:
        self.inner = inner
        self.probe = weakref.ref(probe)

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The comm's buffer, allocated by the comm this one wraps."""
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: Any,
        op: Any,
        async_op: bool = False,
    ) -> Any:
        """The input's squared norm to the probe, then the wrapped comm's reduce-scatter."""
        probe = self.probe()
        if probe is not None:
            if input_tensor.dtype == torch.float16:
                # FSDP2 has divided an fp16 buffer by a factor of its own: leave the step out
                square = torch.full((), math.nan, device=input_tensor.device)
            else:
                # read before the call: an in-place comm may reuse the input; the padding is zeros.
                # On a GPU this runs on FSDP2's reduce-scatter stream after the copy-in, and the
                # end of the backward waits for that stream before the step reads the value
                square = torch.linalg.vector_norm(input_tensor, dtype=torch.float32).square()
            probe.add_local(square)
        return self.inner(
            output_tensor=output_tensor, input_tensor=input_tensor, group=group, op=op, async_op=async_op
        )


def attach_sharded_probe(
    accelerator: Any, prepared: torch.nn.Module, params: Sequence[torch.nn.Parameter], probe: Any
) -> str | None:
    """Wrap the comms of an FSDP or DeepSpeed run so that they feed ``probe``; None, or why not.

    Args:
        accelerator (`Accelerator`): processes, accumulation, mixed precision, the fp16 scaler.
        prepared (`torch.nn.Module`): the prepared model.
        params (`Sequence[torch.nn.Parameter]`): its trainable parameters.
        probe (`Any`): the ``"fsdp"`` mode ``NoiseScaleProbe`` (its ``add_local``); it is the
            caller's, so that this module does not import the one that imports it.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return (
            "DeepSpeed reduces the gradients inside its engine, where no hook sees a process's own "
            "gradient whole; DDP and FSDP2 (`fsdp_version=2`) runs are measured"
        )
    modules = fsdp2_modules(prepared)
    if not modules:
        return (
            "under FSDP1 a process's own gradient exists only inside FSDP's reduction (its "
            "communication hook would replace that reduction, not watch it); FSDP2 "
            "(`fsdp_version=2`) is measured"
        )
    return _refusal(accelerator, params) or measure_local_gradients(modules, probe)


def fsdp2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that ``fully_shard`` made FSDP modules (empty: not FSDP2)."""
    if FSDPModule is None:
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def measure_local_gradients(modules: Sequence[torch.nn.Module], probe: Any) -> str | None:
    """Wrap the reduce-scatter of every FSDP2 module in ``modules``; None, or why it cannot be.

    All or nothing: every module is checked before any comm is replaced.

    Args:
        modules (`Sequence[torch.nn.Module]`): the FSDP2 modules of the prepared model.
        probe (`Any`): the noise-scale probe (``add_local``).
    """
    comms = []
    for module in modules:
        found = _comms(module)
        if isinstance(found, str):
            return found
        if len(found) > 1:
            return (
                f"the FSDP2 module {type(module).__name__} has {len(found)} parameter groups "
                "(`shard_placement_fn` on other meshes), and FSDP2 allows a custom reduce-scatter "
                "only with one"
            )
        comms += [(module, comm) for comm in found]
    for module, comm in comms:
        if isinstance(comm, MeasuredReduceScatter):  # a second trainer on the same model
            comm.probe = weakref.ref(probe)
        else:
            module.set_custom_reduce_scatter(MeasuredReduceScatter(comm, probe))  # type: ignore[operator]
    return None


def _refusal(accelerator: Any, params: Sequence[torch.nn.Parameter]) -> str | None:
    """Why this FSDP2 run's reduce-scatter input is not a process's gradient, or None."""
    if accelerator.num_processes < 2:
        return "FSDP2 on one process has no reduce-scatter: there is only one batch size"
    if not hasattr(FSDPModule, "set_custom_reduce_scatter"):
        return (
            f"this torch ({torch.__version__}) has no `FSDPModule.set_custom_reduce_scatter`, where "
            "safeloop reads each process's gradient under FSDP2; a newer torch has it"
        )
    # `state` and `gradient_state` read with defaults: Lightning's processes (lightning/processes.py)
    # answer the rest of what is read here, not Accelerate's state objects
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    reduce_dtype = getattr(policy, "reduce_dtype", None) or getattr(policy, "param_dtype", None)
    if (
        accelerator.mixed_precision == "fp16"
        or reduce_dtype == torch.float16
        or any(p.dtype == torch.float16 for p in params)
    ):
        return (
            "FSDP2 reduces fp16 gradients divided by a factor of its own before the reduce-scatter, "
            'so a process\'s gradient cannot be read there; bf16 (`mixed_precision="bf16"`) is measured'
        )
    kwargs = getattr(getattr(accelerator, "gradient_state", None), "plugin_kwargs", None) or {}
    if accelerator.gradient_accumulation_steps > 1 and kwargs.get("sync_each_batch", False):
        return (
            "with `sync_each_batch=True` FSDP2 reduce-scatters every micro-batch on its own; "
            "the default (`sync_each_batch=False`) is measured"
        )
    return None


def _comms(module: torch.nn.Module) -> list[Any] | str:
    """The reduce-scatter comm of each parameter group of an FSDP2 module, or why not known.

    The only private attributes read here: ``FSDPModule._get_fsdp_state()``, its
    ``_fsdp_param_groups`` and each group's ``_reduce_scatter_comm`` (as in torch 2.13).
    """
    try:
        groups = module._get_fsdp_state()._fsdp_param_groups  # type: ignore[operator]
        return [group._reduce_scatter_comm for group in groups]
    except AttributeError as error:
        return (
            f"this torch's ({torch.__version__}) FSDP2 does not keep its reduce-scatter comm where "
            f"safeloop looks for it ({error}), so the comm cannot be wrapped without replacing it"
        )
