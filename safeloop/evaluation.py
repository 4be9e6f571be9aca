"""Evaluation: the mean loss of the model over an evaluation dataloader, on every process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from safeloop.batching import batch_size_of
from safeloop.distributed import reduce_across_processes

__all__ = ["evaluate"]


def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader: Any,
    loss_of: Callable[[torch.nn.Module, Any], torch.Tensor],
) -> float:
    """Return the sample-weighted mean loss over ``dataloader`` and all processes.

    The model is put in ``eval()`` mode under ``torch.no_grad`` and back in ``train()`` mode
    afterwards. Sums stay on the device; the one host read happens at the end. With
    Accelerate's default ``even_batches=True`` a process may see a few samples twice at the end
    of an uneven dataset; their losses are then counted twice.

    Args:
        accelerator (`Accelerator`): reduces the sums over processes.
        model (`torch.nn.Module`): the prepared model.
        dataloader (`DataLoader`): the prepared evaluation dataloader.
        loss_of (`Callable`): ``loss_of(model, batch) -> loss`` (the batch conventions).

    Returns:
        `float`: the mean loss, ``nan`` when the dataloader yielded nothing.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    try:
        with torch.no_grad():
            for batch in dataloader:
                size = batch_size_of(batch)
                total += loss_of(model, batch).detach().double() * size
                count += size
    finally:
        model.train(was_training)
    # every process reaches this reduce: each iterates its shard of the same dataloader.
    summed = reduce_across_processes(accelerator, torch.stack([total, count]), "sum")
    total_value, count_value = summed.tolist()  # host sync, once per evaluation
    return total_value / count_value if count_value else float("nan")
