"""Content scanning of process mode: types, built-in scanners and the spamd/clamd clients.

* :class:`ScanContext`, :class:`ScanResult` - what a scanner gets and gives
  (any :class:`dcrouter.interfaces.IContentScanner` plug-in uses them too).
* :class:`SpamScanner` (built-in rules + spamd), :class:`VirusScanner`
  (EICAR + clamd), :class:`AttachmentScanner` (extensions, ZIP contents);
  their CPU work is one bounded pass in a scan worker process
  (:mod:`.analysis`, :mod:`.mimewalk`, :mod:`.archive` under :mod:`.limits`,
  run by :mod:`.pool`), put together by :class:`ScanRunner` (:mod:`.runner`).
* :func:`build_scanner` - a rule's ``[[...scanners]]`` entry to a scanner.
"""

from __future__ import annotations

from typing import Any, Optional

from dcrouter.email.scanning.types import (
    REASON_TEXT, ScanContext, ScannerError, ScanResult, VERDICTS,
)
from dcrouter.email.scanning.attachment import AttachmentScanner  # noqa: E402
from dcrouter.email.scanning.clamd import ClamdClient  # noqa: E402
from dcrouter.email.scanning.spam import SpamScanner  # noqa: E402
from dcrouter.email.scanning.spamd import SpamdClient  # noqa: E402
from dcrouter.email.scanning.virus import VirusScanner  # noqa: E402
from dcrouter.email.scanning.runner import ContentAnalysis, ScanOutcome, ScanRunner  # noqa: E402


def build_scanner(options: Any, spamd: Optional[SpamdClient] = None,
                  clamd: Optional[ClamdClient] = None, path: str = "scanner",
                  analysis: Any = None) -> Any:
    """The scanner for one ``ScannerOptions`` entry (built-in, or ``package.module:Class``).

    ``analysis`` (a :class:`~dcrouter.email.scanning.runner.ContentAnalysis`)
    is where built-in scanners get their report when the runner gave none."""
    if ":" in options.type:
        from dcrouter.errors import ConfigError
        from dcrouter.interfaces import IContentScanner
        from dcrouter.email.transform import load_class
        factory = load_class(options.type, f"{path}.type")
        try:
            scanner = factory()
        except TypeError as e:
            raise ConfigError(f"{path}.type", f"cannot build '{options.type}': {e}") from None
        if not IContentScanner.providedBy(scanner) and not callable(getattr(scanner, "scan",
                                                                            None)):
            raise ConfigError(f"{path}.type", f"'{options.type}' is not an IContentScanner")
        return scanner
    if options.type == "spam":
        return SpamScanner(options.threshold, spamd if options.use_spamd else None, analysis)
    if options.type == "virus":
        return VirusScanner(clamd if options.use_clamd else None, analysis)
    if options.type == "attachment":
        return AttachmentScanner(options.blocked_extensions, options.scan_zip, analysis)
    raise ValueError(f"unknown scanner type {options.type!r}")


__all__ = ["AttachmentScanner", "ClamdClient", "ContentAnalysis", "REASON_TEXT", "ScanContext",
           "ScanOutcome", "ScanResult", "ScanRunner",
           "ScannerError", "SpamScanner", "SpamdClient", "VERDICTS", "VirusScanner",
           "build_scanner"]
