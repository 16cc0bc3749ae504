"""The Public Suffix List: which part of a domain name is its organisational domain.

DMARC (RFC 7489, section 3.2) aligns identifiers by their organisational
domain: the public suffix of a name (``co.uk``, ``github.io``, ``kobe.jp``'s
wildcard children...) plus one label.  The list itself comes from a file in
the format of https://publicsuffix.org/list/ — on Debian the ``publicsuffix``
package installs it as :data:`DEFAULT_PATH`.  Nothing is downloaded.

Without the file, :func:`default_list` falls back to a small built-in list
(every top-level domain plus a few common second-level suffixes) and says so
in the log once.

The matching follows the list's published algorithm: the rule with the most
labels wins, an exception rule (``!www.ck``) beats every other rule and makes
its parent the suffix, ``*`` matches one whole label, and a name that no rule
matches has its last label as suffix.  Rules in Unicode are compared in their
IDNA (``xn--``) form, which is how names arrive in mail headers and DNS.
"""

from __future__ import annotations

import os
import threading
from typing import Iterable, Optional

from dcrouter.logsetup import get_logger

log = get_logger("email")

#: Where Debian's ``publicsuffix`` package puts the list.
DEFAULT_PATH = "/usr/share/publicsuffix/public_suffix_list.dat"

#: Used when no list file is available: second-level suffixes common in mail.
FALLBACK_RULES = ("co.uk", "org.uk", "ac.uk", "gov.uk", "com.au", "net.au", "org.au", "co.jp",
                  "co.nz", "com.br", "co.za", "com.cn", "co.in")


def _ascii_labels(rule: str) -> Optional[tuple[str, ...]]:
    """The rule's labels in ASCII (IDNA) form, or None when it cannot be encoded."""
    labels = []
    for label in rule.lower().split("."):
        if label == "*" or label.isascii():
            labels.append(label)
            continue
        try:
            labels.append(label.encode("idna").decode("ascii"))
        except UnicodeError:
            return None
    return tuple(labels)


class PublicSuffixList:
    """Rules of a public suffix list and the organisational-domain look-up on them."""

    def __init__(self, rules: Iterable[str], source: str = "") -> None:
        self.source = source
        self._rules: set[tuple[str, ...]] = set()
        self._exceptions: set[tuple[str, ...]] = set()
        for raw in rules:
            line = raw.strip()
            if not line or line.startswith("//"):
                continue
            rule = line.split()[0]
            exception = rule.startswith("!")
            labels = _ascii_labels(rule[1:] if exception else rule)
            if labels is None or "" in labels:
                continue
            # stored right to left, so a name's labels can be looked up by suffix length
            (self._exceptions if exception else self._rules).add(tuple(reversed(labels)))

    @classmethod
    def load(cls, path: str) -> "PublicSuffixList":
        """Read a list file (UTF-8); OSError when it cannot be read."""
        with open(path, encoding="utf-8") as f:
            return cls(f, source=path)

    def __len__(self) -> int:
        return len(self._rules) + len(self._exceptions)

    def _matches(self, reversed_labels: tuple[str, ...], rules: set[tuple[str, ...]]
                 ) -> Iterable[int]:
        for length in range(1, len(reversed_labels) + 1):
            candidate = reversed_labels[:length]
            if candidate in rules or candidate[:-1] + ("*",) in rules:
                yield length

    def suffix_length(self, domain: str) -> int:
        """How many labels (from the right) of ``domain`` are its public suffix."""
        labels = tuple(reversed(domain.lower().rstrip(".").split(".")))
        exceptions = list(self._matches(labels, self._exceptions))
        if exceptions:
            return max(exceptions) - 1
        return max(self._matches(labels, self._rules), default=1)

    def public_suffix(self, domain: str) -> str:
        """``www.example.co.uk`` -> ``co.uk``."""
        labels = domain.lower().rstrip(".").split(".")
        return ".".join(labels[-self.suffix_length(domain):])

    def organisational_domain(self, domain: str) -> str:
        """The public suffix plus one label; a name that is itself a suffix stays itself."""
        labels = domain.lower().rstrip(".").split(".")
        keep = self.suffix_length(domain) + 1
        return ".".join(labels[-keep:]) if len(labels) >= keep else ".".join(labels)


_default: Optional[PublicSuffixList] = None
_default_lock = threading.Lock()
_by_path: dict[tuple[str, float], PublicSuffixList] = {}


def load_or_fallback(path: str = DEFAULT_PATH) -> PublicSuffixList:
    """The list from ``path``; the built-in fallback (logged) when it is missing or empty."""
    if path:
        try:
            loaded = PublicSuffixList.load(path)
            if len(loaded):
                return loaded
            log.warn("public suffix list {path} has no rules; using the built-in list",
                     path=path)
        except OSError as e:
            log.warn("public suffix list {path} unreadable ({error}); DMARC uses the built-in "
                     "list (install Debian's publicsuffix package)", path=path,
                     error=os.strerror(e.errno) if e.errno else str(e))
    return PublicSuffixList(FALLBACK_RULES, source="built-in")


def suffix_list(path: str) -> PublicSuffixList:
    """The list at ``path`` (fallback as in :func:`load_or_fallback`), read again only when
    the file changed, so a configuration reload costs nothing when it did not."""
    try:
        key = (path, os.stat(path).st_mtime) if path else ("", 0.0)
    except OSError:
        key = (path, -1.0)
    with _default_lock:
        cached = _by_path.get(key)
    if cached is None:
        cached = load_or_fallback(path)
        with _default_lock:
            _by_path.clear()  # one configuration at a time: keep only the newest
            _by_path[key] = cached
    return cached


def default_list() -> PublicSuffixList:
    """The list at :data:`DEFAULT_PATH`, loaded once per process."""
    global _default
    with _default_lock:
        if _default is None:
            _default = load_or_fallback(DEFAULT_PATH)
        return _default


__all__ = ["DEFAULT_PATH", "PublicSuffixList", "default_list", "load_or_fallback", "suffix_list"]
