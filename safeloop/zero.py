"""DeepSpeed: the optimizer step taken apart from the backward, and this process's part of each parameter.

Accelerate's ``backward`` under DeepSpeed runs the engine's ``backward`` and then, at the end of
an accumulation window, its ``step`` at once: the update is applied before anything can look at
the reduced gradients or refuse a non-finite step. ``ZeroEngine`` makes the two calls itself, so
that the trainer measures the gradients, agrees on the NaN/Inf flag, and only then steps.

Between the engine's ``backward`` at a window's end and its ``step``, each process holds its
partition of every reduced gradient (ZeRO-1/2: the fragment of each parameter in its optimizer
partition; ZeRO-3: ``deepspeed.utils.safe_get_local_grad``), exactly what its optimizer uses.
The partitions of one parameter cover it once over the processes, so squared local norms summed
over processes are squared whole norms: the same arithmetic as FSDP's shards (``shard_count``).
The fp32 master weights are partitioned the same way, which gives update sizes.

A step the NaN/Inf guard refuses goes down DeepSpeed's own overflow path (what it does for an
fp16 overflow: gradients dropped, optimizer state untouched, ``was_step_applied()`` False): where
the agreed flag is 0, one element of this process's gradient partition becomes NaN, on the device
(no host read), and the engine's overflow check (an all-reduce over the data-parallel group, read
on the host by DeepSpeed itself) refuses the step on every process. Without ZeRO (stage 0) there
is no such check: the flag is read, and the wrapped optimizer's ``step`` is left out for that call.

What is read here beyond DeepSpeed's public ``safe_get_local_*`` functions: ZeRO-1/2's
``param._hp_mapping`` (the fragment map those public functions use themselves); its absence means
"no part of this parameter in this process's partition". Checked with DeepSpeed 0.19.8.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from safeloop.config import TrainerConfig
from safeloop.errors import ConfigError
from safeloop.guards.clipping import GradNorms
from safeloop.guards.reinit import ZeroParam, initial_values

__all__ = ["ZeroEngine", "check_deepspeed_clipping", "zero_engine"]


def zero_engine(accelerator: Accelerator, model: torch.nn.Module) -> ZeroEngine | None:
    """The DeepSpeed engine of a prepared model, wrapped for the trainer; None when not under DeepSpeed.

    Args:
        accelerator (`Accelerator`): the run's accelerator, after ``prepare``.
        model (`torch.nn.Module`): the prepared model (a ``DeepSpeedEngine`` under DeepSpeed).

    Returns:
        `ZeroEngine | None`: None unless ``accelerator.distributed_type`` is DeepSpeed.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return ZeroEngine(model, list(accelerator.unwrap_model(model).parameters()))


def check_deepspeed_clipping(config: TrainerConfig, zero: ZeroEngine) -> None:
    """Refuse the trainer's clipping arguments that DeepSpeed's engine would not apply.

    DeepSpeed clips inside its step (its config's ``gradient_clipping``), on gradients safeloop
    only sees in partitions; ``clip_grad_norm`` equal to that value asks for what DeepSpeed does.

    Raises:
        ConfigError: ``clip_grad_value`` or ``adaptive_clip`` set, or ``clip_grad_norm`` that
            differs from the DeepSpeed config's ``gradient_clipping``.
    """
    engine_clip = float(zero.engine.gradient_clipping() or 0.0)  # type: ignore[operator]
    problems = []
    if config.clip_grad_norm is not None and config.clip_grad_norm != engine_clip:
        problems.append(
            f"clip_grad_norm={config.clip_grad_norm!r}, while the DeepSpeed config's gradient_clipping is "
            f"{engine_clip!r}. DeepSpeed clips inside its own step, with its config's value. Fix: set "
            f"`gradient_clipping: {config.clip_grad_norm}` in the DeepSpeed config (or "
            f"`DeepSpeedPlugin(gradient_clipping={config.clip_grad_norm})`) and drop clip_grad_norm."
        )
    for name, value in (("clip_grad_value", config.clip_grad_value), ("adaptive_clip", config.adaptive_clip)):
        if value is not None:
            problems.append(
                f"{name}={value!r}: DeepSpeed's engine steps its partitioned gradients itself and has "
                f"no such clipping. Fix: drop {name}; clip by norm with the DeepSpeed config's "
                "`gradient_clipping`."
            )
    if problems:
        raise ConfigError(
            f"SafeTrainer under DeepSpeed (ZeRO-{zero.stage}): clipping the engine cannot do:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


class ZeroEngine:
    """One DeepSpeed engine's backward and step, called apart, and its partitions of each parameter.

    Args:
        engine (`torch.nn.Module`): the ``deepspeed.DeepSpeedEngine`` that ``prepare`` returned.
        params (`Sequence[torch.nn.Parameter]`): the unwrapped model's parameters, in order.

    Attributes:
        stage (`int`): the ZeRO stage (0: no partitioning).
        partitioned (`bool`): gradients and fp32 weights are partitioned over processes (stage 1-3).
        overflowed (`bool`): the engine refused the last step on its own (not the guard's decision).
    """

    def __init__(self, engine: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> None:
        self.engine = engine
        self.params = list(params)
        self.stage = int(engine.zero_optimization_stage())  # type: ignore[operator]
        self.partitioned = self.stage > 0
        device = engine.device if isinstance(getattr(engine, "device", None), torch.device) else None
        self._empty = torch.zeros(0, device=device)
        self.overflowed = False  # the engine refused the last step on its own
        self._poison_target: torch.nn.Parameter | None = None

    # -- the two halves of Accelerate's backward -------------------------------------------

    def backward(self, loss: torch.Tensor, *, sync: bool) -> None:
        """The engine's backward, without its step: what ``accelerator.backward`` does before stepping.

        Args:
            loss (`torch.Tensor`): the micro-batch's loss (the engine divides it by its accumulation).
            sync (`bool`): this micro-batch ends the accumulation window (``sync_gradients``).
        """
        self.engine.set_gradient_accumulation_boundary(is_boundary=sync)  # type: ignore[operator]
        self.engine.backward(loss)  # type: ignore[operator]

    def step(self, flag: torch.Tensor | None, take_step: Callable[[], object] | None = None) -> bool | None:
        """Take the engine's step, or refuse it when ``flag`` is 0.

        Without ZeRO (stage 0) the flag is read on the host before the step. Under ZeRO it is
        not: a refused step is marked on the device (``_poison_partition``) and DeepSpeed's own
        overflow check, which reads its verdict on the host anyway, refuses it; the flag is read
        only after a step the engine did not apply, to tell the guard's refusal from its own.

        Args:
            flag (`torch.Tensor`, *optional*): the NaN/Inf guard's device flag, agreed by all
                processes (1: apply); None with the guard off.
            take_step (`Callable`, *optional*): the engine's own ``step`` (Lightning calls it
                through a wrapper on the instance); defaults to ``engine.step``.

        Returns:
            `bool | None`: as ``GatedStep.step``: True applied, False refused by the guard, None
            with the guard off or when the engine refused the step on its own (an fp16 loss-scale
            overflow, or non-finite gradients with the guard off): ``overflowed`` says so.
        """
        self.overflowed = False
        take = self.engine.step if take_step is None else take_step
        if flag is None:
            take()  # type: ignore[operator]
            self.overflowed = not self.engine.was_step_applied()  # type: ignore[operator]
            return None
        if not self.partitioned:
            if not bool(flag.item()):  # host read per step: stage 0 has no overflow check to use
                with _without_optimizer_step(self.engine.optimizer):  # type: ignore[arg-type]
                    take()  # type: ignore[operator]
                return False
            take()  # type: ignore[operator]
        else:
            self._poison_partition(flag)
            with _overflow_checked(self.engine.optimizer):  # type: ignore[arg-type]
                take()  # type: ignore[operator]
        if self.engine.was_step_applied():  # type: ignore[operator]
            return True
        if not bool(flag.item()):  # after a refused step only (rare): the guard's refusal
            return False
        self.overflowed = True
        return None

    # -- this process's partitions ---------------------------------------------------------

    def local_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This process's part of ``param``'s reduced gradient (flat; empty when it holds none).

        Valid between the backward that ends a window and the step, as DeepSpeed documents.
        """
        if not self.partitioned:
            return param.grad if param.grad is not None else self._empty
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            grad = safe_get_local_grad(param) if param.requires_grad else None
            return self._empty if grad is None else _without_padding(param, grad)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return self._empty
        return mapping.get_lp_grad_fragment(param._index_in_param_group)  # type: ignore[attr-defined]

    def local_param(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This process's part of ``param``'s fp32 master weight, what its optimizer updates (flat)."""
        if not self.partitioned:
            return param.detach()
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            value = safe_get_local_fp32_param(param) if param.requires_grad else None
            return self._empty if value is None else _without_padding(param, value)
        mapping = getattr(param, "_hp_mapping", None)
        return self._empty if mapping is None else mapping.get_hp_fragment()

    def whole_shapes(self) -> tuple[torch.Size, ...]:
        """Every parameter's whole shape (ZeRO-3 leaves an empty placeholder in the module)."""
        return tuple(torch.Size(getattr(p, "ds_shape", p.shape)) for p in self.params)

    def measure(self, loss: torch.Tensor | None = None) -> tuple[GradNorms, torch.Tensor | None]:
        """The step's gradient norms from this process's partitions, before DeepSpeed clips.

        Args:
            loss (`torch.Tensor`, *optional*): the step's loss, with the NaN/Inf guard on: its
                finiteness is agreed in the same all-reduce as the global norm.

        Returns:
            `tuple[GradNorms, torch.Tensor | None]`: ``total`` is the global norm (one all-reduce
            of two scalars when partitioned), ``per_param`` the norm of this process's part of
            each gradient (the diagnostics sum their squares over processes), both divided by
            the fp16 loss scale, if any; and, with ``loss``, the guard's float32 0/1 flag, agreed by
            every process (1: the loss everywhere and every gradient are finite).
        """
        # ZeRO-3 synchronises its reduce stream at the end of the backward: the reads below find
        # it idle (no wait on compute), and nothing here reads a tensor on the host
        grads = [self.local_grad(p).detach() for p in self.params]
        device = next((g.device for g in grads if g.numel()), self._empty.device)
        nonempty = [g for g in grads if g.numel()]
        norms = iter(torch._foreach_norm([g.float() for g in nonempty], 2.0) if nonempty else [])
        per_param = torch.stack(
            [next(norms).to(device) if g.numel() else torch.zeros((), device=device) for g in grads]
        )
        scale = getattr(self.engine.optimizer, "loss_scale", None)  # fp16: the gradients are scaled
        if isinstance(scale, torch.Tensor):  # divided on the device: no host read
            per_param = per_param / scale.to(device)
        elif scale not in (None, 1, 1.0):
            per_param = per_param / float(scale)  # type: ignore[arg-type]
        bad_loss = torch.zeros((), device=device)
        if loss is not None:
            bad_loss = (~torch.isfinite(loss.detach().float())).any().float().to(device)
        # a non-finite gradient element makes the sum of squares, and so the total, non-finite
        squares = per_param.square().sum()
        distributed = torch.distributed.is_initialized()
        if self.partitioned:  # partitions: their squares add up over processes
            packed = torch.stack([squares, bad_loss])
            if distributed:
                torch.distributed.all_reduce(packed)
            squares, bad_loss = packed[0], packed[1]
        elif loss is not None and distributed:  # stage 0: whole reduced gradients, the same everywhere
            torch.distributed.all_reduce(bad_loss)
        total = squares.sqrt()
        flag = None if loss is None else (torch.isfinite(total) & (bad_loss == 0)).to(torch.float32)
        return GradNorms(total=total, per_param=per_param), flag

    # -- all-zero weights at the first step (the reinit_zero_params guard) -------------------

    def find_zero_params(
        self, named_params: Sequence[tuple[str, torch.nn.Parameter]], reached: set[str] | None = None
    ) -> list[ZeroParam]:
        """``guards.reinit.find_zero_params`` from this process's partitions (one all-reduce).

        Args:
            named_params (`Sequence[tuple[str, Parameter]]`): the unwrapped model's parameters.
            reached (`set[str]`, *optional*): the parameters the first backward reached (the
                diagnostics' gradient hooks); without it every trainable parameter counts, as a
                ZeRO gradient partition says nothing of whether a gradient came.

        Returns:
            `list[ZeroParam]`: in parameter order, with whole shapes.
        """
        shapes = dict(zip(self.params, self.whole_shapes(), strict=True))
        candidates = [
            (name, param)
            for name, param in named_params
            if param.requires_grad and shapes[param].numel() > 0 and (reached is None or name in reached)
        ]
        if not candidates:
            return []
        parts = [self.local_param(param).detach() for _, param in candidates]
        grads = [self.local_grad(param).detach() for _, param in candidates]
        device = parts[0].device
        # per parameter: does this process's part hold a nonzero value, and its gradient's squares
        stats = torch.stack(
            [
                torch.stack([part.any().float().to(device), grad.float().square().sum().to(device)])
                for part, grad in zip(parts, grads, strict=True)
            ],
            dim=1,
        )
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)  # once per fit
        nonzero, squares = stats.tolist()  # host read, once per fit
        return [
            ZeroParam(name, tuple(shapes[param]), stuck=squares[i] == 0.0, grad_norm=squares[i] ** 0.5)
            for i, (name, param) in enumerate(candidates)
            if nonzero[i] == 0.0
        ]

    def reinit_(
        self, param: torch.nn.Parameter, method: str, *, std: float, generator: torch.Generator
    ) -> None:
        """``guards.reinit.reinit_`` on partitions: each process draws the whole tensor, keeps its part."""
        from deepspeed.utils import safe_set_full_fp32_param

        shape = torch.Size(getattr(param, "ds_shape", param.shape))
        values = initial_values(shape, method, std=std, generator=generator)
        # the fp32 master partition is what the optimizer steps (and what refills the module's copy)
        safe_set_full_fp32_param(param, values.to(self._empty.device))
        if self.stage < 3:  # ZeRO-1/2 also keep a whole module copy, used by the next forward
            with torch.no_grad():
                param.copy_(values.to(device=param.device, dtype=param.dtype))

    def _poison_partition(self, flag: torch.Tensor) -> None:
        """Where ``flag`` is 0, write a NaN into this process's gradient partition, on the device.

        DeepSpeed's overflow check (an all-reduce over the data-parallel group) then refuses the
        step on every process and drops the gradients. Written every step (where the flag is 1 the
        element is written back unchanged) so that no host read decides; into the smallest
        parameter this process holds a part of, chosen once.
        """
        if self._poison_target is None:
            sizes = [(self._partition(p).numel(), i) for i, p in enumerate(self.params) if p.requires_grad]
            held = [(n, i) for n, i in sizes if n]
            if not held:  # nothing of any gradient here: the other processes' NaN suffices
                return
            self._poison_target = self.params[min(held)[1]]
        param = self._poison_target
        grad = self._partition(param)
        first = grad.view(-1)[:1]
        first.copy_(torch.where(flag.to(first.device).bool(), first, torch.full_like(first, float("nan"))))
        if self.stage == 3:  # the local gradient it hands out may be an fp32 copy: set it back
            from deepspeed.utils import safe_set_local_grad

            safe_set_local_grad(param, grad)

    def _partition(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The gradient partition DeepSpeed steps with (ZeRO-3: padding included, its set size)."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            grad = safe_get_local_grad(param) if param.requires_grad else None
            return self._empty if grad is None else grad
        return self.local_grad(param)


def _without_padding(param: torch.nn.Parameter, part: torch.Tensor) -> torch.Tensor:
    """ZeRO-3: this process's partition without the padding that evens out the last ones.

    Partition ``r`` holds elements ``[r * n, (r + 1) * n)`` of the flattened parameter padded to a
    multiple of the process count; the padding is not initialised (seen nonzero here), so it must
    not count in a norm or an all-zero test.
    """
    group = getattr(param, "ds_process_group", None)
    total = getattr(param, "ds_numel", None)
    if total is None or not torch.distributed.is_initialized():
        return part
    rank = torch.distributed.get_rank(group=group)
    valid = max(0, min(part.numel(), total - rank * part.numel()))
    return part.reshape(-1)[:valid]


@contextlib.contextmanager
def _overflow_checked(optimizer: object) -> Iterator[None]:
    """ZeRO-1/2 in bf16: the overflow check on for the step (off, its invalid-norm test is skipped too)."""
    before = getattr(optimizer, "check_grad_overflow", None)
    forced = before is not None and getattr(optimizer, "dtype", None) == torch.bfloat16
    if forced:
        optimizer.check_grad_overflow = True  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if forced:
            optimizer.check_grad_overflow = before  # type: ignore[attr-defined]


@contextlib.contextmanager
def _without_optimizer_step(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The engine's step with its optimizer's ``step`` left out: zero_grad and counters still run."""
    optimizer.step = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del optimizer.step
