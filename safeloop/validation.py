"""Checks of single ``SafeTrainer`` arguments; each appends its problems to a shared list.

``config.build_config`` calls them all and raises one ``ConfigError`` listing every problem.
Messages give the argument, the value seen (``_seen``) and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

__all__ = [
    "seen",
    "is_int",
    "check_count",
    "check_positive_float",
    "check_objects",
    "sparse_gradient_problem",
    "check_callables",
    "check_scheduler",
    "check_accelerator",
    "check_prepared_optimizer",
    "check_callbacks",
    "normalise_log_with",
    "name_unknown_keywords",
    "unknown_keywords_message",
]

_MAX_LISTED = 10
_MAX_REPR = 80
# keywords a new user reaches for that belong to another object than the trainer
_LR = "the learning rate is set on the optimizer: `torch.optim.AdamW(model.parameters(), lr=...)`"
_ELSEWHERE = {
    "lr": _LR,
    "learning_rate": _LR,
    "batch_size": "the batch size is set on the DataLoader: `DataLoader(dataset, batch_size=...)`",
    "device": (
        "Accelerate places the model and batches; to choose, pass `accelerator=Accelerator(cpu=True)` "
        "or launch with `accelerate launch`"
    ),
}
_Init = TypeVar("_Init", bound=Callable[..., None])


def seen(value: object) -> str:
    """Return ``repr(value)`` on one line, shortened, followed by its type name."""
    try:
        text = " ".join(repr(value).split())
    except Exception:  # a broken __repr__ must not hide the real problem
        text = f"<{type(value).__name__} object>"
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return f"{text} ({type(value).__name__})"


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    # bool is an int subclass; `max_epochs=True` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(problems: list[str], name: str, value: object, *, optional: bool) -> None:
    """Require an int >= 1 (or None when ``optional``)."""
    if value is None and optional:
        return
    if not is_int(value) or value < 1:  # type: ignore[operator]
        allowed = "an int >= 1" + (" or None" if optional else "")
        problems.append(f"`{name}` must be {allowed}; got {seen(value)}.")


def check_positive_float(problems: list[str], name: str, value: object, *, optional: bool = True) -> None:
    """Require a finite number > 0 (or None when ``optional``)."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        allowed = "a finite number > 0" + (" or None" if optional else "")
        problems.append(f"`{name}` must be {allowed}; got {seen(value)}.")


def check_objects(
    problems: list[str],
    model: object,
    optimizer: object,
    train_dataloader: object,
    eval_dataloader: object,
) -> None:
    """Check the model, optimizer and dataloaders are what their names say."""
    if not isinstance(model, torch.nn.Module):
        problems.append(
            f"`model` must be a torch.nn.Module; got {seen(model)}. "
            "Pass the module itself, not its parameters or state_dict."
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        problems.append(
            f"`optimizer` must be a torch.optim.Optimizer; got {seen(optimizer)}. "
            "Build it over the parameters, e.g. `torch.optim.AdamW(model.parameters(), lr=1e-3)`."
        )
    for name, loader, optional in (
        ("train_dataloader", train_dataloader, False),
        ("eval_dataloader", eval_dataloader, True),
    ):
        if loader is None and optional:
            continue
        if not isinstance(loader, DataLoader):
            problems.append(
                f"`{name}` must be a torch.utils.data.DataLoader; got {seen(loader)}. "
                "Wrap the dataset: `DataLoader(dataset, batch_size=...)`."
            )
            continue
        try:
            length = len(loader)
        except TypeError:  # an IterableDataset without __len__: its length is unknown, not zero
            continue
        if length == 0:
            problems.append(
                f"`{name}` must yield at least one batch; got a DataLoader of len 0 (dataset of "
                f"{_dataset_len(loader)} samples, batch_size={loader.batch_size}, "
                f"drop_last={loader.drop_last}). "
                "Give it samples, or lower `batch_size` / set `drop_last=False`."
            )


def sparse_gradient_problem(model: object, fix_tail: str = "") -> str | None:
    """Why a model whose modules make sparse gradients cannot be guarded, or None.

    ``nn.Embedding(sparse=True)`` and ``nn.EmbeddingBag(sparse=True)`` give their weight a sparse
    ``.grad``: the gradient norms, the finite flag and the first-step checks read dense gradients
    (torch's own ``clip_grad_norm_`` refuses a sparse one too), so the first step would fail deep
    inside them.

    Args:
        model (`object`): the model (anything else is left to the type checks).
        fix_tail (`str`, *optional*): the fix's last words (Lightning's differ).
    """
    if not isinstance(model, torch.nn.Module):
        return None
    sparse = [
        f"`{name or type(model).__name__}` ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse
    ]
    if not sparse:
        return None
    shown = ", ".join(sparse[:5]) + (" ..." if len(sparse) > 5 else "")
    return (
        f"{shown} {'has' if len(sparse) == 1 else 'have'} `sparse=True`: the weight's gradient is a "
        "sparse tensor, and safeloop's gradient norms, NaN/Inf flag and first-step checks read dense "
        "gradients (torch's `clip_grad_norm_` refuses sparse ones too). Fix: `sparse=False` (a dense "
        "gradient; then `torch.optim.Adam` or `AdamW` in place of `SparseAdam`)" + fix_tail + "."
    )


def _dataset_len(loader: DataLoader) -> str:
    try:
        return str(len(loader.dataset))  # type: ignore[arg-type]
    except TypeError:
        return "unknown"


def check_callables(problems: list[str], loss_fn: object, training_step: object) -> None:
    """Check ``loss_fn`` and ``training_step`` are callables (instances, not classes)."""
    for name, fn in (("loss_fn", loss_fn), ("training_step", training_step)):
        if isinstance(fn, type) and issubclass(fn, torch.nn.Module):
            # callable, but calling it builds a module instead of computing a loss
            problems.append(
                f"`{name}` must be a function or a module instance; got the class {fn.__name__}. "
                f"Pass an instance: `{name}={fn.__name__}()`."
            )
        elif fn is not None and not callable(fn):
            problems.append(
                f"`{name}` must be callable or None; got {seen(fn)}. Pass the function itself, "
                "not the result of calling it."
            )
        elif fn is not None and not _takes_two(fn):
            takes = "(outputs, targets)" if name == "loss_fn" else "(model, batch)"
            problems.append(
                f"`{name}` is called as `{name}{takes}`, with two arguments, but its signature "
                f"`{_signature(fn)}` cannot take them. Write it as `def {name}{takes}:`."
            )


def _signature(fn: Callable[..., Any]) -> str:
    try:
        return f"{getattr(fn, '__name__', type(fn).__name__)}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return repr(fn)


def _takes_two(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` can be called with two positional arguments (True when it cannot be told)."""
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): let the call decide
        return True
    return True


def check_scheduler(problems: list[str], lr_scheduler: object, optimizer: object) -> None:
    """Check the scheduler is one and steps this optimizer."""
    if lr_scheduler is None:
        return
    if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        problems.append(
            "`lr_scheduler` must be an LRScheduler that steps without a metric, or None; got "
            f"{seen(lr_scheduler)}. A ReduceLROnPlateau needs a metric at every step; safeloop "
            "steps the scheduler once per optimizer step without one. Step it yourself in a "
            "`Callback.on_validation_end(trainer, eval_loss)`, and leave `lr_scheduler=None`."
        )
        return
    if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
        problems.append(
            "`lr_scheduler` must be a torch.optim.lr_scheduler.LRScheduler or None; got "
            f"{seen(lr_scheduler)}. Build one on the optimizer, e.g. "
            "`torch.optim.lr_scheduler.LinearLR(optimizer)`."
        )
        return
    if isinstance(optimizer, torch.optim.Optimizer) and lr_scheduler.optimizer is not optimizer:
        theirs = lr_scheduler.optimizer
        problems.append(
            "`lr_scheduler` was built on another optimizer than `optimizer`: its optimizer is "
            f"{type(theirs).__name__} at {id(theirs):#x}, `optimizer` is {type(optimizer).__name__} "
            f"at {id(optimizer):#x}; its learning rates would never reach the parameters. Build it "
            "from the optimizer given to SafeTrainer."
        )


def check_accelerator(
    problems: list[str],
    accelerator: object,
    gradient_accumulation_steps: object,
    mixed_precision: object,
    log_with: object,
) -> None:
    """Check an ``accelerator=`` against the arguments it makes meaningless."""
    if accelerator is None:
        return
    if not isinstance(accelerator, Accelerator):
        problems.append(
            f"`accelerator` must be an accelerate.Accelerator or None; got {seen(accelerator)}. "
            "Pass `accelerator=Accelerator(...)` or leave it None to let safeloop build one."
        )
        return
    own = accelerator.gradient_accumulation_steps
    if gradient_accumulation_steps is not None and gradient_accumulation_steps != own:
        problems.append(
            f"`gradient_accumulation_steps={gradient_accumulation_steps!r}` disagrees with the "
            f"given accelerator's {own} (its `gradient_accumulation_steps`, which "
            "`accelerator.accumulate` follows). Set it on one of them only: leave "
            f"`gradient_accumulation_steps` unset to use the Accelerator's {own}, or build it with "
            f"`Accelerator(gradient_accumulation_steps={gradient_accumulation_steps!r})`."
        )
    if mixed_precision is not None and mixed_precision != accelerator.mixed_precision:
        problems.append(
            f"`mixed_precision={mixed_precision!r}` disagrees with the given accelerator's "
            f"{accelerator.mixed_precision!r}. Set it on one of them only: "
            "`Accelerator(mixed_precision=...)` or leave `accelerator=None`."
        )
    if log_with:
        problems.append(
            f"`log_with={log_with!r}` only applies when safeloop builds the Accelerator; with `accelerator=` "
            "pass `Accelerator(log_with=...)` and call `accelerator.init_trackers(...)` yourself."
        )


def check_prepared_optimizer(
    problems: list[str], optimizer: object, accelerator: object, gradient_accumulation_steps: object
) -> None:
    """Refuse an optimizer prepared by an Accelerator that is not given, when accumulations differ.

    Without ``accelerator=`` safeloop builds its own Accelerator, and Accelerate keeps one
    accumulation setting per process: the new one would replace the one the optimizer was
    prepared with, silently.
    """
    if accelerator is not None or not getattr(optimizer, "_is_accelerate_prepared", False):
        return
    state = getattr(optimizer, "gradient_state", None)
    theirs = getattr(state, "num_steps", 1)
    ours = gradient_accumulation_steps if is_int(gradient_accumulation_steps) else 1
    if theirs != ours:
        problems.append(
            f"`optimizer` was already prepared by an Accelerator with gradient_accumulation_steps={theirs}, "
            f"but no `accelerator=` was given: safeloop would build its own Accelerator with "
            f"gradient_accumulation_steps={ours}, and the accumulation of the first would be silently "
            "lost. Pass that Accelerator as `accelerator=`, or pass the model and optimizer unprepared "
            f"(safeloop prepares them) with `gradient_accumulation_steps={theirs}`."
        )


def check_callbacks(problems: list[str], callbacks: object, base: type) -> tuple[Any, ...]:
    """Return the callbacks as a tuple, reporting every item that is not an instance of ``base``.

    Args:
        problems (`list[str]`): where problems are added.
        callbacks (`object`): the ``callbacks`` argument.
        base (`type`): ``safeloop.Callback`` (handed in: this module does not import the
            callbacks, whose hooks name the trainer's type).
    """
    if isinstance(callbacks, base):
        return (callbacks,)
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
        problems.append(
            f"`callbacks` must be a list of safeloop.Callback instances; got {seen(callbacks)}. "
            "Pass e.g. `callbacks=[MyCallback()]`."
        )
        return ()
    items = tuple(callbacks)
    bad = [_bad_callback(i, item, base) for i, item in enumerate(items) if not isinstance(item, base)]
    if bad:
        listed = ", ".join(bad[:_MAX_LISTED])
        more = f" ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        problems.append(
            f"`callbacks` must hold safeloop.Callback instances; these are not: {listed}{more}. "
            "Subclass `safeloop.Callback` and pass an instance (not the class)."
        )
    return items


def _bad_callback(index: int, item: object, base: type) -> str:
    if isinstance(item, type) and issubclass(item, base):
        return f"[{index}] the class {item.__name__} (pass an instance: `{item.__name__}()`)"
    return f"[{index}] {seen(item)}"


def normalise_log_with(problems: list[str], log_with: object) -> tuple[Any, ...]:
    """Return ``log_with`` as a tuple of tracker names or trackers."""
    if log_with is None:
        return ()
    if isinstance(log_with, (str, Sequence)):
        items = (log_with,) if isinstance(log_with, str) else tuple(log_with)
        return items
    # a single tracker instance (accelerate.tracking.GeneralTracker)
    return (log_with,)


def unknown_keywords_message(
    owner: str, unknown: Sequence[str], accepted: Sequence[str], elsewhere: Mapping[str, str] | None = None
) -> str:
    """Python's message for unexpected keyword arguments, with the closest accepted names.

    ``elsewhere`` maps a keyword that belongs to another object to where it goes (a hint used
    instead of the closest names); the trainer's own map by default.

    Example:
        >>> unknown_keywords_message("SafeTrainer", ["max_epoch"], ["max_epochs", "max_steps"])
        "SafeTrainer got an unexpected keyword argument 'max_epoch'; did you mean `max_epochs`?"
    """
    hints = []
    unmatched = False
    places = _ELSEWHERE if elsewhere is None else elsewhere
    for name in unknown:
        close = _closest(name, accepted)
        if name in places:
            hints.append(places[name] + ".")
        elif close:
            hints.append("did you mean " + " or ".join(f"`{c}`" for c in close) + "?")
        else:
            hints.append("")
            unmatched = True
    if len(unknown) == 1:
        text = f"{owner} got an unexpected keyword argument {unknown[0]!r}"
        text += f"; {hints[0]}" if hints[0] else "."
    else:
        listed = ", ".join(f"{n!r}" + (f" ({h})" if h else "") for n, h in zip(unknown, hints, strict=True))
        text = f"{owner} got unexpected keyword arguments: {listed}."
    if unmatched:
        text += f" It accepts: {', '.join(accepted)}."
    return text


def _closest(name: str, accepted: Sequence[str]) -> list[str]:
    """The accepted names closest to ``name``: the best match, and any other about as close."""
    close = difflib.get_close_matches(name, accepted, n=3, cutoff=0.6)
    if not close:
        return []
    score = [difflib.SequenceMatcher(None, name, c).ratio() for c in close]
    return [c for c, r in zip(close, score, strict=True) if r >= score[0] - 0.05]


def name_unknown_keywords(init: _Init, elsewhere: Mapping[str, str] | None = None) -> _Init:
    """Make ``init`` (an ``__init__``) refuse unknown keywords with the closest accepted names.

    Still Python's ``TypeError``, raised before ``init`` runs; the signature seen by
    ``inspect.signature`` is ``init``'s own (``functools.wraps``). ``elsewhere``: as for
    :func:`unknown_keywords_message`.
    """
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(init).parameters.values()
    accepted = tuple(p.name for p in parameters if p.kind in kinds and p.name != "self")
    known = frozenset(accepted)

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [name for name in kwargs if name not in known]
        if unknown:
            raise TypeError(unknown_keywords_message(type(self).__name__, unknown, accepted, elsewhere))
        init(self, *args, **kwargs)

    return checked  # type: ignore[return-value]
