"""What the built-in scanners share: the scan worker's report, asked for once per message.

A built-in scanner names the ``features`` of the analysis it needs; the
:class:`~dcrouter.email.scanning.runner.ScanRunner` asks a scan worker once
for all of a rule's scanners and puts the report in ``context.analysis``.  A
scanner used on its own (a plug-in author's test) asks its
:class:`~dcrouter.email.scanning.runner.ContentAnalysis` itself.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer

from dcrouter.email.scanning.types import ScanContext, ScannerError


class BuiltinScanner:
    """Base of the spam, virus and attachment scanners."""

    name = "builtin"
    builtin = True
    features: tuple[str, ...] = ()

    def __init__(self, analysis: Any = None) -> None:
        self.analysis = analysis

    @defer.inlineCallbacks
    def report(self, context: ScanContext) -> Any:
        """``(report, "")``, or ``(None, why)`` when the analysis failed."""
        if context.analysis is not None:
            return context.analysis, ""
        if context.analysis_error:
            return None, context.analysis_error
        analysis = self.analysis
        if analysis is None:
            from twisted.internet import reactor
            from dcrouter.email.scanning.pool import ScanPool
            from dcrouter.email.scanning.runner import ContentAnalysis
            analysis = self.analysis = ContentAnalysis(ScanPool.shared(reactor))
        try:
            report: Optional[dict] = yield analysis.analyse(
                context.spool_path, list(self.features), list(getattr(self, "blocked", ())))
        except ScannerError as e:
            return None, str(e)
        return report, ""
