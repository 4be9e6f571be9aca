"""safeloop for Lightning users: ``from safeloop.lightning import SafeLoopCallback``.

``import safeloop`` never imports Lightning, and neither does ``import safeloop.lightning``: the
callback's module (which subclasses ``lightning.pytorch.Callback``) is imported when the name is
first asked for. Without the ``lightning`` package that raises an ``ImportError`` naming the
extra that installs it: ``pip install "safeloop[lightning]"``. See docs/lightning.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safeloop.lightning.callback import SafeLoopCallback

__all__ = ["SafeLoopCallback"]


def __getattr__(name: str) -> Any:
    # not kept in the module's globals: after the first time the imports below are dictionary
    # lookups, and an environment that loses Lightning gets the error that names the extra again
    if name != "SafeLoopCallback":
        raise AttributeError(f"module 'safeloop.lightning' has no attribute {name!r}")
    from safeloop.lightning.compat import missing_lightning_error

    try:
        import lightning.pytorch  # noqa: F401
    except ImportError as error:
        raise missing_lightning_error(error) from error
    from safeloop.lightning.callback import SafeLoopCallback

    return SafeLoopCallback
