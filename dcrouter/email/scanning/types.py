"""The records scanners receive and return: :class:`ScanContext` and :class:`ScanResult`."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from dcrouter.errors import DcRouterError

#: Verdicts a scanner may return; everything except clean and error is "flagged".
#: ``unscannable``: the built-in scan passed one of its limits or met a broken archive.
VERDICTS = ("clean", "spam", "virus", "blocked", "unscannable", "error")

#: What the client is told for each flagged verdict (a class, never internals).
REASON_TEXT = {
    "spam": "spam detected",
    "virus": "virus detected",
    "blocked": "blocked attachment type",
    "unscannable": "content exceeds scanning limits",
}


class ScannerError(DcRouterError):
    """A scanner could not reach a verdict (peer down, timeout, protocol error)."""


@dataclasses.dataclass
class ScanContext:
    """What a scanner knows besides the parsed message.

    ``options`` is the rule's :class:`~dcrouter.config.email.ScannerOptions`
    for built-in scanners (None for plug-ins run on every process rule).
    """

    mail_from: str
    recipients: list[str]
    size: int
    spool_path: str
    session: Any = None
    rule_pattern: str = ""
    options: Any = None
    correlation_id: str = ""
    #: The scan worker's report for built-in scanners (see scanning.analysis), once made.
    analysis: Optional[dict] = None
    #: Why there is no report (the worker failed or timed out), if so.
    analysis_error: str = ""


@dataclasses.dataclass
class ScanResult:
    """A scanner's verdict.

    ``score`` and ``threshold`` matter for spam; ``details`` lists rule,
    signature or file names (for headers and logs, not for the client);
    ``action`` lets a plug-in scanner ask for ``"tag"`` or ``"reject"``
    itself (built-in scanners take it from the configuration).
    """

    scanner: str
    verdict: str = "clean"
    score: float = 0.0
    threshold: Optional[float] = None
    details: list[str] = dataclasses.field(default_factory=list)
    action: Optional[str] = None
    error: str = ""
    #: Client-facing reason when the verdict's class is not enough.
    reason: str = ""

    @property
    def flagged(self) -> bool:
        """True for spam, virus or blocked."""
        return self.verdict not in ("clean", "error")

    @property
    def reason_text(self) -> str:
        """Client-facing reason class (``virus detected``)."""
        if self.reason:
            return self.reason
        return REASON_TEXT.get(self.verdict, f"{self.verdict} detected")

    def summary(self) -> str:
        """``spam=flagged(7.5/5.0)``, ``virus=virus``, ``attachment=clean``, ``x=error``;
        ``+error`` marks a verdict reached while one engine failed (spamd or clamd down)."""
        if self.verdict == "error":
            return f"{self.scanner}=error"
        if self.error:  # a partial verdict: one of the scanner's engines failed
            return self._verdict_text() + "+error"
        return self._verdict_text()

    def _verdict_text(self) -> str:
        if self.threshold is not None:
            return f"{self.scanner}={'flagged' if self.flagged else 'clean'}" \
                   f"({self.score:.1f}/{self.threshold:.1f})"
        if self.flagged:
            return f"{self.scanner}={self.verdict}"
        return f"{self.scanner}=clean"
