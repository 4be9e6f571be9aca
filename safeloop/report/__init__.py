"""The run's record on disk (``metrics.jsonl``) and the pictures drawn from it.

- :mod:`safeloop.report.format`: the record's line format and its version (no dependencies).
- :mod:`safeloop.report.record`: the writer the trainer appends to at each log step.
- :mod:`safeloop.report.trace`: the same values kept in memory, bounded, for ``FitResult.plot``.
- :mod:`safeloop.report.reading`: reading a record back, with clear errors for bad files.
- :mod:`safeloop.report.data`: one view of a run (lineage, abandoned branches) from a record
  or from a ``FitResult`` in memory.
- :mod:`safeloop.report.optional`: the check that matplotlib (the ``report`` extra) is there.
- :mod:`safeloop.report.series`, :mod:`safeloop.report.figures`, :mod:`safeloop.report.heatmaps`,
  :mod:`safeloop.report.panels`, :mod:`safeloop.report.html`, :mod:`safeloop.report.render`:
  downsampling, the line panels and the marks, the per-layer heat maps, the panel list and the
  stacked figure, the HTML page, and the ``safeloop report`` command's work (matplotlib and NumPy
  are imported by these only, after the check).

This package imports nothing itself: the trainer imports only the writer and the trace, and a run
without the ``report`` extra never loads matplotlib. See docs/report.md.
"""
