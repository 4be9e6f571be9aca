"""FSDP1's flat slices: which part of each whole parameter this process holds, and the zero check on them.

FSDP1 with ``use_orig_params=True`` keeps the module's parameter objects, but each is a 1-D view
of this process's slice of the parameter: elements ``start .. start + numel`` of the whole
parameter flattened (possibly none), inside the ``FlatParameter`` of its FSDP unit. Its
``.grad`` after the reduce-scatter is the same slice of the reduced gradient (None where the
slice is empty). The slices of one parameter over the processes of the unit's shard group
partition it; under ``NO_SHARD`` every process holds it whole.

So the all-zero weight check of ``guards/reinit.py`` runs on slices as it runs on FSDP2's DTensor
shards: a parameter is all zero only if every slice is (one all-reduce over the shard group, for
all parameters at once, once per fit), and a re-initialised one is drawn whole on every process
from the same seed, each keeping its own elements: the gathered parameter is the one an
unsharded run draws.

Where each parameter sits is read from FSDP1's ``FlatParameter`` s (``_params``, ``_shapes``,
``_shard_param_infos``: private to torch's FSDP1, as read in torch 2.13); anything unexpected
turns the check off with the reason, never misplaces a value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from safeloop.guards.reinit import ZeroParam, initial_values

try:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    from torch.distributed.fsdp import ShardingStrategy
except ImportError:  # a torch built without distributed support has no FSDP1
    FSDP1 = ShardingStrategy = None  # type: ignore[assignment,misc]

__all__ = ["Fsdp1Unit", "FlatSlices", "fsdp1_units", "flat_slices"]


@dataclass(frozen=True)
class Fsdp1Unit:
    """One FSDP1 unit's ``FlatParameter``: the original parameters it holds, and how.

    Attributes:
        params (`tuple[torch.nn.Parameter, ...]`): the module's parameter objects it holds.
        shapes (`tuple[torch.Size, ...]`): each one's whole shape.
        starts (`tuple[int, ...]`): the first element of each (flattened) this process holds;
            0 where its slice is empty.
        sharded (`bool`): the unit shards its parameters (not ``NO_SHARD``).
        group (`Any`): the process group the unit shards over.
    """

    params: tuple[torch.nn.Parameter, ...]
    shapes: tuple[torch.Size, ...]
    starts: tuple[int, ...]
    sharded: bool
    group: Any


def fsdp1_units(model: torch.nn.Module) -> list[Fsdp1Unit] | None:
    """The units of an FSDP1 model that hold parameters; None when this torch's FSDP1 does not say.

    Args:
        model (`torch.nn.Module`): the prepared model (the root FSDP module).
    """
    if FSDP1 is None:
        return None
    units = []
    for module in FSDP1.fsdp_modules(model):
        flat = getattr(module, "_flat_param", None)
        if flat is None:  # an FSDP module that manages no parameters of its own
            continue
        originals, shapes = getattr(flat, "_params", None), getattr(flat, "_shapes", None)
        infos = getattr(flat, "_shard_param_infos", None)
        strategy = getattr(module, "sharding_strategy", None)
        if originals is None or shapes is None or infos is None or strategy is None:
            return None
        if not len(originals) == len(shapes) == len(infos):
            return None
        starts = []
        for info in infos:
            start = getattr(info, "intra_param_start_idx", None) if getattr(info, "in_shard", False) else 0
            if not isinstance(start, int):
                return None
            starts.append(start)
        units.append(
            Fsdp1Unit(
                params=tuple(originals),
                shapes=tuple(torch.Size(s) for s in shapes),
                starts=tuple(starts),
                sharded=strategy != ShardingStrategy.NO_SHARD,
                group=getattr(module, "process_group", None),
            )
        )
    return units


@dataclass(frozen=True)
class _Slice:
    shape: torch.Size  # the whole parameter's
    start: int  # its first element this process holds (flattened)


class FlatSlices:
    """The all-zero weight check of ``guards/reinit.py`` on FSDP1's flat slices.

    Built by :func:`flat_slices`. Every process must call :meth:`find_zero_params` with the same
    parameters in the same order (a collective).

    Attributes:
        partitioned (`bool`): always True: ``preflight.check_zero_params`` reads slices through it.
    """

    partitioned = True

    def __init__(
        self, slices: dict[int, _Slice], *, sharded: bool, group: Any, device: torch.device | None = None
    ) -> None:
        self._slices = slices
        self._sharded = sharded
        self._group = group
        self._device = device  # the collective's (with CPU offload the slices are on the CPU)

    def find_zero_params(
        self, named_params: Sequence[tuple[str, torch.nn.Parameter]], reached: set[str] | None = None
    ) -> list[ZeroParam]:
        """``guards.reinit.find_zero_params`` from this process's slices (one all-reduce).

        Args:
            named_params (`Sequence[tuple[str, Parameter]]`): the module's parameters.
            reached (`set[str]`, *optional*): unused (FSDP1 sets ``.grad`` where a slice has one).

        Returns:
            `list[ZeroParam]`: in parameter order, with whole shapes; parameters that got no
            gradient on any process are left out, as without sharding.
        """
        del reached
        candidates = [
            (name, param)
            for name, param in named_params
            if param.requires_grad and id(param) in self._slices and self._slices[id(param)].shape.numel() > 0
        ]
        if not candidates:
            return []
        device = self._device or candidates[0][1].device
        # per parameter: this slice holds a nonzero value, its gradient's squares, it has a gradient
        # (an empty slice counts as zero, with no gradient: another process holds the elements)
        stats = torch.stack(
            [
                torch.stack(
                    [
                        param.detach().any().float().to(device),
                        torch.zeros((), device=device)
                        if param.grad is None
                        else param.grad.detach().float().square().sum().to(device),
                        torch.tensor(float(param.grad is not None and param.numel() > 0), device=device),
                    ]
                )
                for _, param in candidates
            ],
            dim=1,
        )
        if self._sharded and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats, group=self._group)  # once per fit
        nonzero, squares, graded = stats.tolist()  # host read, once per fit
        return [
            ZeroParam(
                name,
                tuple(self._slices[id(param)].shape),
                stuck=squares[i] == 0.0,
                grad_norm=squares[i] ** 0.5,
            )
            for i, (name, param) in enumerate(candidates)
            if nonzero[i] == 0.0 and graded[i] > 0
        ]

    def reinit_(
        self, param: torch.nn.Parameter, method: str, *, std: float, generator: torch.Generator
    ) -> None:
        """``guards.reinit.reinit_`` on a slice: each process draws the whole tensor, keeps its elements."""
        place = self._slices[id(param)]
        values = initial_values(place.shape, method, std=std, generator=generator)
        part = values.reshape(-1)[place.start : place.start + param.numel()]
        with torch.no_grad():
            param.view(-1).copy_(part.to(device=param.device, dtype=param.dtype))


def flat_slices(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> FlatSlices | str:
    """The slices of ``params`` in the FSDP1 model ``model``, or why they cannot be read.

    Args:
        model (`torch.nn.Module`): the prepared model (the root FSDP module).
        params (`Sequence[torch.nn.Parameter]`): the module's trainable parameters.

    Returns:
        `FlatSlices | str`: the slices, or the reason (a sentence's end) the check is off.
    """
    units = fsdp1_units(model)
    if units is None:
        return "this torch's FSDP1 does not say which parameters its FlatParameters hold"
    slices: dict[int, _Slice] = {}
    for unit in units:
        for param, shape, start in zip(unit.params, unit.shapes, unit.starts, strict=True):
            if start + param.numel() > shape.numel():
                return "FSDP1's recorded shapes do not fit its parameters' slices"
            slices[id(param)] = _Slice(shape, start)
    missing = [p for p in params if p.requires_grad and id(p) not in slices]
    if missing:
        return (
            f"{len(missing)} trainable parameters are outside FSDP1's FlatParameters (`ignored_modules`), "
            "so their gradients are not reduced over processes"
        )
    if len({unit.sharded for unit in units}) > 1:
        return "some FSDP1 units shard their parameters and some (`NO_SHARD`) do not"
    sharded = bool(units) and units[0].sharded
    device = getattr(model, "compute_device", None)  # FSDP1's: where its own collectives run
    return FlatSlices(slices, sharded=sharded, group=units[0].group if units else None, device=device)
