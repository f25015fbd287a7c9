"""Views of a :class:`~gradscope.report.Report`: plots (matplotlib), tables (pandas) and the HTML page.

A view reads a finished or live report and draws it; it never touches the hot path, the device or
the rules. Views type their input with :class:`~gradscope.views.source.ReportData`, the part of a
report they read, so that ``gradscope.report`` can offer ``report.plot()`` without an import loop.
"""
