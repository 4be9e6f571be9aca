"""Dispatch of the user's callbacks: the one object that hands the trainer to them.

Components report through a :class:`CallbackList` (``call("on_finding", finding)``) without ever
holding the trainer; the list adds it as each hook's first argument. It imports neither the
trainer nor the ``Callback`` base class, so that no component depends on either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["CallbackList"]


class CallbackList:
    """Calls a hook on every callback, in the order they were given, with the trainer first.

    Args:
        callbacks (`Sequence[Callback]`): the user's callbacks (validated by the config).
        trainer (`SafeTrainer`, *optional*): passed to every hook as its first argument.
    """

    def __init__(self, callbacks: Sequence[Any], trainer: object = None) -> None:
        self.callbacks = tuple(callbacks)
        self.trainer = trainer

    def call(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on each callback with the trainer, then ``args``.

        Args:
            hook (`str`): a method name of ``safeloop.Callback``.
            *args: the hook's arguments after the trainer.
        """
        for callback in self.callbacks:
            getattr(callback, hook)(self.trainer, *args)
