"""The report's optional dependency: matplotlib (with NumPy), installed by the ``report`` extra.

Checked before anything draws, so that a missing extra is one clear sentence naming the extra,
never a traceback from deep inside the drawing code. This module imports nothing else.
"""

from __future__ import annotations

__all__ = ["REPORT_EXTRA", "MissingExtra", "require_matplotlib"]

REPORT_EXTRA = 'pip install "safeloop[report]"'


class MissingExtra(ImportError):
    """matplotlib (the ``report`` extra) is not installed; the message says how to install it."""


def require_matplotlib(what: str) -> None:
    """Raise a clear ``ImportError`` when matplotlib or NumPy cannot be imported.

    Args:
        what (`str`): who needs them (``"safeloop report"``, ``"FitResult.plot"``).

    Raises:
        MissingExtra: an ``ImportError`` naming the extra that installs them.
    """
    try:
        import matplotlib  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as error:
        raise MissingExtra(
            f"{what} needs matplotlib, which is not installed ({error}); install the report extra: "
            f"{REPORT_EXTRA}"
        ) from None
