"""A Lightning run's processes, device and loggers, in the shape safeloop's components read.

The guards' and diagnostics' components (``Reporter``, ``Diagnostics``, ``SkipHandler``,
``LogStep``, the collectives of ``distributed.py``) were written against Accelerate's
``Accelerator`` and read a dozen of its attributes: who is the main process, how many there are,
the device, the fp16 scaler, ``reduce``/``gather``, ``log``. Under Lightning those facts belong
to the ``Trainer`` and its strategy; :class:`LightningProcesses` answers the same questions from
them, so the components run unchanged. It holds no state of its own but the world size, read
once (it is fixed for a fit, and the guard asks for it every step).

Values logged through it go to every logger of the ``Trainer`` (``logger.log_metrics``), under
``safeloop/`` so that they never mix with the user's own ``self.log`` keys.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import DistributedType

from safeloop.lightning.deepspeed import is_deepspeed
from safeloop.lightning.fsdp import is_fsdp1, is_fsdp2

__all__ = ["LightningProcesses", "LOG_PREFIX"]

LOG_PREFIX = "safeloop/"


class LightningProcesses:
    """What safeloop's components read of an ``Accelerator``, answered by a Lightning ``Trainer``.

    Args:
        trainer (`lightning.pytorch.Trainer`): the trainer, after its strategy's set-up.
        pl_module (`LightningModule`): the module being fitted (the unwrapped model).

    Attributes:
        sync_gradients (`bool`): always True: the components that read it ask whether the
            gradients of a micro-batch are whole, which only sharded engines make false.
    """

    sync_gradients = True

    def __init__(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        self.trainer = trainer
        self.pl_module = pl_module
        self._world_size = int(trainer.world_size)  # the strategy is set up: fixed for the fit
        # ModelParallelStrategy with fully_shard (DTensor parameters) or FSDPStrategy (flat slices):
        # read as Accelerate's FSDP2 and FSDP1
        self._fsdp = is_fsdp2(trainer.strategy) or is_fsdp1(trainer.strategy)
        self._deepspeed = is_deepspeed(trainer.strategy)  # its engine: partitions, read as Accelerate's

    # -- processes ---------------------------------------------------------------------------

    @property
    def num_processes(self) -> int:
        """How many processes train (``trainer.world_size``)."""
        return self._world_size

    @property
    def process_index(self) -> int:
        """This process's rank among them."""
        return int(self.trainer.global_rank)

    @property
    def is_main_process(self) -> bool:
        """Rank 0, the one that logs."""
        return bool(self.trainer.is_global_zero)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return self.trainer.strategy.root_device

    @property
    def distributed_type(self) -> DistributedType:
        """Accelerate's name for the set-up: ``FSDP``, ``DEEPSPEED``, ``NO`` on one process, else DDP.

        ``FSDP`` for ``ModelParallelStrategy`` (``fully_shard``: DTensor parameters, as Accelerate's
        FSDP2) and ``FSDPStrategy`` (FSDP1's flat slices), ``DEEPSPEED`` for ``DeepSpeedStrategy``:
        the components then read shards or partitions. ``compat.check_trainer_setup`` refuses the rest.
        """
        if self._fsdp:
            return DistributedType.FSDP
        if self._deepspeed:
            return DistributedType.DEEPSPEED
        if self.num_processes == 1:
            return DistributedType.NO
        return DistributedType.MULTI_GPU if self.device.type == "cuda" else DistributedType.MULTI_CPU

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (``Trainer(accumulate_grad_batches=...)``)."""
        return int(self.trainer.accumulate_grad_batches)

    @property
    def mixed_precision(self) -> str:
        """Accelerate's name for the ``Trainer``'s precision: ``"fp16"``, ``"bf16"`` or ``"no"``."""
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            return "fp16"
        return "bf16" if precision.startswith("bf16") else "no"

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 loss scaler of the ``Trainer``'s precision plugin, or None."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The LightningModule, whatever wrapper the strategy put around it (DDP, FSDP1, DeepSpeed)."""
        del model
        return self.pl_module

    # -- collectives: every process calls them, in the same order ---------------------------------

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """``tensor`` reduced over the processes (``"sum"``, ``"mean"``, ``"max"``), as a new tensor."""
        reduced = tensor.clone()
        if self.num_processes > 1:
            op = torch.distributed.ReduceOp.MAX if reduction == "max" else torch.distributed.ReduceOp.SUM
            torch.distributed.all_reduce(reduced, op=op)
            if reduction == "mean":
                reduced = reduced / self.num_processes
        return reduced

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` (same shape on all), concatenated along dim 0 by rank."""
        if self.num_processes == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.num_processes)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts if tensor.dim() else [p.reshape(1) for p in parts])

    def wait_for_everyone(self) -> None:
        """A barrier over the processes."""
        if self.num_processes > 1:
            self.trainer.strategy.barrier("safeloop")

    # -- loggers -----------------------------------------------------------------------------------

    @property
    def trackers(self) -> list[Any]:
        """The ``Trainer``'s loggers (empty with ``logger=False``)."""
        return list(self.trainer.loggers)

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Log ``values`` to every logger of the ``Trainer``, each key under ``safeloop/`` (main process).

        Through ``logger.log_metrics`` rather than ``LightningModule.log``: findings arrive in hooks
        where ``self.log`` is refused (``on_fit_end``) and must not be averaged over an epoch.
        """
        if not self.is_main_process or not values:
            return
        metrics = {f"{LOG_PREFIX}{key}": value for key, value in values.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)
