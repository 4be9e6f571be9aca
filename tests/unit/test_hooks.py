"""CallbackList: calls defined hooks in order, skips Callback's inherited no-ops."""

from __future__ import annotations

from typing import Any

from safeloop import Callback
from safeloop.hooks import CallbackList, _inherits_noop


class _Counting(Callback):
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def on_after_backward(self, trainer: Any) -> None:
        self.log.append(f"{self.name}:after_backward")


class _Plain:  # duck-typed, not a Callback subclass: every hook it has is its own
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def on_after_backward(self, trainer: Any) -> None:
        self.log.append("plain")


def test_defined_hooks_run_in_order_with_the_trainer_first() -> None:
    log: list[str] = []
    seen: list[object] = []

    class _Seeing(Callback):
        def on_skip(self, trainer: Any, event: Any) -> None:
            seen.append((trainer, event))

    trainer = object()
    hooks = CallbackList([_Counting(log, "a"), _Plain(log), _Counting(log, "b"), _Seeing()], trainer)
    hooks.call("on_after_backward")
    CallbackList([_Counting(log, "c"), _Seeing()], trainer).call("on_skip", "event")
    assert log == ["a:after_backward", "plain", "b:after_backward"]
    assert seen == [(trainer, "event")]


def test_inherited_noops_are_not_called_and_overrides_are() -> None:
    class _Subclassed(_Counting):  # inherits an override from a subclass: still defined
        pass

    log: list[str] = []
    assert _inherits_noop(Callback(), "on_after_backward")
    assert not _inherits_noop(_Counting(log, "a"), "on_after_backward")
    assert not _inherits_noop(_Subclassed(log, "s"), "on_after_backward")
    assert _inherits_noop(_Counting(log, "a"), "on_train_batch_end")
    hooks = CallbackList([Callback(), _Counting(log, "a")])
    hooks.call("on_train_batch_end", None, None, 0)  # nobody defines it: nothing runs
    assert hooks._defining["on_train_batch_end"] == ()
    assert len(hooks._defining) == 1


def test_a_hook_set_on_the_instance_is_called() -> None:
    log: list[str] = []
    callback = Callback()
    callback.on_after_backward = lambda trainer: log.append("instance")  # type: ignore[method-assign]
    CallbackList([callback]).call("on_after_backward")
    assert log == ["instance"]


def test_callbacks_added_later_are_seen() -> None:
    log: list[str] = []
    hooks = CallbackList([_Counting(log, "a")])
    hooks.call("on_after_backward")
    hooks.callbacks += (_Counting(log, "late"),)
    hooks.call("on_after_backward")
    assert log == ["a:after_backward", "a:after_backward", "late:after_backward"]
