"""The losses the first-batch checks know, and what each computes.

A loss module of ``torch.nn`` (subclasses included), a ``torch.nn.functional`` function, or a
``functools.partial`` of one is recognised; anything else (a lambda, a custom module) is not, and
the checks that need to know the loss give no finding for it rather than a guess.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LOSS_KINDS", "RecognisedLoss", "class_count", "recognise_loss", "recognised_loss"]

# kind: (``nn`` loss modules, ``torch.nn.functional`` functions) recognised; subclasses included.
LOSS_KINDS = {
    "ce": ("CrossEntropyLoss", "cross_entropy"),
    "nll": ("NLLLoss", "nll_loss"),
    "bce_logits": ("BCEWithLogitsLoss", "binary_cross_entropy_with_logits"),
    "bce": ("BCELoss", "binary_cross_entropy"),
    "regression": ("MSELoss L1Loss SmoothL1Loss HuberLoss", "mse_loss l1_loss smooth_l1_loss huber_loss"),
}


@dataclass(frozen=True)
class RecognisedLoss:
    """What a recognised loss computes.

    Its kind (a key of ``LOSS_KINDS``), its name as the user wrote it, and the ignored class index
    of the class losses (None for the others).
    """

    kind: str  # a key of LOSS_KINDS
    name: str
    ignore_index: int | None = None


def recognise_loss(loss_fn: Any) -> RecognisedLoss | None:
    """Return what ``loss_fn`` computes, or None when it is not a loss known here."""
    func, keywords = loss_fn, {}
    if isinstance(loss_fn, functools.partial):  # e.g. partial(F.cross_entropy, ignore_index=0)
        func, keywords = loss_fn.func, loss_fn.keywords
    for kind, (modules, functions) in LOSS_KINDS.items():
        classes = kind in ("ce", "nll")
        if any(isinstance(loss_fn, getattr(nn, m)) for m in modules.split()):
            return RecognisedLoss(kind, type(loss_fn).__name__, loss_fn.ignore_index if classes else None)
        if any(func is getattr(F, f) for f in functions.split()):
            return RecognisedLoss(
                kind, f"F.{func.__name__}", int(keywords.get("ignore_index", -100)) if classes else None
            )
    return None


def recognised_loss(loss_fn: Any) -> bool:
    """Whether the checks here know ``loss_fn`` (a loss module, an ``F.`` function or a partial of one).

    Example:
        >>> recognised_loss(F.cross_entropy), recognised_loss(lambda o, t: (o - t).abs().mean())
        (True, False)
    """
    return recognise_loss(loss_fn) is not None


def class_count(outputs: torch.Tensor) -> int:
    """The number of classes of ``outputs``: dimension 1 of (N, C, ...), or the length of (C,)."""
    return int(outputs.shape[1]) if outputs.dim() >= 2 else int(outputs.shape[0])
