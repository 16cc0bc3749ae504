"""The virus scanner: the EICAR test signature built in, clamd when configured.

The built-in check is the scan worker's: the EICAR string in any decoded
part or unpacked ZIP member (:mod:`dcrouter.email.scanning.analysis`).
"""

from __future__ import annotations

from email.message import Message
from typing import Any, Optional

from twisted.internet import defer
from zope.interface import implementer

from dcrouter.email.scanning.analysis import EICAR
from dcrouter.email.scanning.builtin import BuiltinScanner
from dcrouter.email.scanning.types import ScanContext, ScannerError, ScanResult
from dcrouter.interfaces import IContentScanner


@implementer(IContentScanner)
class VirusScanner(BuiltinScanner):
    """EICAR in every MIME part (and ZIP member), then clamd's verdict if given."""

    name = "virus"
    features = ("eicar",)

    def __init__(self, clamd: Any = None, analysis: Any = None) -> None:
        super().__init__(analysis)
        self.clamd = clamd

    @defer.inlineCallbacks
    def scan(self, message: Optional[Message], context: ScanContext) -> Any:
        """Fires with a ScanResult (verdict virus or clean; error when nothing could look)."""
        report, error = yield self.report(context)
        if report is not None and report["eicar"]:
            return ScanResult(self.name, "virus", details=["Eicar-Test-Signature"])
        if self.clamd is not None:
            try:
                signature = yield self.clamd.scan_file(context.spool_path)
            except ScannerError as e:  # clean as far as the built-in check sees; error noted
                if report is None:
                    return ScanResult(self.name, "error", error=f"{error}; {e}")
                return ScanResult(self.name, "clean", error=str(e))
            if signature:
                return ScanResult(self.name, "virus", details=[signature])
            if report is None:   # clamd looked; the built-in check could not
                return ScanResult(self.name, "clean", error=error)
        if report is None:
            return ScanResult(self.name, "error", error=error)
        return ScanResult(self.name, "clean")


__all__ = ["EICAR", "VirusScanner"]
