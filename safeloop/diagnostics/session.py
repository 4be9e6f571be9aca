"""The diagnostics of one run, wired to the loop (``diagnostics=True``).

The loop and the step say *when* (first micro-batch, after its backward, every step, log steps,
the end of ``fit``); this module calls the checks of ``first_batch``, ``targets``, ``broadcast``,
``data``, ``training``, ``health`` and ``baseline_watch`` (the baseline loss and the rules that
compare with it) and makes every process hold the same findings. Per-step work is device-only
(the gradient norms the clipping step measured anyway); host reads happen on the first batches and
at log steps, in the metrics' single transfer. Sharded runs: see ``sharded.py`` for what is
measured under FSDP2, FSDP1 and DeepSpeed.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.nn.parallel import DistributedDataParallel

from safeloop.diagnostics.baseline_watch import BaselineWatch
from safeloop.diagnostics.broadcast import check_broadcast, from_warnings
from safeloop.diagnostics.data import DataProfile
from safeloop.diagnostics.data_compare import compare_profiles
from safeloop.diagnostics.first_batch import (
    RAISED_CODES,
    check_double_backward,
    check_gradient_reach,
    check_loss,
    check_optimizer,
    check_trainable,
    check_zero_gradients,
    raise_if_fatal,
)
from safeloop.diagnostics.health import WeightHealth, lookup_tables
from safeloop.diagnostics.initial_loss import check_initial_loss
from safeloop.diagnostics.noise_scale import WIDTH, build_monitor, describe_unmeasured
from safeloop.diagnostics.own_loss import OwnLossCheck, explain_nonfinite_first_loss
from safeloop.diagnostics.sharded import shard_layout, unwrapped_name
from safeloop.diagnostics.targets import NO_TARGET_TOKENS, check_inputs, check_targets
from safeloop.diagnostics.training import TrainingMonitor
from safeloop.diagnostics.watch import ForwardWatch, GradientReach
from safeloop.distributed import agree_any, reduce_across_processes
from safeloop.errors import ConfigError, SafeLoopError
from safeloop.findings import Reporter, agree_findings
from safeloop.metrics import LogRecord
from safeloop.results import Finding
from safeloop.zero import ZeroEngine

__all__ = ["Diagnostics", "check_optimizer_before_prepare"]

logger = logging.getLogger("safeloop")


LossFn = Callable[[Any, Any], Any]


class Diagnostics:
    """Runs the checks of ``docs/diagnostics.md`` during one trainer's runs.

    Args:
        accelerator (`Accelerator`): the run's processes (findings are agreed over them).
        model (`torch.nn.Module`): the prepared model.
        optimizer (`torch.optim.Optimizer`): the prepared optimizer (the first-batch check).
        reporter (`Reporter`): where findings go; its findings so far rank the plateau's causes.
        log_every (`int`): steps between log steps (measurement windows).
        loss_fn (`Callable`, *optional*): the user's ``loss_fn``, checked on the first batch.
        eval_dataloader (`DataLoader`, *optional*): profiled against the training data.
        zero (`ZeroEngine`, *optional*): DeepSpeed's engine, whose partitions are measured.
        custom_step (`bool`, *optional*, defaults to False): a ``training_step`` computes the loss
            (no baseline loss: its targets and loss are not seen).
        noise_scale (`str`, *optional*, defaults to ``"auto"``): ``gradient_noise_scale``.

    Attributes:
        noise (`NoiseScaleMonitor | None`): the gradient noise scale (its probe measures each
            step), or None where it is not measured (``noise_scale_reason`` says why).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        reporter: Reporter,
        *,
        log_every: int,
        loss_fn: LossFn | None = None,
        eval_dataloader: Any = None,
        zero: ZeroEngine | None = None,
        custom_step: bool = False,
        noise_scale: str = "auto",
    ) -> None:
        self.accelerator = accelerator
        self.prepared = model
        self.optimizer = optimizer
        self.reporter = reporter
        self.loss_fn = loss_fn
        self.custom_step = custom_step
        self.eval_dataloader = eval_dataloader
        self.model = accelerator.unwrap_model(model)
        self.layout = shard_layout(accelerator, self.model.parameters(), model, zero)
        self.sharded = self.layout.sharded
        if self.layout.reason is not None and accelerator.is_main_process:
            logger.info("safeloop diagnostics under %s: %s", accelerator.distributed_type, self.layout.reason)
        # weight health needs whole rows (units) of a weight: not under any sharding yet
        self._zero_from_norms = False  # weight health reads all-zero weights from the monitor's norms
        self.health = (
            None
            if self.sharded
            else WeightHealth(self.model.named_parameters(), lookup_tables=lookup_tables(self.model))
        )
        # FSDP2, FSDP1 (`use_orig_params=True`) and ZeRO-1/2/3: per-parameter statistics from this
        # process's shards, summed over processes by the metrics all-reduce of the log step
        # (gradient_stats.py); FSDP1 with flat parameters: global norm only. Names as the unwrapped
        # model gives them: FSDP1's auto-wrapped submodules would add `_fsdp_wrapped_module.` to them
        self.monitor = TrainingMonitor(
            [(unwrapped_name(name), param) for name, param in self.model.named_parameters()],
            log_every,
            sharded=not self.layout.per_param,
            shard_count=self.layout.shard_count,
            shapes=self.layout.shapes,
            local=self.layout.local,
        )
        self.noise, self.noise_scale_reason = build_monitor(
            noise_scale,
            accelerator,
            model,
            sharded=self.sharded or accelerator.distributed_type == DistributedType.DEEPSPEED,
        )
        if self.noise_scale_reason is not None and accelerator.is_main_process:
            logger.info(describe_unmeasured([self.noise_scale_reason]))
        self.first_done = False
        self._reach: GradientReach | None = None
        # ZeRO: the parameters the first backward reached (hooks), for the all-zero weight check
        self.reached: set[str] | None = None
        self._watch: ForwardWatch | None = None
        self._train_profile: DataProfile | None = DataProfile()
        self._eval_profile: DataProfile | None = None
        self.baselines = BaselineWatch(
            accelerator,
            reporter,
            self.monitor.no_learning,
            None if custom_step else loss_fn,
            custom_step=custom_step,
            has_eval=eval_dataloader is not None,
        )

    # -- the first micro-batch -------------------------------------------------------------

    def first_loss(self, batch: Any, compute: Callable[[LossFn | None], torch.Tensor]) -> torch.Tensor:
        """Compute the first micro-batch's loss under the first-batch checks.

        Args:
            batch (`Any`): the first micro-batch.
            compute (`Callable`): ``compute(loss_fn)`` runs the forward and returns the loss with
                the given ``loss_fn`` in place of the user's (a checked wrapper of it, or None).

        Raises:
            ConfigError: on every process, when any process found a problem that makes training
                meaningless (the findings that raise, docs/diagnostics.md).
        """
        self.first_done = True
        findings = check_inputs(batch) + check_trainable(self.model)
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            # under DeepSpeed this ran before `prepare` (check_optimizer_before_prepare)
            findings += check_optimizer(self.model, self.optimizer)
        had_grads = any(p.grad is not None for p in self.model.parameters())
        own = self._own_loss_check(batch)
        declared: list[Finding] = []
        if self.loss_fn is None and not self.custom_step and isinstance(batch, Mapping):
            # before the forward: an index out of range is a device-side assert on CUDA. Agreed
            # on every process with a mapping batch, with targets or not (a collective)
            declared = self._agree([] if own is None else own.before_forward())
            raise_if_fatal(declared)
        loss_findings: list[Finding] = []
        caught: list[warnings.WarningMessage] = []
        captured: list[Any] = []
        handle = None
        if own is not None:  # the outputs of the model's own forward: its logits' width
            handle = self.model.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            with ForwardWatch(self.model) as watch, warnings.catch_warnings(record=True) as caught:
                # "always": torch's broadcasting warning must be seen even if shown before (a
                # notebook's second `fit`); it is a finding, not a line the user may have missed
                warnings.simplefilter("always")
                loss = compute(self._checked_loss_fn(loss_findings, batch))
        except Exception as exc:
            if own is not None and not isinstance(exc, SafeLoopError):
                self._explain_forward_error(own, exc)
            raise
        finally:
            # outside the catch, so the user's filters decide again; the user's own warnings
            # come out as before, also when the forward raised
            loss_findings += from_warnings(caught, loss_findings)
            if handle is not None:
                handle.remove()
        if own is not None and captured and loss.numel() == 1:
            loss_findings += own.after_forward(captured[0])
            value = float(loss.detach())  # host read, first batch only
            loss_findings += explain_nonfinite_first_loss(
                value, batch, captured[0], self.model, masked=own.masked
            )
        self._watch = watch
        if not had_grads:  # a training_step that called backward itself left gradients behind
            findings += check_double_backward(self.model)
        findings += loss_findings + check_loss(loss, watch)
        findings = self._agree(findings) + declared
        raise_if_fatal(findings)
        self._report(findings)
        if self.layout.reach_hooks:  # ZeRO: which parameters the coming backward reaches
            self._reach = GradientReach(self.model)
        return loss

    def after_first_backward(self) -> None:
        """Which trainable parameters got no gradient, and why (unused or cut off)."""
        if self._watch is None:
            return
        if self.layout.sharded and self.layout.gradient_reach and not self.accelerator.sync_gradients:
            # FSDP2 sets a parameter's (sharded) `.grad` only when the window's reduce-scatter ran:
            # at an accumulating micro-batch every `.grad` is still None; wait for the window's end
            return
        watch, self._watch = self._watch, None
        reached = None
        if self._reach is not None:
            reached, self._reach = self._reach.close(), None
            self.reached = reached
        reach = self.layout.gradient_reach or reached is not None
        found = check_gradient_reach(self.model, watch, reached) if reach else []
        if reach and reached is None and not self.layout.sharded and not found:
            found += check_zero_gradients(self.model)  # `.grad` holds the whole gradients here
            if found:
                self.zero_gradients_found()
        findings = self._agree(found)
        self._report(findings)
        ddp = self.prepared
        if findings and isinstance(ddp, DistributedDataParallel) and not ddp.find_unused_parameters:
            # DDP would stop at the next step with "Expected to have finished reduction ...
            # parameter indices which did not receive grad": say which and what to do, now
            raise ConfigError(
                "Under DistributedDataParallel every trainable parameter must receive a gradient at "
                "every step, and these got none on the first batch:\n"
                + "\n".join(f"  - [{f.code}] {f.message}" for f in findings)
                + "\nRemove or freeze them (`requires_grad_(False)`), use them in `forward`, or let DDP "
                "skip them: `Accelerator(kwargs_handlers=[DistributedDataParallelKwargs("
                "find_unused_parameters=True)])` passed as `accelerator=`.",
                findings=findings,
            )

    def _own_loss_check(self, batch: Any) -> OwnLossCheck | None:
        """The checks of a model that computes its own loss from the batch's targets, if that is the case."""
        if self.loss_fn is not None or self.custom_step or not isinstance(batch, Mapping):
            return None
        own = OwnLossCheck(self.model, batch)
        return own if own.targets else None

    def _explain_forward_error(self, own: OwnLossCheck, exc: Exception) -> None:
        """Raise a ``ConfigError`` from ``exc`` when a target check explains it; else return.

        Only this process raised: no agreement (the others may be waiting in a collective, as
        with any exception in a forward).
        """
        explained = own.after_error(exc)
        if any(f.severity == "error" and f.code in RAISED_CODES for f in explained):
            try:
                raise_if_fatal(explained)
            except ConfigError as error:
                raise error from exc

    def _checked_loss_fn(self, found: list[Finding], batch: Any = None) -> LossFn | None:
        """The user's ``loss_fn`` wrapped in the target checks, which report into ``found``."""
        return None if self.loss_fn is None else self.checked_loss_fn(self.loss_fn, found, batch)

    def checked_loss_fn(self, loss_fn: LossFn, found: list[Finding], batch: Any = None) -> LossFn:
        """``loss_fn`` wrapped in the first batch's target checks, which report into ``found``.

        A target the loss cannot take (a raised finding) gives a zero loss instead of the crash,
        so that every process reaches the agreement on the findings, then all raise.

        Args:
            loss_fn (`Callable`): ``loss_fn(outputs, targets)``, the user's or one seen called.
            found (`list[Finding]`): where the findings go.
            batch (`Any`, *optional*): the first batch (explains a non-finite first loss).
        """

        def checked(outputs: Any, targets: Any) -> torch.Tensor:
            problems = check_targets(loss_fn, outputs, targets)
            found.extend(problems)
            if any(f.severity == "error" and f.code in RAISED_CODES for f in problems):
                # the real loss would crash here (an index error, or a device-side assert on
                # CUDA); a zero stand-in lets every process reach the agreement, then all raise
                return _zero_like_loss(outputs)
            self.baselines.see(outputs, targets)
            loss = loss_fn(outputs, targets)
            value = None
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                value = float(loss.detach())
                found.extend(check_initial_loss(loss_fn, outputs, targets, value))
                masked = any(f.code == NO_TARGET_TOKENS for f in problems)
                found.extend(explain_nonfinite_first_loss(value, batch, outputs, self.model, masked=masked))
            found.extend(check_broadcast(loss_fn, outputs, targets, value))
            return loss

        checked.__wrapped__ = loss_fn  # type: ignore[attr-defined]  # what a loss error explains
        return checked

    # -- the baseline loss ------------------------------------------------------------------

    @property
    def baseline_value(self) -> float | None:
        """The baseline loss measured at the first log check, or None."""
        return None if self.baselines.baseline is None else self.baselines.baseline.value

    def loss_fn_now(self) -> LossFn | None:
        """The user's ``loss_fn`` wrapped to keep its targets while the baseline samples them, else None."""
        return self.baselines.loss_fn_now()

    def after_evaluation(self, step: int, eval_loss: float) -> None:
        """Judge an evaluation against the baseline and the train loss (no collective)."""
        self._report(self.baselines.after_evaluation(step, eval_loss, self.monitor.causes_now()))

    # -- data ------------------------------------------------------------------------------

    def profile_eval(self) -> None:
        """Profile the first eval batches, leaving every RNG as it was (every process together)."""
        loader = self.eval_dataloader
        if loader is None or self._train_profile is None:
            return
        profile = DataProfile()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        # iterating a DataLoader draws its base seed from the global RNG: parity needs it untouched
        with torch.random.fork_rng(devices=devices):
            iterator = iter(loader)
            try:
                for batch in iterator:
                    self.baselines.see_eval_batch(batch)
                    if not profile.add(batch):
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
                del iterator
        self._eval_profile = profile

    def see_train_batch(self, batch: Any) -> None:
        """Profile a training micro-batch while the profile takes batches (host copy, first ones)."""
        if self._train_profile is not None and self._eval_profile is not None:
            self._train_profile.add(batch)

    def _compare_data(self, final: bool) -> None:
        if self._train_profile is None or self._eval_profile is None:
            return
        if not final and agree_any(self.accelerator, not self._train_profile.done):
            return  # some process still profiles its first batches
        train = self._merged(self._train_profile)
        evaluation = self._merged(self._eval_profile)
        self._train_profile = self._eval_profile = None
        self._report(compare_profiles(train, evaluation))

    def _merged(self, profile: DataProfile) -> DataProfile:
        acc = self.accelerator
        stats = reduce_across_processes(acc, profile.stats_tensor(acc.device), "sum")
        hashes = profile.hash_tensor(acc.process_index, acc.device)
        if acc.num_processes > 1:
            hashes = acc.gather(hashes)
        return DataProfile.from_tensors(stats, hashes, feature_names=profile.feature_names)

    # -- every step and log steps ----------------------------------------------------------

    def zero_gradients_found(self) -> None:
        """Every first gradient was exactly zero (``detached-params``).

        Rows without gradient are then its effect, which weight health must not report as dead units.
        """
        if self.health is not None:
            self.health.rows_explained = True

    def record(self, per_param: torch.Tensor | None) -> None:
        """The step's per-parameter gradient norms (device only)."""
        self.monitor.record(per_param)

    @contextlib.contextmanager
    def around_update(self, log_step: bool) -> Iterator[None]:
        """On a log step, measure update sizes across the optimizer step, and row masks before it."""
        if not log_step:
            yield
            return
        self.monitor.before_update()
        yield
        self.monitor.after_update()
        if self.health is not None:
            self.health.capture_gradients()  # the log step's gradients, before they are freed

    def measurements(self) -> tuple[torch.Tensor | None, int]:
        """The device vector to read with the metrics, and the length of its health part."""
        # an all-zero weight has a norm of 0: with the monitor's weight norms at hand, weight
        # health does not scan every weight a second time
        self._zero_from_norms = (
            self.health is not None
            and self.monitor.measures_weight_norms
            and {name for name, _ in self.health.weights} <= set(self.monitor.weight_names)
        )
        health = None if self.health is None else self.health.measurements(nonzero=not self._zero_from_norms)
        parts = [health, self.monitor.measurements()]
        health_len = 0 if parts[0] is None else parts[0].numel()
        if self.noise is not None:  # last, a fixed width: check() takes it off the end
            parts.append(self.noise.measurements(self.accelerator.device))
        present = [p.float() for p in parts if p is not None]
        if not present:
            return None, 0
        device = present[0].device
        return torch.cat([p.to(device) for p in present]), health_len

    def check(
        self, step: int, values: list[float], health_len: int, record: LogRecord, *, lr: float
    ) -> dict[str, float]:
        """Turn a log step's host values into findings; return the tracker values.

        Args:
            step (`int`): the log step.
            values (`list[float]`): the host values of :meth:`measurements`.
            health_len (`int`): how many of them are weight health's.
            record (`LogRecord`): the interval's metrics.
            lr (`float`): the learning rate of the interval's last step.
        """
        if self.noise is not None:
            values, noise_values = values[: len(values) - WIDTH], values[len(values) - WIDTH :]
            self.noise.update(step, noise_values)
        health_values, monitor_values = values[:health_len], values[health_len:]
        measured = self.baselines.due
        if measured:
            self._report(self.baselines.measure(step))
        if self.health is not None:
            norms = self.monitor.weight_norms(monitor_values) if self._zero_from_norms else None
            if self._zero_from_norms and norms is None:  # (not measured after all: no verdict on zeros)
                norms = {name: 1.0 for name, _ in self.health.weights}
            self._report(self.health.check(step, health_values, norms))
        applied = [s for s in record.per_step if s.finite is not False and not s.overflow]
        self._report(
            self.monitor.check(
                step,
                monitor_values,
                losses=[s.loss for s in applied],
                grad_norms=[s.grad_norm for s in applied],
                lr=lr,
                context=self.reporter.findings,
                eval_loss=self.reporter.record.eval_loss,
                # the log step's own update (the one measured) was applied, not skipped
                applied=bool(applied) and applied[-1] is record.per_step[-1],
            )
        )
        self._compare_data(final=False)
        tracked = self.monitor.tracker_values(monitor_values)
        if measured and self.baselines.baseline is not None:  # logged once, with this log step's values
            tracked["baseline_loss"] = self.baselines.baseline.value
        return tracked

    def finish(self) -> None:
        """At the end of ``fit``: the baseline, data profiles and batch-size advice (all processes)."""
        if self.baselines.pending:
            self._report(self.baselines.measure(self.reporter.progress.global_step, log=True))
        self._compare_data(final=True)
        if self.noise is not None:  # the same averaged values on every process: the same finding
            self._report(self.noise.findings(self.reporter.progress.global_step))

    @property
    def noise_scale_value(self) -> float | None:
        """The gradient noise scale now (samples), or None (not measured, or not yet)."""
        return None if self.noise is None else self.noise.value

    def note_zero_at_start(self, names: set[str]) -> None:
        """The weights the first step's check found all zero and left so (weight health skips them)."""
        if self.health is not None:
            self.health.zero_at_start = names

    def forget_interval(self) -> None:
        """Forget what a rollback undid: unread measurements and the plateau's history."""
        self.monitor.after_rollback()
        if self.noise is not None:
            self.noise.forget()

    # -- findings --------------------------------------------------------------------------

    def _agree(self, findings: list[Finding]) -> list[Finding]:
        return agree_findings(self.accelerator, findings)

    def _report(self, findings: list[Finding]) -> None:
        self.reporter.add_all(findings)


def check_optimizer_before_prepare(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[Finding]:
    """The first-batch optimizer check, run before ``prepare`` (DeepSpeed, which swaps the tensors).

    Every process builds the same model and optimizer, so all reach the same verdict without a
    collective.

    Raises:
        ConfigError: the optimizer holds tensors of another model (``optimizer-foreign-params``).

    Returns:
        `list[Finding]`: the warnings (``optimizer-missing-params``), for the trainer's findings.
    """
    findings = check_optimizer(model, optimizer)
    raise_if_fatal(findings)
    return findings


def _zero_like_loss(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor) and outputs.is_floating_point():
        return outputs.sum() * 0.0
    return torch.zeros((), requires_grad=True)
