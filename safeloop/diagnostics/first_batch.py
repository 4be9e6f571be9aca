"""Checks made once, on the first batch of a fit: can this model learn from this loss at all?

The first forward runs inside a :class:`ForwardWatch` (``watch.py``); the ``check_*`` functions then replace
torch's cryptic errors ("element 0 of tensors does not require grad and does not have a grad_fn",
DDP's "Expected to have finished reduction") by the located cause. They read metadata only
(``requires_grad``, ``grad is None``, shapes), never tensor data: no device sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from safeloop.diagnostics.watch import ForwardWatch
from safeloop.errors import ConfigError
from safeloop.results import Finding

__all__ = [
    "RAISED_CODES",
    "check_trainable",
    "check_optimizer",
    "check_double_backward",
    "check_loss",
    "check_gradient_reach",
    "raise_if_fatal",
]

# the codes that raise instead of reporting: training cannot do anything useful with them
RAISED_CODES = frozenset(
    {
        "no-trainable-params",
        "optimizer-foreign-params",
        "loss-not-differentiable",
        "loss-not-scalar",
        "double-backward",
        "target-out-of-range",
    }
)

_LIMIT = 6  # names shown in a message before "and N more": a 7B model has hundreds of tensors
_NO_GRAD_CAUSES = (
    "`torch.no_grad()`, `torch.set_grad_enabled(False)`, or a reentrant `torch.utils.checkpoint` "
    "whose inputs do not require grad"
)
_CUT_CAUSES = (
    "`.detach()`, `.data`, `.item()`/`.numpy()` and back through `torch.tensor`, or an op with no "
    "gradient: `argmax`, `round`, a comparison, an integer cast"
)


def _found(code: str, severity: str, message: str, suggestion: str, params: Iterable[str] = ()) -> Finding:
    return Finding(code, severity, message, tuple(params), 0, suggestion)  # type: ignore[arg-type]


def _owner(param_name: str) -> str:
    """The module that directly owns a parameter: its name without the last component."""
    return param_name.rpartition(".")[0]


def _names(names: list[str], label: Callable[[str], str] = "`{}`".format) -> str:
    shown = ", ".join(label(n) for n in names[:_LIMIT])
    return shown + (f" and {len(names) - _LIMIT} more" if len(names) > _LIMIT else "")


def _grouped(model: torch.nn.Module, names: list[str], why: Callable[[str], str] = lambda owner: "") -> str:
    """Parameter names grouped by owning module: ``module (weight, bias)``, then ``why(module)``."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_owner(name), []).append(name.rpartition(".")[2])
    parts = [
        f"`{owner or type(model).__name__}`{'' if owner else ' itself'} "
        f"({', '.join(leaves[:3])}{', ...' if len(leaves) > 3 else ''}){why(owner)}"
        for owner, leaves in list(groups.items())[:_LIMIT]
    ]
    more = len(groups) - _LIMIT
    return "; ".join(parts) + (f"; and {more} more modules" if more > 0 else "")


def _inside(name: str, module: str) -> bool:
    """Whether module ``name`` is ``module`` or sits inside it (``""`` is the whole model)."""
    return not module or name == module or name.startswith(f"{module}.")


def _outermost(names: Iterable[str]) -> list[str]:
    """Drop the names that sit inside another name of the set."""
    names = set(names)
    return sorted(n for n in names if not any(o != n and _inside(n, o) for o in names))


def check_trainable(model: torch.nn.Module) -> list[Finding]:
    """Return a ``no-trainable-params`` error when no parameter of ``model`` requires grad."""
    params = list(model.named_parameters())
    if any(p.requires_grad for _, p in params):
        return []
    what = f"`{type(model).__name__}` has no parameters at all"
    if params:
        size = sum(p.numel() for _, p in params)
        what = (
            f"all {len(params)} parameter tensors of `{type(model).__name__}` ({size:,} elements, e.g. "
            f"{_names([n for n, _ in params])}) have `requires_grad=False`"
        )
    fix = (
        "Unfreeze what should train (`model.requires_grad_(True)`, or `requires_grad_(True)` on the "
        "head/adapters); look for a `requires_grad_(False)` or `freeze()` before the trainer."
    )
    return [_found("no-trainable-params", "error", f"On the first batch, {what}: nothing can learn.", fix)]


def check_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[Finding]:
    """Compare, by identity (not value), the optimizer's tensors with the model's parameters."""
    named = list(model.named_parameters())
    model_ids = {id(p) for _, p in named}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    held_ids = {id(p) for p in held}
    foreign = [p for p in held if id(p) not in model_ids]
    missing = [(n, p) for n, p in named if p.requires_grad and id(p) not in held_ids]
    trainable = sum(p.requires_grad for _, p in named)
    shapes = _names([str(tuple(p.shape)) for p in foreign], str)
    names = [n for n, _ in missing]
    # foreign tensors with every trainable parameter held too are extra learnable tensors on purpose
    # (loss weights, a temperature); with some missing, the optimizer was built from another model
    if foreign and missing:
        message = (
            f"The optimizer holds {len(foreign)} tensors that are not parameters of the model (compared "
            f"by identity, not value; shapes {shapes}) and misses {len(missing)} of its {trainable} "
            f"trainable tensors ({_names(names)}): its updates would go to tensors the model does not use."
        )
        if sorted(p.shape for p in foreign) == sorted(p.shape for _, p in missing):
            message += (
                " Their shapes match one for one: the optimizer was built from another instance of the "
                "model, or the model (or these modules) was re-created after it."
            )
        fix = (
            "Build the optimizer from `model.parameters()` of the very model given to the trainer, once "
            "the model is final (weights loaded, heads added or replaced)."
        )
        return [_found("optimizer-foreign-params", "error", message, fix, names)]
    if missing:
        message = (
            f"{len(missing)} of the model's {trainable} trainable tensors are in no optimizer param group, "
            f"so they never change: {_grouped(model, names)}. Typical cause: a module added to the "
            "model after the optimizer was built."
        )
        fix = (
            "Build the optimizer after the model is final, from `model.parameters()` (or add a param "
            "group for them); freeze them with `requires_grad_(False)` if they must not train."
        )
        return [_found("optimizer-missing-params", "warning", message, fix, names)]
    return []


def check_double_backward(model: torch.nn.Module) -> list[Finding]:
    """Before the trainer's first backward, a ``.grad`` set (all are None before) means the user's did."""
    named = list(model.named_parameters())
    with_grad = [n for n, p in named if p.grad is not None]
    if not with_grad:
        return []
    message = (
        f"Before the trainer's backward on the first batch, {len(with_grad)} of {len(named)} parameter "
        f"tensors already hold a gradient ({_names(with_grad)}): `training_step` called `backward()` "
        "itself. The trainer's backward would add a second gradient, or fail with \"Trying to backward "
        'through the graph a second time".'
    )
    fix = (
        "Make `training_step` compute and return the loss only; leave `backward()`, `optimizer.step()` "
        "and `zero_grad()` to the trainer (it handles accumulation, mixed precision and DDP)."
    )
    return [_found("double-backward", "error", message, fix, with_grad)]


def check_loss(loss: torch.Tensor, watch: ForwardWatch) -> list[Finding]:
    """Check that the first loss is a scalar with a graph back to the model.

    Args:
        loss (`torch.Tensor`): the loss of the first batch, before the trainer's backward.
        watch (`ForwardWatch`): the watch the loss was computed in.

    Returns:
        `list[Finding]`: ``loss-not-scalar``, ``loss-not-differentiable`` (naming the cause) errors.
    """
    findings = []
    if loss.numel() != 1:
        message = (
            f"The first loss has shape {tuple(loss.shape)} ({loss.numel()} elements); backward needs a "
            'single number. Typical cause: a loss built with `reduction="none"`.'
        )
        fix = 'Reduce it, e.g. `loss.mean()`, or build the loss with `reduction="mean"`.'
        findings.append(_found("loss-not-scalar", "error", message, fix))
    if loss.grad_fn is None:
        findings.append(_not_differentiable(loss, watch))
    return findings


# what to change, per cause of a loss without grad_fn
_FIXES = {
    "frozen": "Unfreeze the parameters that should train (`requires_grad_(True)`).",
    "inference": "Remove `torch.inference_mode()` from the training forward; keep it for evaluation.",
    "no_grad": "Remove `torch.no_grad()` from the training forward; checkpoint with `use_reentrant=False`.",
    "other": "Compute the loss with the `model` the trainer passes to `training_step`.",
    "cut": (
        "Keep the loss on the model output's graph: no `.detach()`, `.data`, `.item()` on the way, "
        "and compute it from the scores themselves, not from `argmax` or rounded predictions "
        "(for classes, `CrossEntropyLoss` on the logits)."
    ),
    "leaf": "Return the loss computed from the model output, not a tensor rebuilt from its value.",
    "inner": "Call the trainable modules in `forward`, without a cut in their own forward.",
}


def _not_differentiable(loss: torch.Tensor, watch: ForwardWatch) -> Finding:
    model = watch.model
    named = list(model.named_parameters())
    owners = {_owner(n) for n, p in named if p.requires_grad}  # modules that own trainable parameters

    causes: list[tuple[str, str]] = []  # (what was seen, key of the fix); all that apply
    # "ran with grad disabled" only matters for modules holding (or containing) trainable parameters
    involved: list[str] = []

    def labels(modules: list[str]) -> str:
        involved.extend(modules)
        return _names(modules, lambda m: f"`{m}`" if m else f"the model itself (`{type(model).__name__}`)")

    if not owners:
        causes.append((f"every parameter has `requires_grad=False` ({len(named)} tensors)", "frozen"))
    inference = _outermost(m for m in watch.inference if any(_inside(o, m) for o in owners))
    if inference or loss.is_inference():
        where = labels(inference) + " ran" if inference else "the loss was computed"
        causes.append((f"{where} under `torch.inference_mode()`, which records no graph", "inference"))
    no_grad = _outermost(m for m in watch.no_grad if any(_inside(o, m) for o in owners))
    if no_grad:
        causes.append((f"{labels(no_grad)} ran with gradients disabled ({_NO_GRAD_CAUSES})", "no_grad"))
    if not watch.ran:
        seen = "no module of the model ran while the loss was computed: the loss comes from another model"
        causes.append((seen, "other"))
    last = watch.last_grad_output
    if last is not None:
        where = (
            "between the model output (which requires grad) and the loss"
            if last == ""
            else f"inside the model, after {labels([last])}, the last module whose output required grad"
        )
        involved.append(last)
        causes.append((f"the graph was cut {where} ({_CUT_CAUSES})", "cut"))
    if loss.requires_grad:  # a leaf: the usual "fix" for torch's error, which trains nothing
        seen = "the loss is a new leaf (`torch.tensor(loss.item(), requires_grad=True)`?), tied to nothing"
        causes.append((seen, "leaf"))
    if not causes:  # grad on, no cut seen: the trainable modules did not run, or cut their own graph
        seen = f"no module returned an output requiring grad; the trainable ones: {labels(sorted(owners))}"
        causes.append((seen, "inner"))
    message = (
        'The first loss has no `grad_fn`, so backward cannot reach any parameter (torch would say "element '
        '0 of tensors does not require grad and does not have a grad_fn"). Cause: '
        + "; also ".join(seen for seen, _ in causes)
        + "."
    )
    params = (m or type(model).__name__ for m in dict.fromkeys(involved))
    return _found("loss-not-differentiable", "error", message, " ".join(_FIXES[k] for _, k in causes), params)


def check_gradient_reach(
    model: torch.nn.Module, watch: ForwardWatch, reached: set[str] | None = None
) -> list[Finding]:
    """After the first backward: trainable parameters without gradient, by whether their module ran.

    A gradient that exists but is zero is not reported here (``zero-params``).

    Args:
        model (`torch.nn.Module`): the unwrapped model.
        watch (`ForwardWatch`): the first forward's record of which modules ran.
        reached (`set[str]`, *optional*): names of the parameters the backward reached
            (:class:`GradientReach`), where ``.grad`` does not say it (DeepSpeed ZeRO).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if reached is None:
        reached = {n for n, p in named if p.grad is not None}
    missing = [n for n, _ in named if n not in reached]
    got_grad = {_owner(n) for n, _ in named if n in reached}
    sizes = {n: p.numel() for n, p in named}
    unused = [n for n in missing if _owner(n) not in watch.ran]
    detached = [n for n in missing if _owner(n) in watch.ran]
    findings = []
    if unused:
        where = f"their modules never ran in the forward: {_grouped(model, unused)}"
        fix = "Call these modules in `forward`, delete them, or freeze them (`requires_grad_(False)`)."
        if not watch.ran:  # the forward did not go through this model (or hooks did not fire)
            where = "no module of the model ran at all: the loss came from another model object"
            fix = "Compute the loss with the `model` the trainer passes to `training_step`."
        message = (
            f"{len(unused)} trainable tensors ({sum(sizes[n] for n in unused):,} elements) got no gradient "
            f"on the first batch; {where}. They never train, and under DDP (`find_unused_parameters=False`) "
            "the next step fails."
        )
        findings.append(_found("unused-params", "warning", message, fix, unused))

    def why(owner: str) -> str:
        if owner in watch.no_grad or owner in watch.inference:
            return " ran with gradients disabled"
        if any(_inside(o, owner) for o in got_grad):
            # its output reached the loss: other parameters of it (or inside it) got gradient
            return ": its forward does not use them, or cuts them"
        if owner in watch.grad_output:
            return ": its output required grad but was cut on the way to the loss"
        return ": its output did not require grad, its forward cuts the graph"

    if detached:
        disabled = any(_owner(n) in watch.no_grad | watch.inference for n in detached)
        listing = _grouped(model, detached, why)
        message = (
            f"{len(detached)} trainable tensors ({sum(sizes[n] for n in detached):,} elements) got no "
            f"gradient on the first batch although their modules ran in the forward: {listing}. "
            f"The graph is cut by {_CUT_CAUSES}"
            + (f"; gradients are disabled by {_NO_GRAD_CAUSES}, or `inference_mode`." if disabled else ".")
        )
        fix = (
            f"Remove the cut between these modules and the loss (no {_CUT_CAUSES}, no `torch.no_grad()`); "
            "freeze them with `requires_grad_(False)` if they must stay fixed."
        )
        findings.append(_found("detached-params", "warning", message, fix, detached))
    return findings


def check_zero_gradients(model: torch.nn.Module) -> list[Finding]:
    """After the first backward: every gradient that exists is exactly zero.

    The loss has a ``grad_fn`` and reaches the parameters, but through an op whose derivative is
    zero everywhere (``round``, ``floor``, ``sign``, a comparison cast to float), so no weight can
    ever move. One host read, at the first step only.
    """
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return []
    peaks = torch.stack([g.detach().abs().amax().float().to(grads[0][1].device) for _, g in grads])
    if bool(peaks.any()):
        return []
    names = [n for n, _ in grads]
    message = (
        f"All {len(names)} trainable tensors that got a gradient on the first batch got exactly zero "
        f"({_names(names)}): the loss reaches the weights only through an op whose derivative is zero "
        "everywhere (`round`, `floor`, `sign`, a comparison such as `(x > 0).float()`, a hard "
        "threshold), so no weight can move. Dead ReLUs would leave the last layer's bias a gradient."
    )
    fix = (
        "Compute the loss from the continuous outputs: logits with `CrossEntropyLoss` or "
        "`BCEWithLogitsLoss` instead of rounded or thresholded predictions; keep `round`/`argmax` "
        "for metrics, outside the loss."
    )
    return [_found("detached-params", "warning", message, fix, names)]


def raise_if_fatal(findings: Iterable[Finding]) -> None:
    """Raise a ``ConfigError`` listing every error finding whose code is in :data:`RAISED_CODES`.

    Raises:
        ConfigError: with one numbered entry (message and fix) per fatal finding; its
            ``findings`` holds those findings only.
    """
    fatal = [f for f in findings if f.severity == "error" and f.code in RAISED_CODES]
    if not fatal:
        return
    lines = [f"The first batch shows {len(fatal)} problem(s) that stop training before the first update:"]
    for i, finding in enumerate(fatal, 1):
        lines.append(f"{i}. [{finding.code}] {finding.message}")
        if finding.suggestion:
            lines.append(f"   Fix: {finding.suggestion}")
    raise ConfigError("\n".join(lines), findings=fatal)
