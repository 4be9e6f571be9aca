"""The report as one self-contained HTML page: the PNGs embedded (base64), no script, no link out.

The page opens offline and can be mailed as one file: a headline (how the run ended, steps,
skips, rollbacks, baseline), the reader's notes, links to the sections, the findings (most
severe first, each with its fix), then each panel with how to read it.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from safeloop.report.data import RunData

__all__ = ["page"]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1120px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.source { color: #666; font-size: 0.9em; }
.summary { font-size: 1.05em; }
.notes { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 1em; }
.caption { color: #444; font-size: 0.92em; max-width: 60em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.finding { margin: 0.6em 0; padding: 0.4em 0.8em; border-left: 4px solid #999; background: #fafafa; }
.error { border-color: #d62728; } .warning { border-color: #ff7f0e; } .info { border-color: #999; }
.code { font-family: ui-monospace, monospace; font-weight: bold; }
.fix { margin-top: 0.3em; } .fix b { color: #2a7d2a; }
.contents { font-size: 0.9em; } a { color: #1f5fa8; text-decoration: none; }
"""


def _summary(data: RunData) -> str:
    end = data.end or {}
    status = data.status or "no end line: still running, or stopped without one (killed)"
    skips = len(data.events_of("skip"))
    rollbacks = len(data.events_of("rollback"))
    parts = [
        f"<b>{html.escape(status)}</b>",
        f"{data.last_step} step{'s' if data.last_step != 1 else ''}",
        f"{skips} skipped step{'s' if skips != 1 else ''}",
        f"{rollbacks} rollback{'s' if rollbacks != 1 else ''}",
    ]
    if data.events_of("reinit"):
        parts.append(f"{len(data.events_of('reinit'))} re-initialisation(s)")
    if data.history:
        first, last = data.history[0].get("loss"), data.history[-1].get("loss")
        if isinstance(first, (int, float)) and isinstance(last, (int, float)):
            parts.append(f"loss {first:.4g} &rarr; {last:.4g}")
    if end.get("eval_loss") is not None:
        parts.append(f"eval loss {end['eval_loss']:.4g}")
    if data.baseline_loss is not None:
        parts.append(f"baseline (constant prediction) {data.baseline_loss:.4g}")
    if end.get("error"):
        parts.append(f"ended by {html.escape(str(end['error']))}")
    return ", ".join(parts)


def _findings(data: RunData) -> str:
    if not data.findings:
        return "<p>No findings: the diagnostics saw nothing wrong (or ran with diagnostics=False).</p>"
    items = []
    for finding in data.findings:
        severity = str(finding.get("severity", "info"))
        count = f" &times;{finding['count']}" if finding.get("count", 1) > 1 else ""
        step = f" (first at step {finding['step']})" if finding.get("step") is not None else ""
        params = finding.get("params") or []
        where = (
            f"<div>in: {html.escape(', '.join(map(str, params[:8])))}{' ...' * (len(params) > 8)}</div>"
            if params
            else ""
        )
        fix = (
            f"<div class='fix'><b>fix:</b> {html.escape(str(finding['suggestion']))}</div>"
            if finding.get("suggestion")
            else ""
        )
        items.append(
            f"<div class='finding {html.escape(severity)}'><span class='code'>[{html.escape(severity)}] "
            f"{html.escape(str(finding.get('code')))}</span>{count}{step}"
            f"<div>{html.escape(str(finding.get('message', '')))}</div>{where}{fix}</div>"
        )
    return "\n".join(items)


def page(data: RunData, images: Sequence[tuple[str, str, str, bytes]]) -> str:
    """The HTML page.

    Args:
        data (`RunData`): the run.
        images (`Sequence[tuple[str, str, str, bytes]]`): each panel's (file name, title,
            caption, PNG bytes), in page order.

    Returns:
        `str`: the page, self-contained.
    """
    notes = ""
    if data.notes:
        notes = (
            "<div class='notes'><b>Notes on the record</b><ul>"
            + "".join(f"<li>{html.escape(note)}</li>" for note in data.notes)
            + "</ul></div>"
        )
    sections = []
    for name, title, caption, png in images:
        encoded = base64.b64encode(png).decode("ascii")
        sections.append(
            f"<h2 id='{html.escape(name)}'>{html.escape(title)}</h2>"
            f"<p class='caption'>{html.escape(caption)}</p>"
            f"<img alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>"
        )
    if not images:
        sections.append("<p>No log step in the record yet: nothing to draw.</p>")
    contents = " &middot; ".join(
        [f"<a href='#findings'>findings ({len(data.findings)})</a>"]
        + [f"<a href='#{html.escape(name)}'>{html.escape(title)}</a>" for name, title, _, _ in images]
    )
    # the findings come first: what is wrong and its fix, then the pictures that show it
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>safeloop report: {html.escape(data.source)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>safeloop run report</h1><div class='source'>{html.escape(data.source)}</div>"
        f"<p class='summary'>{_summary(data)}</p>{notes}<p class='contents'>{contents}</p>"
        f"<h2 id='findings'>Findings, most severe first ({len(data.findings)})</h2>{_findings(data)}"
        + "\n".join(sections)
        + "</body></html>\n"
    )
