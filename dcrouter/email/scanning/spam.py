"""The built-in spam scorer and the spam scanner (built-in rules, plus spamd when configured).

Rules of the built-in scorer (each adds its score once; the total is
compared with the scanner's ``threshold``, default 5.0):

=======================  =====  =====================================================
rule                     score  fires when
=======================  =====  =====================================================
GTUBE                    1000   the GTUBE test string is in a text part
MISSING_DATE             1.0    no Date header
MISSING_MESSAGE_ID       1.0    no Message-ID header
SUBJECT_ALL_CAPS         1.5    the Subject has 8+ letters, all upper case
LINK_TEXT_MISMATCH       2.5    an HTML link's text shows a host other than its href's
EXCESSIVE_URLS           1.5    more than 15 distinct URLs
PHISHING_PHRASE          2.0    a known phishing phrase (each further phrase +1.0, max 4.0)
HTML_ONLY                1.0    HTML body without a plain-text alternative
FORGED_FROM_DISPLAY      2.5    the From display name holds an address or domain that is
                                not the From address's domain
=======================  =====  =====================================================
"""

from __future__ import annotations

import re
from email.message import Message
from email.utils import getaddresses
from html.parser import HTMLParser
from typing import Any, Optional
from urllib.parse import urlsplit

from twisted.internet import defer
from zope.interface import implementer

from dcrouter.email.scanning import mime
from dcrouter.email.scanning.builtin import BuiltinScanner
from dcrouter.email.scanning.types import ScanContext, ScannerError, ScanResult
from dcrouter.interfaces import IContentScanner

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

PHISHING_PHRASES = (
    "verify your account", "confirm your password", "your account has been suspended",
    "your account will be suspended", "update your payment information",
    "unusual sign-in activity", "click here to unlock", "confirm your identity",
    "your mailbox is full", "validate your account", "reset your password immediately",
    "you have won", "wire transfer urgently",
)

_URL = re.compile(r"https?://[^\s\"'<>]+", re.IGNORECASE)
_HOSTISH = re.compile(r"(?:https?://)?((?:[a-z0-9-]+\.)+[a-z]{2,})(?:[/:?#]|\s*$)", re.IGNORECASE)
_ADDRESS_IN_NAME = re.compile(r"[\w.+-]+@((?:[\w-]+\.)+[a-z]{2,})", re.IGNORECASE)
_DOMAIN_IN_NAME = re.compile(r"\b((?:[a-z0-9-]+\.)+(?:com|net|org|io|de|uk|gov|edu|bank))\b",
                             re.IGNORECASE)


class _LinkCollector(HTMLParser):
    """Collects ``(href, text)`` of every ``<a>`` and every href."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []
        self._href: Optional[str] = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower().rstrip(".")
    except ValueError:
        return ""


def _same_site(a: str, b: str) -> bool:
    a, b = a.lower().removeprefix("www."), b.lower().removeprefix("www.")
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def score_message(message: Message, texts: Optional[list[tuple[str, str]]] = None
                  ) -> tuple[float, list[str]]:
    """The built-in score and the names of the rules that fired (blocking).

    ``texts`` are the ``(subtype, text)`` of the message's text parts; by
    default they are taken from ``message`` (then a fully parsed message).
    The scan worker passes the top-level headers and the text it collected.
    """
    hits: list[tuple[str, float]] = []
    if texts is None:
        texts = list(mime.text_parts(message))
    if any(GTUBE in text for _s, text in texts):
        hits.append(("GTUBE", 1000.0))
    if mime.header_text(message, "Date") is None:
        hits.append(("MISSING_DATE", 1.0))
    if mime.header_text(message, "Message-ID") is None:
        hits.append(("MISSING_MESSAGE_ID", 1.0))
    subject = mime.header_text(message, "Subject") or ""
    letters = [c for c in subject if c.isalpha()]
    if len(letters) >= 8 and all(c.isupper() for c in letters):
        hits.append(("SUBJECT_ALL_CAPS", 1.5))
    urls: set[str] = set()
    mismatch = False
    for subtype, text in texts:
        urls.update(_URL.findall(text))
        if subtype == "html":
            collector = _LinkCollector()
            try:
                collector.feed(text)
                collector.close()
            except (AssertionError, ValueError):
                pass
            for href, label in collector.links:
                if href.lower().startswith(("http://", "https://")):
                    urls.add(href)
                shown = _HOSTISH.match(label.strip())
                target = _host(href)
                if shown and target and not _same_site(shown.group(1), target):
                    mismatch = True
    if mismatch:
        hits.append(("LINK_TEXT_MISMATCH", 2.5))
    if len(urls) > 15:
        hits.append(("EXCESSIVE_URLS", 1.5))
    lowered = " ".join(re.sub(r"<[^>]+>", " ", t) for _s, t in texts).lower()
    lowered = re.sub(r"\s+", " ", lowered) + " " + subject.lower()
    phrases = sum(1 for p in PHISHING_PHRASES if p in lowered)
    if phrases:
        hits.append(("PHISHING_PHRASE", min(4.0, 2.0 + (phrases - 1))))
    subtypes = {s for s, _t in texts}
    if "html" in subtypes and "plain" not in subtypes:
        hits.append(("HTML_ONLY", 1.0))
    from_header = mime.header_text(message, "From") or ""
    if _forged_display(from_header):
        hits.append(("FORGED_FROM_DISPLAY", 2.5))
    return sum(s for _n, s in hits), [n for n, _s in hits]


def _forged_display(from_header: str) -> bool:
    try:
        pairs = getaddresses([from_header])
    except (ValueError, IndexError):
        return False
    for name, addr in pairs:
        if not name or "@" not in addr:
            continue
        domain = addr.rsplit("@", 1)[1].lower()
        found = _ADDRESS_IN_NAME.search(name) or _DOMAIN_IN_NAME.search(name)
        if found and not _same_site(found.group(1), domain):
            return True
    return False


@implementer(IContentScanner)
class SpamScanner(BuiltinScanner):
    """Built-in rules, and spamd's score when a client is given (the higher verdict wins).

    The score reported is spamd's when spamd answered, else the built-in
    score; the message is spam when either reaches its threshold.  The
    built-in rules run in the scan worker, over the first 512 KiB of text.
    """

    name = "spam"
    features = ("spam",)

    def __init__(self, threshold: float = 5.0, spamd: Any = None, analysis: Any = None) -> None:
        super().__init__(analysis)
        self.threshold = threshold
        self.spamd = spamd

    @defer.inlineCallbacks
    def scan(self, message: Optional[Message], context: ScanContext) -> Any:
        """Score the message; fires with a ScanResult (verdict spam or clean)."""
        report, error = yield self.report(context)
        score, rules = 0.0, []
        if report is not None:
            score, rules = float(report["spam"]["score"]), list(report["spam"]["rules"])
        spamd_result = None
        if self.spamd is not None:
            try:
                spamd_result = yield self.spamd.check_file(context.spool_path, context.size)
            except ScannerError as e:  # the built-in verdict still counts; the error is noted
                error = f"{error}; {e}" if error else str(e)
            if spamd_result is not None:
                rules = rules + [f"SPAMD_{r}" for r in spamd_result.symbols]
                score = max(score, spamd_result.score)
        if report is None and spamd_result is None:
            return ScanResult(self.name, "error", error=error)
        verdict = "spam" if score >= self.threshold else "clean"
        return ScanResult(self.name, verdict, score=score, threshold=self.threshold,
                          details=rules, error=error)
