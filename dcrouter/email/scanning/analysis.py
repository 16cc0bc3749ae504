"""One bounded pass over a spool file for all built-in scanners (run in a scan worker).

:func:`analyse_file` walks the message once (:mod:`.mimewalk`), unpacks ZIP
attachments and ZIPs inside them (:mod:`.archive`), all under one
:class:`~dcrouter.email.scanning.limits.Budget`, and returns a report (a dict
that JSON carries from the worker to the gateway):

``names``
    ``[display, name, archived]`` for every attachment name (Content-Disposition
    ``filename``, Content-Type ``name``, RFC 2231 and RFC 2047 decoded) and
    every name inside a ZIP: the attachment scanner checks them.  Given
    ``blocked`` extensions, only the names they block are listed (the reply
    stays small whatever the archive holds); ``names_seen`` counts them all.
``eicar``
    the EICAR test string was in a decoded part or an unpacked member.
``spam``
    ``{"score", "rules"}`` of the built-in scorer over the first
    :data:`TEXT_LIMIT` bytes of text.
``verdict``
    None, or ``{"kind": "limits"|"unscannable", "signature", "detail"}`` when a
    budget was passed or an archive is broken; what was found before it
    stays in the report.
``notes``, ``spent``, ``cpu``
    what was not scanned (encrypted members), the budget spent, CPU seconds.

``features`` says what is needed: ``names`` (MIME names), ``archives`` (names
inside ZIPs), ``eicar`` (content of parts and members), ``spam`` (text).
"""

from __future__ import annotations

import os
import resource
import tempfile
from email.header import decode_header, make_header
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Any, Iterable, Optional

from dcrouter.email.scanning import archive, mimewalk
from dcrouter.email.scanning.limits import Budget, Limits, LimitExceeded, ScanVerdict

#: The EICAR anti-virus test file (68 bytes); split so this source is not itself flagged.
EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")

#: Text bytes (all text parts together) the spam rules look at, as spamc's default size.
TEXT_LIMIT = 512 * 1024
#: Longest name kept in a report.
MAX_NAME = 1024

FEATURES = ("names", "archives", "eicar", "spam")
_ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/x-zip")


def _decode_words(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (ValueError, LookupError, UnicodeError, Exception):  # noqa: BLE001 - any odd header
        return value


def _unescape(value: str) -> str:
    """Raw 8-bit header bytes (read as Latin-1 by the walker) as UTF-8 when they are."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def part_names(headers: Message) -> list[str]:
    """Every name a part carries: Content-Disposition filename and Content-Type name."""
    names: list[str] = []
    for header, param in (("content-disposition", "filename"), ("content-type", "name")):
        try:
            value = headers.get_param(param, header=header)
        except (ValueError, LookupError, TypeError):
            value = None
        if value is None:
            continue
        if isinstance(value, tuple):   # RFC 2231: (charset, language, text)
            try:
                value = collapse_rfc2231_value(value)
            except (LookupError, UnicodeError, TypeError):
                value = value[2]
        text = _decode_words(_unescape(str(value))).strip().strip('"')[:MAX_NAME]
        if text and text not in names:
            names.append(text)
    return names


class _EicarSearch:
    """Streaming search for the EICAR string across chunk borders."""

    def __init__(self, findings: "Findings") -> None:
        self.findings = findings
        self.tail = b""

    def feed(self, data: bytes) -> None:
        if self.findings.eicar:
            return
        window = self.tail + data
        if EICAR in window:
            self.findings.eicar = True
        self.tail = window[-(len(EICAR) - 1):]

    def close(self) -> None:
        self.tail = b""


class Findings:
    """What the walk found (names, EICAR, text, notes); also the archive reader's sink."""

    def __init__(self, features: Iterable[str],
                 blocked: Optional[tuple[str, ...]] = None) -> None:
        self.features = set(features)
        self.blocked = blocked
        self.names: list[list[Any]] = []
        self.names_seen = 0
        self.eicar = False
        self.notes: list[str] = []
        self.texts: list[tuple[str, str]] = []
        self.text_bytes = 0
        self.top: Optional[Message] = None

    def add_name(self, display: str, name: str, archived: bool) -> None:
        """A name seen (kept once; only blocked ones when ``blocked`` was given)."""
        self.names_seen += 1
        if self.blocked is not None:
            from dcrouter.email.scanning.attachment import blocked_reason
            if not blocked_reason(name, self.blocked):
                return
        entry = [display[:2 * MAX_NAME], name[:MAX_NAME], archived]
        if entry not in self.names[-8:]:
            self.names.append(entry)

    def note(self, text: str) -> None:
        """Something not scanned."""
        if len(self.notes) < 100:
            self.notes.append(text[:2 * MAX_NAME])

    def content(self, where: str) -> Any:
        """A sink for content (EICAR search), or None when not wanted."""
        return _EicarSearch(self) if "eicar" in self.features else None


class _Fanout:
    """Feeds one leaf's bytes to several sinks; detects a ZIP by its first bytes."""

    def __init__(self, analyser: "_Analyser", headers: Message, path: str, depth: int,
                 names: list[str]) -> None:
        self.analyser = analyser
        self.path = path
        self.depth = depth
        self.names = names
        self.sinks: list[Any] = []
        self.head = b""
        self.spool: Any = None
        features = analyser.findings.features
        ctype = headers.get_content_type()
        self.maybe_zip = bool({"archives", "eicar"} & features)
        self.zip_declared = ctype in _ZIP_TYPES or any(n.lower().endswith(".zip") for n in names)
        self.message = ctype == "message/rfc822" or any(n.lower().endswith(".eml")
                                                         for n in names)
        if self.message or (self.maybe_zip and self.zip_declared):
            self.spool = self._new_spool()
        content = analyser.findings.content(path)
        if content is not None:
            self.sinks.append(content)
        if "spam" in features and ctype in ("text/plain", "text/html") \
                and headers.get_content_disposition() != "attachment":
            self.sinks.append(_TextCollector(analyser.findings, headers))

    def _new_spool(self) -> Any:
        return tempfile.SpooledTemporaryFile(max_size=1 << 20, dir=self.analyser.tmp_dir)

    def feed(self, data: bytes) -> None:
        if len(self.head) < 4:
            self.head += data[:4 - len(self.head)]
            if self.spool is None and self.maybe_zip and archive.is_zip_magic(self.head):
                self.spool = self._new_spool()
        for sink in self.sinks:
            sink.feed(data)
        if self.spool is not None:
            self.spool.write(data)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        spool, self.spool = self.spool, None
        if spool is None:
            return
        with spool:
            size = spool.tell()
            if not size:
                return
            spool.seek(0)
            where = self.names[0] if self.names else self.path
            if self.message and not archive.is_zip_magic(self.head):
                mimewalk.walk(spool, self.analyser.budget, self.analyser, where + "/message",
                              self.depth + 1)
            elif self.maybe_zip:
                archive.inspect_zip(spool, size, where, self.depth + 1, self.analyser.budget,
                                    self.analyser.findings,
                                    "eicar" in self.analyser.findings.features,
                                    self.analyser.tmp_dir)


class _TextCollector:
    """The first bytes of a text part, decoded by its charset, for the spam rules."""

    def __init__(self, findings: Findings, headers: Message) -> None:
        self.findings = findings
        self.subtype = headers.get_content_subtype()
        self.charset = headers.get_content_charset() or "utf-8"
        self.parts: list[bytes] = []

    def feed(self, data: bytes) -> None:
        room = TEXT_LIMIT - self.findings.text_bytes
        if room > 0:
            piece = data[:room]
            self.parts.append(piece)
            self.findings.text_bytes += len(piece)

    def close(self) -> None:
        raw = b"".join(self.parts)
        try:
            text = raw.decode(self.charset, "replace")
        except LookupError:
            text = raw.decode("utf-8", "replace")
        self.findings.texts.append((self.subtype, text))


class _Analyser:
    """The walker's handler: names of every entity, sinks for the leaves."""

    def __init__(self, findings: Findings, budget: Budget, tmp_dir: Optional[str]) -> None:
        self.findings = findings
        self.budget = budget
        self.tmp_dir = tmp_dir

    def entity(self, headers: Message, path: str, depth: int) -> None:
        if self.findings.top is None:
            self.findings.top = headers
        if {"names", "archives"} & self.findings.features:
            for name in part_names(headers):
                self.findings.add_name(name, name, False)

    def leaf(self, headers: Message, path: str, depth: int) -> Any:
        return _Fanout(self, headers, path, depth, part_names(headers))


def analyse_file(path: str, features: Iterable[str], limits: Limits, timeout: float = 0.0,
                 tmp_dir: Optional[str] = None,
                 blocked: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Walk the message at ``path`` (blocking); see the module docstring for the report.

    Raises ScanTimeExceeded when ``timeout`` seconds pass first."""
    started = resource.getrusage(resource.RUSAGE_SELF)
    findings = Findings(features, tuple(blocked) if blocked is not None else None)
    budget = Budget(limits, timeout)
    verdict: Optional[dict[str, str]] = None
    with open(path, "rb") as f:
        try:
            mimewalk.walk(f, budget, _Analyser(findings, budget, tmp_dir or
                                               os.path.dirname(path) or None))
        except ScanVerdict as e:
            verdict = {"kind": "limits" if isinstance(e, LimitExceeded) else "unscannable",
                       "signature": e.signature, "detail": e.detail}
    report: dict[str, Any] = {"names": findings.names, "names_seen": findings.names_seen,
                              "eicar": findings.eicar,
                              "verdict": verdict, "notes": findings.notes,
                              "spent": budget.summary()}
    if "spam" in findings.features:
        from dcrouter.email.scanning.spam import score_message
        top = findings.top if findings.top is not None else Message()
        score, rules = score_message(top, findings.texts)
        report["spam"] = {"score": score, "rules": rules}
    ended = resource.getrusage(resource.RUSAGE_SELF)
    report["cpu"] = round(ended.ru_utime + ended.ru_stime - started.ru_utime
                          - started.ru_stime, 4)
    return report


__all__ = ["EICAR", "FEATURES", "Findings", "TEXT_LIMIT", "analyse_file", "part_names"]
