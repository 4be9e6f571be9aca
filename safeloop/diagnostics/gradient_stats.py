"""Per-parameter gradient norms and update sizes, measured on the device for ``TrainingMonitor``.

Per optimizer step ``record`` adds the step's per-parameter gradient norms to a running sum on the
device (two small kernels, no host read). On log steps only, ``before_update`` and
``after_update`` measure each weight's update ``||dw||`` around ``optimizer.step()``;
``measurements`` returns one device vector that the trainer reads in its single transfer, and
``decode`` turns its host values into one interval's ``GradientWindow``. Judging those values is
``training.py``'s work. Nothing here changes the model.

Sharded parameters (FSDP2, or FSDP1 with ``use_orig_params=True``: ``shard_count``): each process
holds a shard of every parameter and of its reduce-scattered gradient (under FSDP1 a flat slice,
whose whole shape comes in ``shapes``), so it measures squared norms of its shards. It keeps one such
row per step of the interval on the device (the square root of a sum over processes cannot be
taken before the sum), and the trainer's one all-reduce of the log step sums the rows over
processes (a mean, multiplied back here): no collective of its own, no per-step host read. The
interval's gradient norm is then the mean of the step norms, as without sharding, so a sharded
run reports the same values and findings as an unsharded one. See ``sharded.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from safeloop.guards.clipping import squared_norms

__all__ = ["GradientStats", "GradientWindow"]


@dataclass(frozen=True)
class GradientWindow:
    """One log interval's measurements, as host values.

    Attributes:
        grads (`list[float]`): mean gradient norm over the interval, one per parameter.
        norms (`dict[int, float]`): weight norm after the log step's update, by parameter index.
        updates (`dict[int, float]`): ``||dw||`` of the log step's update (NaN when not measured),
            by parameter index.
    """

    grads: list[float]
    norms: dict[int, float]
    updates: dict[int, float]


class GradientStats:
    """Keeps a run's per-parameter gradient norms and update sizes on the device.

    Args:
        named_params (`Iterable[tuple[str, Parameter]]`): the unwrapped model's parameters, in
            ``model.parameters()`` order (the order of ``GradNorms.per_param``).
        sharded (`bool`, *optional*, defaults to False): parameters are flat shards (FSDP1,
            DeepSpeed) that say nothing about one parameter; nothing is measured.
        shard_count (`int`, *optional*): parameters are sharded over this many processes
            (FSDP2's DTensors, FSDP1's flat slices): ``record`` takes the norms of this
            process's gradient shards, ``measurements`` holds squared norms of shards (one row of
            gradient norms per step of the interval), and the values given back to ``decode`` /
            ``tracker_values`` must be their mean over the ``shard_count`` processes (what the
            trainer's metrics all-reduce computes).
        shapes (`Sequence[torch.Size]`, *optional*): the whole shape of each parameter, in
            ``named_params`` order, where a parameter's own shape is that of its local slice
            (FSDP1 with ``use_orig_params=True``, DeepSpeed ZeRO; see ``ShardLayout.shapes``).
        local (`Callable`, *optional*): this process's part of a parameter's weight, where it
            is neither the parameter nor its DTensor's local shard (DeepSpeed ZeRO's fp32 master
            partition, see ``ShardLayout.local``).
        measure_updates (`bool`, *optional*, defaults to True): measure ``||dw||`` on log steps (a
            copy of the weights of 2+ dims lives from ``before_update`` to ``after_update``).

    Attributes:
        names (`list[str]`): parameter names, in ``named_params`` order.
        numels (`list[int]`): element count of each whole parameter.
        trainable (`list[int]`): indices of the parameters that require a gradient and are not empty.
        weights (`list[int]`): indices of the trainable parameters of 2+ dims.

    Raises:
        ValueError: when ``shapes`` does not give one shape per parameter.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        *,
        sharded: bool = False,
        shard_count: int | None = None,
        shapes: Sequence[torch.Size] | None = None,
        local: Callable[[torch.nn.Parameter], torch.Tensor] | None = None,
        measure_updates: bool = True,
    ) -> None:
        named = list(named_params)
        # whole shapes: a DTensor's own, FSDP1's given ones. The same on every process, so every
        # process builds the same vector layout even where its own shard is empty
        self._shard_count = shard_count
        self._local_part = local
        self.names = [name for name, _ in named]
        self._params = [param for _, param in named]
        if shapes is None:
            self.numels, dims = [p.numel() for p in self._params], [p.dim() for p in self._params]
        elif len(shapes) != len(self._params):
            raise ValueError(f"{len(shapes)} shapes for {len(self._params)} parameters")
        else:
            self.numels, dims = [torch.Size(s).numel() for s in shapes], [len(s) for s in shapes]
        self.trainable = [i for i, p in enumerate(self._params) if p.requires_grad and self.numels[i] > 0]
        self.weights = [i for i in self.trainable if dims[i] >= 2]
        self._per_param = not sharded and bool(self.trainable)
        self._measure_updates = measure_updates
        self._rows: list[torch.Tensor] = []  # the interval's per-parameter norms, one row per step
        self._count = 0
        self._snapshot: list[torch.Tensor] | None = None
        self._update: torch.Tensor | None = None
        self._pending: int | None = None  # steps summed in the vector last handed out

    def record(self, per_param: torch.Tensor | None) -> None:
        """Add one optimizer step's gradient norms to the interval's measurements, on the device.

        Args:
            per_param (`torch.Tensor | None`): ``GradNorms.per_param`` (norms of this process's
                shards with ``shard_count``); None where per-parameter norms are not available.
        """
        if per_param is None or not self._per_param:
            return
        if per_param.numel() != len(self._params):  # not the parameters given: degrade, never misname
            self._per_param, self._rows = False, []
            return
        # kept as they are, one device vector per step: the log step cleans and sums them in three
        # ops for the whole interval instead of two ops every step
        self._rows.append(per_param)
        self._count += 1

    def clear(self) -> None:
        """Drop the interval's unread measurements (its steps were undone by a rollback)."""
        self._count, self._snapshot, self._update = 0, None, None
        self._rows = []

    def before_update(self) -> None:
        """Copy the weights of 2+ dims before ``optimizer.step()`` (log steps only)."""
        if self._measure_updates and self._per_param and self.weights:
            self._snapshot = [self._local(i).clone() for i in self.weights]

    def after_update(self) -> None:
        """Measure ``||dw||`` of each weight from the copy; the copy is freed, weights untouched."""
        if self._snapshot is None:
            return
        with torch.no_grad():
            torch._foreach_sub_(self._snapshot, [self._local(i) for i in self.weights])
            squares = squared_norms(self._snapshot)
        device = self._local(self.weights[0]).device
        self._update = self._root_unless_sharded(torch.stack([s.to(device) for s in squares]))
        self._snapshot = None

    def measurements(self) -> torch.Tensor | None:
        """The device vector to read at a log step, then the interval restarts.

        Layout: summed gradient norm per parameter, norm of each weight of 2+ dims, its last
        ``||dw||`` (NaN when not measured). With ``shard_count``, the first part is one row of
        gradient norms per step of the interval, and every entry is the square of this
        process's shard's norm, to be summed over processes.

        Returns:
            `torch.Tensor | None`: the vector, or None where per-parameter norms are not available.
        """
        count, rows, update = self._count, self._rows, self._update
        self._count, self._rows, self._update = 0, [], None
        if not self._per_param:
            self._pending = None
            return None
        self._pending = count
        device = self._local(self.trainable[0]).device
        nan = float("nan")
        summed = None
        if rows:
            # a skipped step's NaN/Inf norms would poison the whole interval; they count as 0 here
            clean = torch.stack(rows).float().nan_to_num_(0.0, 0.0, 0.0)
            # sharded: shard norms add up over processes only as squares, and a step's norm is
            # the root of that sum: one row of squares per step, summed by the caller's all-reduce
            summed = (clean * clean).flatten() if self._shard_count is not None else clean.sum(dim=0)
        parts = [
            torch.full((len(self._params),), nan, device=device) if summed is None else summed.to(device)
        ]
        if self.weights:
            with torch.no_grad():
                squares = squared_norms([self._local(i) for i in self.weights])
            parts.append(self._root_unless_sharded(torch.stack([s.to(device) for s in squares])))
            parts.append(torch.full((len(self.weights),), nan, device=device) if update is None else update)
        return torch.cat(parts)

    def _local(self, index: int) -> torch.Tensor:
        """This process's part of a parameter (its shard under FSDP2; FSDP1's is the parameter), detached."""
        if self._local_part is not None:  # DeepSpeed ZeRO: the fp32 master partition
            return self._local_part(self._params[index]).detach()
        param = self._params[index].detach()
        return param.to_local() if hasattr(param, "to_local") else param

    def _root_unless_sharded(self, squares: torch.Tensor) -> torch.Tensor:
        # sharded: squared shard norms, which add up over processes; else the norms themselves
        return squares if self._shard_count is not None else squares.sqrt()

    # -- host side: reading back the values of measurements() -------------------------------

    def decode(self, values: Sequence[float]) -> GradientWindow | None:
        """Turn the host values of the last ``measurements()`` into one interval's window.

        Args:
            values (`Sequence[float]`): host values of ``measurements()`` (with ``shard_count``,
                their mean over processes); empty when it gave None.

        Returns:
            `GradientWindow | None`: the interval's values, or None when nothing was measured
            or the values do not fit the layout.
        """
        n, w, steps = len(self._params), len(self.weights), self._pending
        if not steps:
            return None
        if self._shard_count is not None:
            if len(values) != n * steps + 2 * w:
                return None
            # the values are means over processes of squared shard norms: times the shard count
            # they are squared norms of whole tensors (exact for 2, 4, 8... processes)
            k = self._shard_count
            whole = [v if math.isnan(v) else math.sqrt(max(v, 0.0) * k) for v in values]
            grads = [sum(whole[s * n + i] for s in range(steps)) / steps for i in range(n)]
            values = whole[n * steps :]
        else:
            if len(values) != n + 2 * w:
                return None
            grads = [v / steps for v in values[:n]]
            values = values[n:]
        norms = dict(zip(self.weights, values[:w], strict=True))
        return GradientWindow(grads, norms, dict(zip(self.weights, values[w:], strict=True)))

    @property
    def measures_weight_norms(self) -> bool:
        """Whether the next ``measurements()`` holds the norm of each whole weight (not sharded)."""
        return self._per_param and self._shard_count is None and bool(self.weights)

    def weight_norms(self, values: Sequence[float]) -> dict[str, float] | None:
        """Each weight's norm from the host values of ``measurements()``, by name (not sharded).

        Returns:
            `dict[str, float] | None`: None when the values hold no whole-weight norms.
        """
        n, w = len(self._params), len(self.weights)
        if self._shard_count is not None or not self._pending or len(values) != n + 2 * w:
            return None
        return {self.names[i]: v for i, v in zip(self.weights, values[n : n + w], strict=True)}

    def tracker_values(self, values: Sequence[float]) -> dict[str, float]:
        """Tracker entries for ``accelerator.log``, from the host values of ``measurements()``.

        Args:
            values (`Sequence[float]`): host values of ``measurements()`` (empty when it gave None).

        Returns:
            `dict[str, float]`: ``grad_norm/<name>`` (mean over the interval) for every
            trainable parameter and ``update_ratio/<name>``
            (``||dw|| / ||w||`` of the log step) for every weight of 2+ dims whose update was
            measured; empty without per-parameter values.
        """
        window = self.decode(values)
        if window is None:
            return {}
        out = {f"grad_norm/{self.names[i]}": window.grads[i] for i in self.trainable}
        for i in self.weights:
            norm, update = window.norms[i], window.updates[i]
            if norm > 0 and math.isfinite(update):
                out[f"update_ratio/{self.names[i]}"] = update / norm
        return out
