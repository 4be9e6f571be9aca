"""The gradient noise scale under Lightning: ``SafeTrainer``'s probe, fed from the callback's hooks.

``SafeTrainer`` measures ``B_simple`` (docs/diagnostics.md, "batch-size") from squared gradient
norms at two batch sizes, with no extra forward or backward. Under Lightning the same components
(``NoiseScaleProbe``, ``NoiseScaleMonitor``, built by ``Diagnostics``) are fed at the same
moments, from the hooks (:class:`~safeloop.lightning.steps.GuardedSteps` makes the calls):

- each micro-batch's size, at ``on_train_batch_start``;
- with ``Trainer(accumulate_grad_batches=k)``, k > 1: the gradient after the window's first
  micro-batch, at its ``on_after_backward`` (Lightning divides each loss by k before backward, as
  Accelerate does, so ``.grad`` holds ``g_1 / k``; under DDP it is still local, Lightning's
  ``no_sync``), against the window's accumulated gradient;
- under DDP without accumulation: each process's gradient before the all-reduce, read by the
  communication hook ``SafeTrainer`` registers, here on the ``DistributedDataParallel`` module
  Lightning builds before ``on_fit_start`` (no backward has run, so DDP still takes a hook),
  against the reduced gradient. A hook of the user's (``DDPStrategy(ddp_comm_hook=...)``) stays:
  the noise scale is then not measured, said at INFO;
- the step's global gradient norm (unscaled, before clipping) and the guard's flag, at
  ``on_before_optimizer_step``: refused and non-finite steps are left out.

- under FSDP2 (``ModelParallelStrategy``) without accumulation: each process's gradient where
  FSDP2 reduce-scatters it, read by ``SafeTrainer``'s measuring comm on every FSDP module
  (``diagnostics/noise_probe_fsdp.py``), against the step's global norm. With accumulation
  Lightning reduce-scatters every micro-batch (it blocks DDP's sync only), so no process's window
  gradient is ever whole: not measured, said at INFO, as under fp16;
- under FSDP1 (``FSDPStrategy``) a process's own gradient exists only inside FSDP1's reduction,
  and under DeepSpeed inside its engine: not measured, said at INFO.

One process without accumulation has one batch size: not measured, said once at INFO in
Lightning's terms. ``"split"`` (each batch run as two halves) is refused by the settings: the
forward and backward are the ``LightningModule``'s own.
"""

from __future__ import annotations

import dataclasses
import logging

from accelerate.utils import DistributedType

from safeloop.diagnostics.noise_scale import describe_unmeasured
from safeloop.lightning.deepspeed import DEEPSPEED_NOISE
from safeloop.lightning.fsdp import fsdp_noise_refusal
from safeloop.lightning.processes import LightningProcesses
from safeloop.results import Finding

__all__ = ["ONE_BATCH_SIZE", "lightning_batch_advice", "noise_setting"]

logger = logging.getLogger("safeloop")

ONE_BATCH_SIZE = (
    "one process without gradient accumulation has one batch size; `Trainer(accumulate_grad_batches=...)` "
    "> 1 or several DDP processes measure it"
)
# SafeTrainer's batch-size advice names its own keyword; under Lightning the Trainer's takes its place
_SAFETRAINER_WAY = "(`gradient_accumulation_steps` or more processes when memory is short)"
_LIGHTNING_WAY = "(`Trainer(accumulate_grad_batches=...)` or more devices when memory is short)"


def noise_setting(setting: str, processes: LightningProcesses) -> str:
    """The ``gradient_noise_scale`` to build the diagnostics with for this fit.

    ``"auto"`` becomes ``"off"`` where Lightning's set-up leaves one batch size, under FSDP1 and
    DeepSpeed, or
    under FSDP2 with accumulation or fp16, with the reason at INFO on the main process
    (``Diagnostics`` would give it in ``SafeTrainer``'s terms).

    Args:
        setting (`str`): the callback's ``gradient_noise_scale`` (``"auto"`` or ``"off"``).
        processes (`LightningProcesses`): the fit's processes and accumulation.

    Returns:
        `str`: ``"auto"`` or ``"off"``.
    """
    if setting == "auto" and processes.distributed_type == DistributedType.DEEPSPEED:
        if processes.is_main_process:
            logger.info(describe_unmeasured([DEEPSPEED_NOISE]))
        return "off"
    if setting == "auto" and processes.distributed_type == DistributedType.FSDP:
        reason = fsdp_noise_refusal(processes)
        if reason is None:
            return setting  # the diagnostics wrap FSDP2's reduce-scatter (or say why they cannot)
        if processes.is_main_process:
            logger.info(describe_unmeasured([reason]))
        return "off"
    if setting == "auto" and processes.num_processes == 1 and processes.gradient_accumulation_steps == 1:
        if processes.is_main_process:
            logger.info(describe_unmeasured([ONE_BATCH_SIZE]))
        return "off"
    return setting


def lightning_batch_advice(finding: Finding) -> Finding:
    """``finding``, its fix in Lightning's terms when it is the ``batch-size`` advice to raise the batch."""
    if finding.code != "batch-size" or _SAFETRAINER_WAY not in finding.suggestion:
        return finding
    return dataclasses.replace(
        finding, suggestion=finding.suggestion.replace(_SAFETRAINER_WAY, _LIGHTNING_WAY)
    )
