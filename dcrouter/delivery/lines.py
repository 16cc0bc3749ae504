"""Outbound line discipline: CRLF line ends only, no line over 998 octets.

RFC 5321 section 2.3.8 forbids a client to transmit a bare CR or a bare LF,
and section 4.5.3.1.6 limits a text line to 998 octets before its CRLF.  Every
message dcrouter sends over SMTP (forwarded, to MX hosts, DSNs) passes
:func:`normalise` first, before DKIM signing, so the signature covers the bytes
that actually leave:

* a bare LF, a bare CR and CR+...+CR+LF each become one CRLF (a lone CR is a
  line break to many receivers: sending it as one avoids a smuggling ambiguity
  downstream, CVE-2023-51766 class);
* a line longer than 998 octets is broken as Postfix's
  ``smtp_line_length_limit`` does: after 998 octets a CRLF and a space are
  inserted, and each continuation carries at most 997 more octets.  In a header
  that is folding (RFC 5322 2.2.3); in a body it costs one leading space per
  break, the least damage to MIME.
"""

from __future__ import annotations

import re

#: The longest line sent, in octets before CRLF (RFC 5321 4.5.3.1.6).
LINE_LIMIT = 998

_LINE_END = re.compile(rb"\r*\n|\r")


def _clean(data: bytes) -> bool:
    """Only CRLF line ends? (Counting in C: every CR is followed by an LF and every LF
    preceded by a CR exactly when the three counts agree.)"""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") == pairs and data.count(b"\n") == pairs


#: Up to this size the long-line check splits the message (fastest); beyond, it searches.
_SPLIT_LIMIT = 1024 * 1024


def _too_long(data: bytes, limit: int) -> bool:
    """Is a line of ``data`` (CRLF line ends only) longer than ``limit`` octets?

    Linear either way: a split into lines in C for messages up to 1 MiB (10 us for
    10 KB), else a search whose pattern starts with a literal LF, so the engine jumps
    from line end to line end without a copy of the message (the first line is looked
    at on its own).
    """
    if len(data) <= limit:
        return False
    if len(data) <= _SPLIT_LIMIT:
        return max(map(len, data.split(b"\r\n"))) > limit
    first = data.find(b"\r\n")
    if (len(data) if first < 0 else first) > limit:
        return True
    return _long_line(limit).search(data, max(first, 0)) is not None


_LONG_LINES: dict[int, "re.Pattern[bytes]"] = {}


def _long_line(limit: int) -> "re.Pattern[bytes]":
    pattern = _LONG_LINES.get(limit)
    if pattern is None:
        pattern = _LONG_LINES[limit] = re.compile(rb"\n[^\r\n]{%d}" % (limit + 1))
    return pattern


def normalise(message: bytes, limit: int = LINE_LIMIT) -> bytes:
    """``message`` with CRLF line ends only, lines wrapped at ``limit``, ending in CRLF."""
    data = message
    if not _clean(data):
        data = _LINE_END.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if limit > 1 and _too_long(data, limit):
        data = _wrap(data, limit)
    return data


def _wrap(data: bytes, limit: int) -> bytes:
    out: list[bytes] = []
    for line in data.split(b"\r\n"):
        if len(line) <= limit:
            out.append(line)
            continue
        out.append(line[:limit])
        rest = line[limit:]
        step = limit - 1
        while rest:
            out.append(b" " + rest[:step])
            rest = rest[step:]
    return b"\r\n".join(out)


def dot_stuff(data: bytes) -> bytes:
    """SMTP transparency (RFC 5321 4.5.2) for CRLF data: a leading dot is doubled."""
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


__all__ = ["LINE_LIMIT", "dot_stuff", "normalise"]
