"""The attachment scanner: blocked file extensions in MIME names and inside ZIPs.

Every part is checked (nested multiparts and attached messages included, as
far as ``[email.scan_limits]`` allows) by both its Content-Disposition
``filename`` and Content-Type ``name`` (RFC 2231 and RFC 2047 decoded);
names inside ZIP attachments (and ZIPs inside those) too - the names come
from the scan worker's report (:mod:`dcrouter.email.scanning.analysis`).
Trailing dots and spaces, which Windows ignores, are stripped first, so
``invoice.pdf.exe.`` counts as ``.exe``; a name whose last extension is
blocked is caught whatever comes before it (``invoice.pdf.exe``), and a
blocked extension hidden before a harmless one (``payload.exe.txt``) is
reported as a double extension too.
"""

from __future__ import annotations

import posixpath
from email.message import Message
from typing import Any, Iterable, Optional

from twisted.internet import defer
from zope.interface import implementer

from dcrouter.email.scanning.builtin import BuiltinScanner
from dcrouter.email.scanning.types import ScanContext, ScanResult
from dcrouter.interfaces import IContentScanner


def normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """``["EXE", ".bat"]`` -> ``(".exe", ".bat")``."""
    return tuple("." + e.lower().lstrip(".") for e in extensions if e.strip("."))


def blocked_reason(name: str, blocked: tuple[str, ...]) -> Optional[str]:
    """Why ``name`` is blocked (``"payload.exe"``, ``"double extension"``) or None."""
    base = posixpath.basename(name.replace("\\", "/")).strip().rstrip(". ").lower()
    if not base:
        return None
    for ext in blocked:
        if base.endswith(ext):
            return "extension " + ext
    pieces = base.split(".")
    if len(pieces) > 2:
        for inner in pieces[1:-1]:
            if "." + inner in blocked:
                return "double extension ." + inner
    return None


def find_blocked(names: Iterable[Any], blocked: tuple[str, ...], scan_zip: bool = True
                 ) -> list[str]:
    """``"path: why"`` for every blocked name of a report's ``names``."""
    found: list[str] = []
    for display, name, archived in names:
        if archived and not scan_zip:
            continue
        why = blocked_reason(name, blocked)
        if why:
            found.append(f"{display}: {why}")
    return found


@implementer(IContentScanner)
class AttachmentScanner(BuiltinScanner):
    """Refuses (or tags) messages carrying files with blocked extensions."""

    name = "attachment"

    def __init__(self, blocked_extensions: Iterable[str], scan_zip: bool = True,
                 analysis: Any = None) -> None:
        super().__init__(analysis)
        self.blocked = normalise_extensions(blocked_extensions)
        self.scan_zip = scan_zip
        self.features = ("names", "archives") if scan_zip else ("names",)

    @defer.inlineCallbacks
    def scan(self, message: Optional[Message], context: ScanContext) -> Any:
        """Fires with a ScanResult (verdict blocked or clean; error without a report)."""
        report, error = yield self.report(context)
        if report is None:
            return ScanResult(self.name, "error", error=error)
        found = find_blocked(report["names"], self.blocked, self.scan_zip)
        return ScanResult(self.name, "blocked" if found else "clean", details=found)
