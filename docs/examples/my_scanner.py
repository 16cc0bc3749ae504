# docs/examples/my_scanner.py
"""A content scanner plug-in: flags messages that contain a banned phrase."""

from __future__ import annotations

from email.message import EmailMessage

from zope.interface import implementer

from dcrouter.email.scanning import ScanContext, ScanResult
from dcrouter.interfaces import IContentScanner


@implementer(IContentScanner)
class BannedPhraseScanner:
    """Verdict ``spam`` when the subject or a text part contains a banned phrase."""

    name = "phrases"

    def __init__(self, phrases: tuple[str, ...] = ("buy now", "act immediately")) -> None:
        self.phrases = tuple(p.lower() for p in phrases)

    def scan(self, message: EmailMessage, context: ScanContext) -> ScanResult:
        """Look at the subject and every text/* part (may also return a Deferred)."""
        texts = [str(message.get("Subject", ""))]
        for part in message.walk():
            if part.get_content_maintype() == "text":
                texts.append(part.get_content())
        found = [p for p in self.phrases if any(p in t.lower() for t in texts)]
        if found:
            # action: None lets the rule's `action` decide; "reject" / "tag" decide here
            return ScanResult(self.name, verdict="spam", score=float(len(found)),
                              details=found)
        return ScanResult(self.name)
