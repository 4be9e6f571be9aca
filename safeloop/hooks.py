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
        self.trainer = trainer
        # per hook, the callbacks that define it: four hooks fire every step, and a callback that
        # leaves one to ``Callback``'s no-op would cost a call per step for nothing
        self._defining: dict[str, tuple[Any, ...]] = {}
        self.callbacks = tuple(callbacks)

    @property
    def callbacks(self) -> tuple[Any, ...]:
        """The callbacks, in call order."""
        return self._callbacks

    @callbacks.setter
    def callbacks(self, callbacks: Sequence[Any]) -> None:
        self._callbacks = tuple(callbacks)
        self._defining.clear()

    def call(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on each callback with the trainer, then ``args``.

        Callbacks that inherit the hook from ``safeloop.Callback`` unchanged (a no-op) are
        skipped.

        Args:
            hook (`str`): a method name of ``safeloop.Callback``.
            *args: the hook's arguments after the trainer.
        """
        defining = self._defining.get(hook)
        if defining is None:
            defining = self._defining[hook] = tuple(c for c in self._callbacks if not _inherits_noop(c, hook))
        for callback in defining:
            getattr(callback, hook)(self.trainer, *args)


def _inherits_noop(callback: Any, hook: str) -> bool:
    """Whether ``callback``'s ``hook`` is ``safeloop.Callback``'s own no-op (not overridden), or absent."""
    if hook in getattr(callback, "__dict__", {}):  # set on the instance
        return False
    function = getattr(type(callback), hook, None)
    if function is None:  # an internal hooks object (the run record's) without this hook: nothing to do
        return True
    # by name, so that this module need not import the Callback class
    return getattr(function, "__qualname__", None) == f"Callback.{hook}" and (
        getattr(function, "__module__", None) == "safeloop.callbacks"
    )
