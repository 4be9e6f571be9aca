"""What ``safeloop report`` does: read a run's record, draw each panel, write the PNGs and the page.

``report.html`` (or the ``-o`` name) and one PNG per panel beside it, named after it
(``report-loss.png``, ``report-lr.png``, ...). Every file is written to a temporary name and
renamed, so a report being rewritten is never seen half written.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from safeloop.report.optional import require_matplotlib
from safeloop.report.reading import find_record, read_run

__all__ = ["ReportFiles", "write_report"]

DPI = 100


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote.

    Attributes:
        page (`Path`): the HTML page.
        images (`list[Path]`): the PNGs beside it, in page order.
        notes (`list[str]`): the reader's notes on the record (also on the page).
    """

    page: Path
    images: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(target: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> ReportFiles:
    """Write the report of the run whose record is in ``target``.

    Args:
        target (`str | os.PathLike`): the run's ``checkpoint_dir``, or its ``metrics.jsonl``.
        output (`str | os.PathLike`, *optional*): the HTML file; default ``report.html`` beside
            the record.

    Returns:
        `ReportFiles`: the page and the PNGs written.

    Raises:
        ImportError: matplotlib is missing (the message names the extra).
        RecordError: no record, a damaged one, or one from a newer format.
    """
    require_matplotlib("safeloop report")
    from safeloop.report.html import page
    from safeloop.report.panels import draw_panel, panels_for

    record = find_record(target)
    data = read_run(record)
    out = Path(output) if output is not None else record.parent / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    images, written = [], []
    for panel in panels_for(data):
        figure = draw_panel(panel, data)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI)
        png = buffer.getvalue()
        path = out.with_name(f"{out.stem}-{panel.name}.png")
        _write(path, png)
        written.append(path)
        images.append((panel.name, panel.title, panel.caption, png))
    _write(out, page(data, images).encode("utf-8"))
    return ReportFiles(out, written, list(data.notes))
