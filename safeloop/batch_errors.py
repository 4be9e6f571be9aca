"""Why a batch failed in the model or the loss: values no model takes, keys ``forward`` lacks.

Only error paths run this. When the model (or, for the targets, ``loss_fn``) raises on a batch
that holds what no model takes (text, bytes, PIL images, None, NumPy arrays), or on a batch key
that ``forward`` has no parameter for, :func:`explain_failure` raises a ``ConfigError`` that names
the place, the value and the fix, with torch's error as its ``__cause__``; a collate error of the
``DataLoader`` is explained by :func:`collate_problem`. Healthy steps never inspect anything.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch

from safeloop.errors import ConfigError, SafeLoopError

__all__ = ["collate_problem", "explain_failure", "find_unreadable", "unreadable_message"]

_MAX_WALK = 256  # items looked at per container
_SHOWN = 40  # characters of an example string
_UNEXPECTED_KEYWORD = re.compile(r"got an unexpected keyword argument '([^']+)'")
# keys that hold the targets under another name than the `labels` of Hugging Face models
_LABEL_LIKE = ("label", "label_ids", "labels_ids", "target", "targets", "y", "class", "class_id", "classes")


def _kind_of(value: object) -> str | None:
    """What a model cannot take in ``value``: "text", "bytes", "image", "None", "numpy", or None."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    if value is None:
        return "None"
    module = type(value).__module__
    if module.startswith("PIL."):  # PIL is not imported: only its images are recognised
        return "image"
    if module == "numpy" and hasattr(value, "dtype"):
        return "numpy"
    return None


def find_unreadable(value: object, path: str) -> tuple[str, str, object] | None:
    """The first place in ``value`` a model cannot take, as ``(path, kind, value)``.

    A tuple or list of one kind (the default collate turns a batch of strings into a tuple of
    them) is named as a whole: ``batch[0]``, not ``batch[0][0]``.
    """
    kind = _kind_of(value)
    if kind is not None:
        return path, kind, value
    if isinstance(value, Mapping):
        for key, item in list(value.items())[:_MAX_WALK]:
            found = find_unreadable(item, f"{path}[{key!r}]")
            if found is not None:
                return found
    elif isinstance(value, (tuple, list)) and value:
        kinds = {_kind_of(item) for item in value[:_MAX_WALK]}
        if len(kinds) == 1 and None not in kinds:
            return path, kinds.pop(), value  # type: ignore[return-value]
        for i, item in enumerate(value[:_MAX_WALK]):
            found = find_unreadable(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _short(text: str | bytes | bytearray) -> str:
    shown = " ".join(str(text if isinstance(text, str) else bytes(text)[:_SHOWN]).split())
    return repr(shown if len(shown) <= _SHOWN else shown[: _SHOWN - 3] + "...")


def _one(kind: str, value: object) -> str:
    if kind in ("text", "bytes"):
        return _short(value)  # type: ignore[arg-type]
    if kind == "image":
        size = getattr(value, "size", None)
        return f"a {type(value).__name__} (mode {getattr(value, 'mode', '?')}, size {size})"
    if kind == "numpy":
        shape, dtype = getattr(value, "shape", ()), getattr(value, "dtype", "?")
        return f"a numpy {type(value).__name__} of shape {shape} and dtype {dtype}"
    return "None"


def _shown(kind: str, value: object) -> str:
    """``value`` in a message: the container, its length and one example."""
    if isinstance(value, (tuple, list)):
        names = {
            "text": "str",
            "bytes": "bytes",
            "image": "PIL images",
            "None": "None",
            "numpy": "numpy values",
        }
        return f"a {type(value).__name__} of {len(value)} {names[kind]}, e.g. {_one(kind, value[0])}"
    return _one(kind, value)


def _collate_example(mapping: bool, key: str) -> str:
    if mapping:
        return (
            "        tokenizer = AutoTokenizer.from_pretrained(name)\n"
            "        def collate(samples):\n"
            f'            batch = tokenizer([s["{key}"] for s in samples], padding=True, truncation=True,\n'
            '                              return_tensors="pt")\n'
            '            batch["labels"] = torch.tensor([s["label"] for s in samples])\n'
            "            return batch\n"
            "        DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=collate)\n"
            "    With a Hugging Face `datasets.Dataset`: `dataset.map(tokenize, batched=True, "
            "remove_columns=[...])` and `collate_fn=DataCollatorWithPadding(tokenizer)`."
        )
    return (
        "        tokenizer = AutoTokenizer.from_pretrained(name)\n"
        "        def collate(samples):\n"
        "            texts, labels = zip(*samples)\n"
        '            encoded = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")\n'
        '            return encoded["input_ids"], torch.tensor(labels)\n'
        "        DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=collate)"
    )


def unreadable_message(
    found: tuple[str, str, object],
    call: str,
    exc: BaseException | None,
    *,
    targets: bool,
    key: str | None,
    first_fix: str = "",
) -> str:
    """What the batch holds at ``found``, why the model cannot take it, and the fix.

    ``key`` is the key of a mapping batch that holds it (None for other batches); ``first_fix``
    a sentence that goes before the usual fix.
    """
    path, kind, value = found
    what = {
        "text": "text",
        "bytes": "raw bytes",
        "image": "PIL images",
        "None": "None",
        "numpy": "NumPy values",
    }[kind]
    held = f"the batch holds {what}: `{path}` is {_shown(kind, value)}."
    head = f"{call} raised {type(exc).__name__}: {held}" if exc is not None else held[:1].upper() + held[1:]
    if path == "batch":  # the batch is the texts themselves, with no targets
        head += " A batch is read as `(inputs, targets)`: return both from the dataset."
    if targets and kind == "text":
        fix = (
            " Losses take class indices, not label names: map each label to an int in the dataset, "
            "e.g. `index = {name: i for i, name in enumerate(sorted(set(all_labels)))}` and return "
            "`torch.tensor(index[label])`."
        )
    elif kind == "text":
        fix = (
            " Models take tensors, so the DataLoader must yield them: tokenise the text and return "
            "tensors, in the dataset's `__getitem__` or in a `collate_fn`, e.g.\n"
            + _collate_example(key is not None, key or "text")
        )
    elif kind == "bytes":
        fix = (
            " Models take tensors: decode them in the dataset (`.decode()` then tokenise the text and "
            "return tensors; image bytes into a tensor) or in a `collate_fn`."
        )
    elif kind == "image":
        fix = (
            " Models take tensors: convert each image in the dataset's transform, e.g. "
            "`transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])` from "
            "torchvision, then the default collate stacks them."
        )
    elif kind == "numpy":
        fix = (
            " Models take tensors: convert with `torch.from_numpy(array)` in the dataset or the "
            "`collate_fn` (the default collate does it; a custom `collate_fn` must too)."
        )
    else:
        fix = (
            " The dataset returned None there (a missing value, or a `__getitem__` without "
            "`return`?): return a tensor, or drop such samples in a `collate_fn`."
        )
    cause = "" if exc is None else f"\n(the original error: {type(exc).__name__}: {_first_line(exc)})"
    return head + first_fix + fix + cause


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


def _forward_parameters(model: torch.nn.Module) -> tuple[str, list[str], bool]:
    """``(signature text, parameter names, takes **kwargs)`` of the unwrapped model's ``forward``."""
    inner: Any = model
    for _ in range(8):  # DDP, FSDP, DeepSpeed and torch.compile wrappers
        nested = getattr(inner, "module", None)
        if not isinstance(nested, torch.nn.Module):
            nested = getattr(inner, "_orig_mod", None)
        if not isinstance(nested, torch.nn.Module):
            break
        inner = nested
    name = f"{type(inner).__name__}.forward"
    try:
        signature = inspect.signature(inner.forward)
    except (TypeError, ValueError):
        return name + "(...)", [], True
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [p.name for p in signature.parameters.values() if p.kind in kinds]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    return name + str(signature), params, var_kw


def _keyword_message(model: torch.nn.Module, batch: Mapping[Any, Any], exc: BaseException) -> str | None:
    """The message for ``forward() got an unexpected keyword argument`` naming a batch key, or None."""
    match = _UNEXPECTED_KEYWORD.search(str(exc)) if isinstance(exc, TypeError) else None
    if match is None or match.group(1) not in batch:
        return None
    key = match.group(1)
    signature, params, var_kw = _forward_parameters(model)
    if key in params:
        return None  # forward takes it: a call inside forward refused it, not the batch's doing
    closest = difflib.get_close_matches(key, params, n=1, cutoff=0.6)
    if "labels" in params and key.lower() in _LABEL_LIKE:
        closest = ["labels"]
    passed = (
        f" (`forward` takes `**kwargs` and passed `{key}` on to a call that does not accept it)"
        if var_kw
        else ""
    )
    if closest:
        fix = (
            f"Rename `{key}` to `{closest[0]}`, in the dataset or in a `collate_fn` "
            f'(`batch["{closest[0]}"] = batch.pop("{key}")`).'
        )
    else:
        fix = (
            f'Remove `{key}` from the batch (a Hugging Face dataset: `dataset.remove_columns(["{key}"])`), '
            "or pass `training_step=fn(model, batch) -> loss` to call the model yourself."
        )
    keys = ", ".join(f"`{k}`" for k in batch)
    return (
        f"`model(**batch)` raised TypeError: {_first_line(exc)}. A mapping batch is passed as keyword "
        f"arguments, so its keys must match the parameter names of `{signature}`; the batch's key "
        f"`{key}` is none of them{passed}. The batch's keys: {keys}. {fix}"
    )


_COLLATE_REFUSED = re.compile(r"default_collate: batch must contain [^;]*; found <class '([^']+)'>")
_NO_DTYPE = re.compile(r"Could not infer dtype of (\w+)")


def _in_collate(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in torch's collate (here, or in a worker whose traceback it quotes)."""
    if "_utils/collate.py" in str(exc):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith(
        ("_utils/collate.py", "_utils\\collate.py")
    )


def collate_problem(exc: BaseException) -> str | None:
    """The message for torch's default collate refusing a sample's value (a PIL image, None), or None.

    Example:
        >>> collate_problem(TypeError("default_collate: batch must contain tensors, numpy arrays, "
        ...                           "numbers, dicts or lists; found <class 'NoneType'>"))[:52]
        'The DataLoader could not collate a training batch: a'
    """
    match = _COLLATE_REFUSED.search(str(exc)) if isinstance(exc, TypeError) else None
    if match is None and isinstance(exc, RuntimeError) and _in_collate(exc):
        match = _NO_DTYPE.search(str(exc))  # numbers and a None: `torch.tensor([1, None])` refused
    if match is None:
        return None
    found = match.group(1)
    head = (
        f"The DataLoader could not collate a training batch: a sample holds a `{found}`, and torch's "
        "default `collate_fn` stacks only tensors, NumPy arrays, numbers, dicts and lists of them."
    )
    if found.startswith("PIL."):
        fix = (
            " Models take tensors: convert each image in the dataset's transform, e.g. "
            "`transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])` from torchvision."
        )
    elif found == "NoneType":
        fix = (
            " The dataset returned None for a sample or one of its fields (a missing value, or a "
            "`__getitem__` without `return`?): return a tensor or a number, or drop such samples in a "
            "`collate_fn`."
        )
    else:
        fix = f" Convert the `{found}` to a tensor in the dataset, or pass a `collate_fn` that does."
    return head + fix + f"\n(the original error: {type(exc).__name__}: {_first_line(exc)})"


def explain_failure(
    model: torch.nn.Module,
    batch: Any,
    part: Any,
    path: str,
    call: str,
    exc: Exception,
    *,
    targets: bool = False,
) -> None:
    """Raise a ``ConfigError`` from ``exc`` when ``part`` of the batch explains it; else return.

    Only the error path runs this. A mapping batch's value is blamed only when ``forward`` does
    not take its key by name (a model that takes text itself keeps its own errors).
    """
    if isinstance(exc, SafeLoopError):
        return
    found = find_unreadable(part, path)
    if path == "batch[0]":  # the model's input: a batch that is all strings is named as a whole
        whole = find_unreadable(batch, "batch")
        found = whole if whole is not None and whole[0] == "batch" else found
    key: str | None = None
    taken: list[str] = []
    if found is not None and isinstance(batch, Mapping):
        key = next((str(k) for k in batch if found[0].startswith(f"batch[{k!r}]")), None)
        _, params, var_kw = _forward_parameters(model)
        match = _UNEXPECTED_KEYWORD.search(str(exc))
        if key in params or (var_kw and (match is None or match.group(1) != key)):
            found = None
        else:
            taken = [f"`{k}`" for k in batch if k in params and isinstance(batch[k], torch.Tensor)]
    if found is not None:
        first_fix = ""
        if taken:
            first_fix = (
                f" The batch also holds tensors `forward` takes ({', '.join(taken)}): if the text is "
                f"tokenised already, drop the raw column `{key}` from the batch. Otherwise:"
            )
        message = unreadable_message(found, call, exc, targets=targets, key=key, first_fix=first_fix)
        raise ConfigError(message) from exc
    if isinstance(batch, Mapping):
        message = _keyword_message(model, batch, exc)
        if message is not None:
            raise ConfigError(message) from exc
