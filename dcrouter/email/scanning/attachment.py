"""The attachment scanner: blocked file extensions in MIME names and inside ZIPs.

Every leaf part is checked (nested multiparts and attached messages
included) by both its Content-Disposition ``filename`` and Content-Type
``name`` (RFC 2231 encodings decoded); names inside ZIP attachments (and
ZIPs inside those) too.  Trailing dots and spaces, which Windows ignores,
are stripped first, so ``invoice.pdf.exe.`` counts as ``.exe``; a name
whose last extension is blocked is caught whatever comes before it
(``invoice.pdf.exe``), and a blocked extension hidden before a harmless
one (``payload.exe.txt``) is reported as a double extension too.
"""

from __future__ import annotations

import posixpath
from email.message import Message
from typing import Any, Iterable, Optional

from twisted.internet import defer, threads
from zope.interface import implementer

from dcrouter.email.scanning import mime
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


def find_blocked(message: Message, blocked: tuple[str, ...], scan_zip: bool = True
                 ) -> list[str]:
    """``"name: why"`` for every blocked name in the message (blocking)."""
    found: list[str] = []
    for part in mime.leaf_parts(message):
        names = mime.part_filenames(part)
        for name in names:
            why = blocked_reason(name, blocked)
            if why:
                found.append(f"{name}: {why}")
        if scan_zip and mime.is_zip(part, names):
            for member in mime.zip_member_names(mime.decoded_payload(part)):
                why = blocked_reason(member, blocked)
                if why:
                    found.append(f"{names[0] if names else 'zip'}/{member}: {why}")
    return found


@implementer(IContentScanner)
class AttachmentScanner:
    """Refuses (or tags) messages carrying files with blocked extensions."""

    name = "attachment"

    def __init__(self, blocked_extensions: Iterable[str], scan_zip: bool = True) -> None:
        self.blocked = normalise_extensions(blocked_extensions)
        self.scan_zip = scan_zip

    @defer.inlineCallbacks
    def scan(self, message: Message, context: ScanContext) -> Any:
        """Fires with a ScanResult (verdict blocked or clean)."""
        found = yield threads.deferToThread(find_blocked, message, self.blocked, self.scan_zip)
        return ScanResult(self.name, "blocked" if found else "clean", details=found)
