"""Checks made once, on the gradients of the first optimizer step, before its update.

They share the first forward/backward pass with training (no extra pass) and may read tensors on
the host: they run once per ``fit``.
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from safeloop.config import TrainerConfig
from safeloop.diagnostics.sharded import unwrapped_name
from safeloop.findings import Reporter
from safeloop.guards.flat_slices import FlatSlices, flat_slices
from safeloop.guards.reinit import ZeroParam, find_zero_params, reinit_
from safeloop.results import Event, Finding
from safeloop.zero import ZeroEngine

__all__ = ["check_zero_params", "run_preflight"]

logger = logging.getLogger("safeloop")

_METHOD_NAMES = {"xavier": "Xavier uniform", "normal": "a normal distribution"}
try:
    from torch.distributed.fsdp import FlatParameter

    _FLAT: tuple[type, ...] = (FlatParameter,)
except ImportError:  # a torch built without distributed support has no FSDP1
    _FLAT = ()


def check_zero_params(
    model: torch.nn.Module,
    *,
    method: str | None,
    std: float,
    scope: str,
    seed: int,
    partitions: ZeroEngine | FlatSlices | None = None,
    reached: set[str] | None = None,
) -> tuple[list[Event], list[Finding], set[str]]:
    """Find all-zero parameters, re-initialise the stuck ones, and describe what was done.

    Args:
        model (`torch.nn.Module`): the unwrapped model, gradients of the first step in place.
        method (`str`, *optional*): ``"xavier"``, ``"normal"``, or None to report only.
        std (`float`): standard deviation for ``"normal"`` (and for 1-D tensors under ``"all"``).
        scope (`str`): ``"weights"`` (2-D and more) or ``"all"`` (stuck 1-D tensors too).
        seed (`int`): seeds the generator, the same on every process.
        partitions (`ZeroEngine | FlatSlices`, *optional*): under DeepSpeed ZeRO and FSDP1 the
            weights and gradients are read from, and written to, this process's partitions
            (ZeRO's) or flat slices (FSDP1's).
        reached (`set[str]`, *optional*): ZeRO: the parameters the first backward reached.

    Returns:
        `tuple[list[Event], list[Finding], set[str]]`: a ``"reinit"`` event per re-initialised
        parameter, a ``zero-params`` finding per zero weight worth knowing about, and the names
        of the parameters left at zero.
    """
    generator = torch.Generator().manual_seed(seed)
    # FSDP1's auto-wrapped submodules add `_fsdp_wrapped_module.` to the names: said without it
    params = {unwrapped_name(name): param for name, param in model.named_parameters()}
    events: list[Event] = []
    findings: list[Finding] = []
    left_zero: set[str] = set()
    partitioned = partitions is not None and partitions.partitioned
    found = (
        partitions.find_zero_params(list(params.items()), reached)  # type: ignore[union-attr]
        if partitioned
        else find_zero_params(params.items())
    )
    for zero in found:
        reinit = method is not None and zero.reinit_wanted(scope)
        if reinit:
            draw = partitions.reinit_ if partitioned else reinit_  # type: ignore[union-attr]
            draw(params[zero.name], method, std=std, generator=generator)  # type: ignore[arg-type]
            detail = {"param": zero.name, "shape": list(zero.shape), "method": method}
            if method == "normal" or not zero.is_weight:
                detail["std"] = std
            events.append(Event("reinit", 0, detail))
        else:
            left_zero.add(zero.name)
        finding = _finding(zero, reinit=reinit, method=method, scope=scope)
        if finding is not None:
            findings.append(finding)
    return events, findings, left_zero


def _finding(zero: ZeroParam, *, reinit: bool, method: str | None, scope: str) -> Finding | None:
    shape = tuple(zero.shape)
    if not zero.stuck:
        if not zero.is_weight:
            return None  # a zero bias or norm shift that receives gradient: the usual init
        return Finding(
            code="zero-params",
            severity="info",
            message=(
                f"`{zero.name}` {shape} starts all zeros but receives gradient (norm "
                f"{zero.grad_norm:.3g}): a deliberate zero init (LoRA `B`, zero-init residual "
                "output, adaLN-Zero) that learns. Left as it is."
            ),
            params=(zero.name,),
            step=0,
            suggestion="Nothing to change if the zero init is intended.",
        )
    if not zero.is_weight and not reinit:
        return Finding(
            code="zero-params",
            severity="info",
            message=(
                f"`{zero.name}` {shape} is all zeros and got an all-zero gradient on the first "
                f"batch; 1-D tensors are left alone (`reinit_scope={scope!r}`)."
            ),
            params=(zero.name,),
            step=0,
            suggestion=(
                'It usually belongs to a layer that is stuck; `reinit_scope="all"` re-initialises it too.'
            ),
        )
    if reinit:
        done = f"Re-initialised with {_METHOD_NAMES[method]} before the first update."  # type: ignore[index]
        suggestion = (
            f"Initialise `{zero.name}` yourself (e.g. `nn.init.xavier_uniform_`); safeloop did it "
            "for this run."
        )
    else:
        done = "Not re-initialised (`reinit_zero_params=None`): it will stay at zero."
        suggestion = f'Initialise `{zero.name}`, or pass `reinit_zero_params="xavier"`.'
    return Finding(
        code="zero-params",
        severity="warning",
        message=(
            f"`{zero.name}` {shape} is all zeros and its gradient on the first batch is all zeros "
            f"too: it cannot learn. {done}"
        ),
        params=(zero.name,),
        step=0,
        suggestion=suggestion,
    )


def run_preflight(
    model: torch.nn.Module,
    accelerator: Accelerator,
    config: TrainerConfig,
    reporter: Reporter,
    *,
    zero_engine: ZeroEngine | None = None,
    reached: set[str] | None = None,
    prepared: torch.nn.Module | None = None,
) -> set[str] | None:
    """The checks on the first step's gradients, before its update (once per run).

    Args:
        model (`torch.nn.Module`): the unwrapped model, gradients of the first step in place.
        accelerator (`Accelerator`): the run's processes.
        config (`TrainerConfig`): ``reinit_zero_params``, ``reinit_std``, ``reinit_scope``, ``seed``.
        reporter (`Reporter`): ``"reinit"`` events and ``zero-params`` findings.
        zero_engine (`ZeroEngine`, *optional*): DeepSpeed ZeRO's partitions.
        reached (`set[str]`, *optional*): ZeRO: the parameters the first backward reached.
        prepared (`torch.nn.Module`, *optional*): the prepared model; FSDP1 needs it (its
            ``FlatParameter`` s say where each parameter's slice sits).

    Returns:
        `set[str] | None`: the parameters left at zero; None when the check cannot run here.
    """
    fsdp = _fsdp_slices(accelerator, model, prepared)
    if isinstance(fsdp, str):
        if accelerator.is_main_process:
            logger.info("safeloop: the all-zero weight check is off: %s", fsdp)
        return None
    partitions: ZeroEngine | FlatSlices | None = zero_engine if fsdp is None else fsdp
    events, findings, left_zero = check_zero_params(
        model,
        method=config.reinit_zero_params,
        std=config.reinit_std,
        scope=config.reinit_scope,
        # the same seed on every rank: re-initialised weights agree without a broadcast
        seed=0 if config.seed is None else config.seed,
        partitions=partitions,
        reached=reached,
    )
    for event in events:
        reporter.event(event)
    reporter.add_all(findings)
    return left_zero


def _fsdp_slices(
    accelerator: Accelerator, model: torch.nn.Module, prepared: torch.nn.Module | None
) -> FlatSlices | str | None:
    """FSDP1's slices to run the all-zero weight check through, or why it cannot run.

    Returns:
        `FlatSlices | str | None`: FSDP1 with the module's own parameters: their slices; a
        sentence when the check cannot run; None where the parameters are read themselves
        (unsharded, FSDP2's DTensors, DeepSpeed through its engine).
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without distributed support has no FSDP
        DTensor = None
    params = list(model.parameters())
    dtensors = 0 if DTensor is None else sum(isinstance(p, DTensor) for p in params)
    if dtensors == len(params):
        return None
    if dtensors:
        return "under FSDP2 some parameters are DTensor shards and some are not (not `fully_shard`-ed)."
    if any(isinstance(p, _FLAT) for p in params):
        # a FlatParameter holds many parameters: its zeros name none of them
        return (
            "under FSDP1 with `use_orig_params=False` the parameters are FlatParameters; "
            "`use_orig_params=True` or FSDP2 (`fsdp_version=2`) has it."
        )
    if prepared is None:
        return "under FSDP1 the prepared model, whose FlatParameters place the slices, was not given."
    slices = flat_slices(prepared, params)  # flat slices of the module's own parameters
    return slices if isinstance(slices, FlatSlices) else f"under FSDP1 {slices}."
