"""DeepSpeed ZeRO state as whole tensors, in safetensors: a checkpoint that loads at any world size.

DeepSpeed has no engine like ``torch.distributed.checkpoint``. Its public functions
``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` gather a parameter's whole fp32
master weight and whole optimizer moments (ZeRO-1, 2 and 3 alike, byte for byte the same); each
process keeps the tensors it is assigned (balanced by size, the same assignment on every
process) and writes them to its own ``shards/whole-0000R-of-0000W.safetensors``. Because every
tensor is whole, a checkpoint loads at any world size and at any ZeRO stage.

What the public functions do not cover, and the private calls it takes (DeepSpeed 0.19.8):

- Adam's ``step`` (and any other 0-d entry) is one value per flat partition, in the wrapped
  optimizer's ``state``: read and written there.
- A fresh engine has no optimizer state: it is created (zeros, ``step`` 0) before the moments
  are written; at ZeRO-1/2 the per-parameter fragments are then relinked
  (``_lazy_init_hp_params_optimizer_state``).
- ZeRO-3's public setters fail for a parameter whose size is not a multiple of the world size:
  its partition is written here (``_get_fp32_opt_state_partition``, ``_get_param_partition_rank``).
- The fp32 master weights reach the weights the model computes with only through
  ``update_lp_params`` (ZeRO-1/2) or ZeRO-3's repartition sequence (``_partition_all_parameters``,
  ``_reassign_or_swap_out_partitioned_parameters``, ``checkpoint_event_epilogue``).

Every private call is checked for at construction (:func:`zero_checkpoint_problem`); a DeepSpeed
without them gets a ``ConfigError`` naming the missing call, not a wrong restore.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from safeloop.checkpoint.sharded import MODEL_PREFIX, ShardSnapshot
from safeloop.checkpoint.whole_shards import WholeShardFiles, assign_owners, write_share
from safeloop.errors import CheckpointError

__all__ = ["WHOLE_LAYOUT", "ZeroState", "zero_checkpoint_problem"]

WHOLE_LAYOUT = "whole"  # shard_info's "layout" of these checkpoints (DCP's own: "dcp")
_STATE = "optim.state."
_PRIVATE = {
    1: (
        "single_partition_of_fp32_groups", "bit16_groups", "update_lp_params",
        "_lazy_init_hp_params_optimizer_state",
    ),
    3: (
        "fp32_partitioned_groups_flat", "fp16_groups", "_get_fp32_opt_state_partition",
        "_get_param_partition_rank", "_partition_all_parameters",
        "_reassign_or_swap_out_partitioned_parameters", "checkpoint_event_epilogue",
    ),
}  # fmt: skip
_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
_SCALER = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def zero_checkpoint_problem(engine: torch.nn.Module) -> str | None:
    """Why safeloop cannot checkpoint this DeepSpeed engine, or None when it can."""
    stage = int(engine.zero_optimization_stage())  # type: ignore[operator]
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return "the DeepSpeed engine has no optimizer"
    if stage == 0:
        if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "loss_scaler"):
            return None
        return (
            f"ZeRO stage 0 with mixed precision wraps the optimizer in {type(optimizer).__name__}, "
            "whose state safeloop does not read; use ZeRO stage 1, 2 or 3"
        )
    missing = [name for name in _PRIVATE[3 if stage == 3 else 1] if not hasattr(optimizer, name)]
    if missing:
        try:
            version = importlib.metadata.version("deepspeed")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown version"
        return (
            f"this DeepSpeed ({version}) lacks {', '.join(missing)}, which restoring "
            f"ZeRO-{stage} state needs (checked with 0.19.8); install deepspeed 0.19.x"
        )
    return None


class ZeroState:
    """The whole model and optimizer state of a DeepSpeed engine, written and read as safetensors.

    Every method is a collective: all processes call it together, in the same order.

    Args:
        engine (`torch.nn.Module`): the ``deepspeed.DeepSpeedEngine`` that ``prepare`` returned.
        module (`torch.nn.Module`): the unwrapped model.
        accelerator_rank (`int`): this process's index; ``world`` the number of processes.
        world (`int`): the number of processes.
    """

    def __init__(
        self, engine: torch.nn.Module, module: torch.nn.Module, accelerator_rank: int, world: int
    ) -> None:
        self.engine = engine
        self.module = module
        self.rank = accelerator_rank
        self.world = world
        self.stage = int(engine.zero_optimization_stage())  # type: ignore[operator]
        self.zero = engine.optimizer
        self.base: torch.optim.Optimizer = self.zero if self.stage == 0 else self.zero.optimizer  # type: ignore[assignment]
        self._empty_device = next((p.device for p in module.parameters()), torch.device("cpu"))

    # -- what the engine holds ---------------------------------------------------------------

    def _names(self) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
        """The model's entries (parameters and persistent buffers), each once, and tied aliases."""
        entries, aliases, seen = [], {}, {}
        for name, value in self.module.state_dict(keep_vars=True).items():
            if id(value) in seen:
                aliases[name] = seen[id(value)]
                continue
            seen[id(value)] = name
            entries.append((name, value))
        return entries, aliases

    def _flats(self) -> list[torch.Tensor]:
        """The tensors the wrapped optimizer steps (flat fp32 partitions; parameters at stage 0)."""
        if self.stage == 0:
            return [p for group in self.base.param_groups for p in group["params"]]
        if self.stage == 3:
            return list(self.zero.fp32_partitioned_groups_flat)
        return list(self.zero.single_partition_of_fp32_groups)

    def _trained(self, value: torch.Tensor) -> bool:
        """Whether the optimizer holds an fp32 master copy of this model entry."""
        if not isinstance(value, torch.nn.Parameter) or not value.requires_grad:
            return False
        if self.stage in (1, 2):  # set on every process (None where its partition holds none of it)
            return hasattr(value, "_hp_mapping")
        return True

    def _moment_keys(self) -> tuple[list[str], list[str]]:
        """The optimizer's per-element state names (moments) and its 0-d ones (``step``)."""
        moments: list[str] = []
        scalars: list[str] = []
        for flat in self._flats():
            for key, value in self.base.state.get(flat, {}).items():
                target = (
                    moments
                    if torch.is_tensor(value) and value.numel() == flat.numel() and value.dim()
                    else scalars
                )
                if key not in target:
                    target.append(key)
        return moments, scalars

    # -- capture and write -------------------------------------------------------------------

    def capture(self) -> ShardSnapshot:
        """This process's share of the whole tensors, the non-tensor values, every tensor's shape."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        entries, aliases = self._names()
        fresh = not any(self.base.state.get(flat) for flat in self._flats())
        moments, scalars = ([], []) if fresh else self._moment_keys()
        if moments:
            self._link_fragments()
        sizes = []  # (name, numel) of every tensor, in the order every process takes them
        for name, value in entries:
            numel = int(getattr(value, "ds_numel", value.numel()))
            sizes.append((MODEL_PREFIX + name, numel))
            if self._trained(value):
                sizes.extend((f"{_STATE}{name}.{key}", numel) for key in moments)
        owner = assign_owners(sizes, self.world)
        tensors: dict[str, torch.Tensor] = {}
        shapes: dict[str, list[int]] = {}
        for name, value in entries:
            shape = list(getattr(value, "ds_shape", value.shape))
            trained = self._trained(value)
            whole = safe_get_full_fp32_param(value) if trained and self.stage else None
            if whole is None:
                whole = self._module_value(value)
            self._keep(tensors, shapes, MODEL_PREFIX + name, whole, shape, owner)
            for key in moments if trained else []:
                if self.stage:
                    moment = safe_get_full_optimizer_state(value, key)
                else:  # a parameter never stepped (no gradient yet) has no state: zeros, never read
                    moment = self.base.state.get(value, {}).get(key)
                    moment = torch.zeros_like(value) if moment is None else moment
                self._keep(tensors, shapes, f"{_STATE}{name}.{key}", moment, shape, owner)
        values = {
            "stage": self.stage,
            "optimizer": type(self.base).__name__,
            "aliases": aliases,
            "moments": moments,
            "flat_scalars": [
                {
                    key: _scalar(self.base.state[flat][key])
                    for key in scalars
                    if key in self.base.state.get(flat, {})
                }
                for flat in self._flats()
            ],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.base.param_groups],
            "engine": {key: getattr(self.engine, key) for key in _COUNTERS if hasattr(self.engine, key)},
            "loss_scaler": _scaler_state(getattr(self.zero, "loss_scaler", None)),
        }
        return ShardSnapshot(tensors, values, shapes, fresh)

    def _module_value(self, value: torch.Tensor) -> torch.Tensor:
        """A model entry the optimizer does not hold: the module's own (gathered under ZeRO-3)."""
        with self._gathered(value):
            return value.detach().clone()

    def _keep(
        self,
        tensors: dict[str, torch.Tensor],
        shapes: dict[str, list[int]],
        name: str,
        value: torch.Tensor,
        shape: list[int],
        owner: dict[str, int],
    ) -> None:
        shapes[name] = shape
        if owner[name] == self.rank:  # the others' tensors are dropped at once: 1/W of the state each
            tensors[name] = value.detach().reshape(shape).to("cpu", copy=True).contiguous()

    def copy_to_host(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` as they are: :meth:`capture` copied each into host memory of its own already."""
        return tensors

    def write(self, tensors: dict[str, torch.Tensor], folder: Path, group: Any = None) -> None:
        """Write this process's tensors into ``folder`` as one safetensors file, fsynced.

        No collective (``group`` is not used): each process writes its own file; the files are
        hashed from disk for the manifest.
        """
        write_share(tensors, folder, self.rank, self.world)

    # -- load --------------------------------------------------------------------------------

    def load(self, folder: Path, values: dict[str, Any], fresh: bool = False) -> None:
        """Read the whole tensors of ``folder`` into the engine (a collective).

        Args:
            folder (`Path`): the checkpoint's ``shards`` folder, verified against its manifest.
            values (`dict`): the non-tensor values saved with it.
            fresh (`bool`, *optional*, defaults to False): the optimizer had no state when it
                was saved: it has none after loading either.

        Raises:
            CheckpointError: a tensor is missing or has another shape than this model's.
        """
        with WholeShardFiles(folder) as files:
            self._load(files, values, fresh)

    def _load(self, files: WholeShardFiles, values: dict[str, Any], fresh: bool) -> None:
        saved, live = values.get("optimizer"), type(self.base).__name__
        if saved is not None and saved != live:
            raise CheckpointError(
                f"{files.folder.parent} holds {saved} optimizer state; this run's optimizer is {live}. "
                f"Resume with {saved}, or start afresh from the weights (`safeloop consolidate`)."
            )
        entries, _ = self._names()
        moments = [] if fresh else list(values.get("moments", []))
        if fresh:
            self._clear_optimizer_state()
        else:
            self._ensure_optimizer_state(moments)
        for name, value in entries:
            shape = torch.Size(getattr(value, "ds_shape", value.shape))
            trained = self._trained(value)
            whole = files.get(MODEL_PREFIX + name, shape)
            if trained:
                self._set_whole(value, whole, None)
            else:
                self._set_module_value(value, whole)
            for key in moments if trained else []:
                self._set_whole(value, files.get(f"{_STATE}{name}.{key}", shape), key)
        if not fresh:
            self._set_scalars(values.get("flat_scalars", []))
        for group, saved in zip(self.base.param_groups, values.get("param_groups", []), strict=False):
            group.update({k: v for k, v in saved.items() if k in group})
        self._propagate()
        for key, count in values.get("engine", {}).items():
            if hasattr(self.engine, key):
                setattr(self.engine, key, count)
        scaler = getattr(self.zero, "loss_scaler", None)
        for key, value in (values.get("loss_scaler") or {}).items():
            current = getattr(scaler, key, None)
            if torch.is_tensor(current):
                current.fill_(value)
            elif scaler is not None and hasattr(scaler, key):
                setattr(scaler, key, value)

    def _set_whole(self, param: torch.nn.Parameter, whole: torch.Tensor, key: str | None) -> None:
        """Write this process's part of a whole fp32 weight (``key`` None) or moment."""
        if self.stage == 0:
            target = param.data if key is None else self.base.state[param][key]
            target.copy_(whole.to(target.device, target.dtype))
        elif self.stage == 3:
            # the public setter narrows past the end of a padded last partition: written here
            part, _ = self.zero._get_fp32_opt_state_partition(
                param, release_swap_buffers=False, optim_state_key=key
            )
            start = part.numel() * self.zero._get_param_partition_rank(param)
            flat = whole.reshape(-1).to(part.device, part.dtype)
            count = max(0, min(part.numel(), flat.numel() - start))
            if count:
                part.data.narrow(0, 0, count).copy_(flat.narrow(0, start, count))
        else:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            if key is None:
                safe_set_full_fp32_param(param, whole.to(self._empty_device))
            else:
                safe_set_full_optimizer_state(param, whole.to(self._empty_device), key)

    def _set_module_value(self, value: torch.Tensor, whole: torch.Tensor) -> None:
        with self._gathered(value, modify=True), torch.no_grad():
            value.data.copy_(whole.reshape(value.shape).to(value.device, value.dtype))

    @contextlib.contextmanager
    def _gathered(self, value: torch.Tensor, modify: bool = False) -> Iterator[None]:
        """ZeRO-3: the whole parameter inside (written back from process 0's when ``modify``)."""
        if self.stage == 3 and hasattr(value, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([value], modifier_rank=0 if modify else None):
                yield
        else:
            yield

    def _ensure_optimizer_state(self, moments: list[str]) -> None:
        """Give a fresh engine's optimizer the state that the moments are written into."""
        for flat in self._flats():
            state = self.base.state[flat]
            if not state:
                state["step"] = torch.tensor(0.0)
            for key in moments:
                if key not in state:
                    state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        self._link_fragments()

    def _link_fragments(self) -> None:
        """ZeRO-1/2: point each parameter's fragment at the optimizer state there is now.

        A fresh engine links to none, and DeepSpeed's own ``load_checkpoint`` leaves them unlinked
        until its next step: ``safe_*_optimizer_state`` would then fail on one process only.
        """
        if self.stage in (1, 2):
            self.zero._hp_optimizer_states_linked = False
            self.zero._lazy_init_hp_params_optimizer_state()

    def _clear_optimizer_state(self) -> None:
        """Make the optimizer fresh again (a checkpoint of step 0): its next step starts its state."""
        for flat in self._flats():
            self.base.state.pop(flat, None)
        if self.stage in (1, 2):  # relinked after the next step, as on a fresh engine
            self.zero._hp_optimizer_states_linked = False

    def _set_scalars(self, saved: list[dict[str, Any]]) -> None:
        """``step`` and other 0-d entries, per flat partition (their number may differ between runs)."""
        flats = self._flats()
        if len(saved) != len(flats):
            distinct = {repr(entry) for entry in saved}
            if len(distinct) != 1:
                raise CheckpointError(
                    f"the checkpoint's optimizer has {len(saved)} flat partitions with different "
                    f"step counts; this run has {len(flats)}: they cannot be matched"
                )
            saved = saved[:1] * len(flats)
        for flat, entry in zip(flats, saved, strict=True):
            state = self.base.state[flat]
            for key, (value, dtype) in entry.items():
                state[key] = value if dtype is None else torch.tensor(value, dtype=getattr(torch, dtype))

    def _propagate(self) -> None:
        """Copy the fp32 master weights into the weights the model computes with."""
        if self.stage in (1, 2):
            self.zero.update_lp_params()
        elif self.stage == 3:
            self.zero._partition_all_parameters()
            for index in range(len(self.zero.fp16_groups)):
                self.zero._reassign_or_swap_out_partitioned_parameters(index)
            self.zero.checkpoint_event_epilogue()


def _scalar(value: Any) -> tuple[Any, str | None]:
    """A 0-d optimizer entry as JSON: its value and its tensor dtype (None: a plain number)."""
    if torch.is_tensor(value):
        return value.item(), str(value.dtype).removeprefix("torch.")
    return value, None


def _scaler_state(scaler: Any) -> dict[str, Any] | None:
    if scaler is None:
        return None
    state = {key: getattr(scaler, key) for key in _SCALER if hasattr(scaler, key)}
    return {key: value.item() if torch.is_tensor(value) else value for key, value in state.items()}
