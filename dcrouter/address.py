"""Email addresses of the SMTP envelope: RFC 5321 paths, their canonical form, safe quoting.

:func:`parse_path` reads the ``<...>`` of ``MAIL FROM`` and ``RCPT TO`` by the
grammar of RFC 5321 4.1.2 (with RFC 6531's UTF-8 extensions when the
transaction declared ``SMTPUTF8``)::

    Path       = "<" [ A-d-l ":" ] Mailbox ">"      ; the source route is dropped
    Mailbox    = Local-part "@" ( Domain / address-literal )
    Local-part = Dot-string / Quoted-string          ; Quoted-string of QcontentSMTP
    Domain     = sub-domain *("." sub-domain)        ; LDH labels, or U-labels (IDNA 2008)

Anything else is refused, so no CR, LF, NUL or other control character ever
gets into an envelope address.  The address dcrouter then carries is the
*canonical* form: a quoted local part that could be a Dot-string is unquoted
(RFC 5321 4.1.2 says it SHOULD be sent so), any other is re-quoted minimally,
and a domain in U-labels is converted to A-labels, so that routing,
suppression and Maildir names see one spelling of each mailbox.

Also here, because the SMTP server and the delivery side both need them
(and neither may import the other): :func:`maildir_name` (the directory a
local part is delivered to, or None when it can have none) and the quoting of
values that go into header fields (:func:`header_text`, :func:`ar_value`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import unicodedata
from typing import Optional

import idna

from dcrouter.errors import ProtocolError

#: RFC 5321 4.5.3.1.2 and DNS: a domain is at most 255 octets, a label 63.
MAX_DOMAIN = 255
MAX_LABEL = 63
#: RFC 5321 4.5.3.1.1: a local part of 64 octets must work; a Maildir name is bounded by it.
MAX_LOCAL = 64
#: The longest address accepted (RFC 5321's path limit is 256 octets; SRS and VERP
#: local parts exceed 64 in practice, and Postfix sets no limit of its own).
MAX_ADDRESS = 320

_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\Z")
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_AR_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`{|}~@]+\Z")
#: ASCII characters a Maildir name may hold: atext without "/" (a path separator).
_MAILDIR_ASCII = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-=?^_`{|}~.")


class AddressError(ProtocolError):
    """A MAIL FROM or RCPT TO argument the grammar refuses.

    ``kind`` is ``syntax`` (501), ``too_long`` (501 "path too long") or
    ``utf8`` (553 5.6.7: non-ASCII without SMTPUTF8).
    """

    def __init__(self, kind: str, detail: str = "") -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind}: {detail}" if detail else kind, kind=kind)


@dataclasses.dataclass(frozen=True)
class Mailbox:
    """One parsed envelope mailbox.

    ``local`` is the canonical local part as it goes on the wire (a Dot-string,
    or a minimal Quoted-string); ``domain`` the domain (A-labels) or address
    literal with its brackets.
    """

    local: str
    domain: str
    quoted: bool = False
    literal: bool = False

    @property
    def address(self) -> str:
        """``local@domain`` in canonical form (``postmaster`` alone for ``<postmaster>``)."""
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def local_text(self) -> str:
        """The local part without quoting (what a Quoted-string stands for)."""
        return unquote_local(self.local) if self.quoted else self.local

    @property
    def sender_routing(self) -> bool:
        """Does the local part route further (``%``, ``!`` or ``@``: the percent hack,
        bang paths, quoted addresses)?  Postfix's allow_untrusted_routing forbids these."""
        text = self.local_text
        return "%" in text or "!" in text or "@" in text


def _non_ascii_ok(ch: str, *, quoted: bool) -> bool:
    """RFC 6531 UTF8-non-ascii, without controls, line/paragraph separators (and spaces
    outside quotes)."""
    category = unicodedata.category(ch)
    if category in ("Cc", "Cs", "Zl", "Zp"):
        return False
    return quoted or category != "Zs"


def _is_dot_string(text: str, utf8: bool) -> bool:
    if text.isascii():
        return _DOT_STRING.match(text) is not None
    if not utf8:
        return False
    ascii_form = "".join(c if c.isascii() else "a" for c in text)
    if _DOT_STRING.match(ascii_form) is None:
        return False
    return all(c.isascii() or _non_ascii_ok(c, quoted=False) for c in text)


def _parse_quoted(text: str, utf8: bool) -> str:
    """The content of a Quoted-string (without its quotes); AddressError when malformed."""
    out = []
    i, end = 1, len(text) - 1
    while i < end:
        ch = text[i]
        if ch == "\\":
            if i + 1 >= end or not 32 <= ord(text[i + 1]) <= 126:
                raise AddressError("syntax", "bad quoted pair")
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            raise AddressError("syntax", "quote inside a quoted string")
        code = ord(ch)
        if code > 126:
            if not utf8 or not _non_ascii_ok(ch, quoted=True):
                raise AddressError("syntax", "bad character in a quoted string")
        elif code < 32 or code == 127:
            raise AddressError("syntax", "control character in a quoted string")
        out.append(ch)
        i += 1
    return "".join(out)


def quote_local(text: str, utf8: bool = True) -> tuple[str, bool]:
    """The canonical wire form of local part ``text``: ``(form, quoted)``."""
    if text and _is_dot_string(text, utf8):
        return text, False
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"', True


def unquote_local(local: str) -> str:
    """``"a\\"b"`` -> ``a"b``; a Dot-string is returned as it is."""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def _parse_domain(text: str, utf8: bool) -> str:
    """A Domain (LDH or U-labels, returned in A-labels) or an address literal."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise AddressError("syntax", "unterminated address literal")
        inner = text[1:-1]
        if inner[:5].lower() == "ipv6:":
            try:
                ipaddress.IPv6Address(inner[5:])
            except ValueError:
                raise AddressError("syntax", "bad IPv6 address literal") from None
            return "[IPv6:" + inner[5:] + "]"
        try:
            ipaddress.IPv4Address(inner)
            return text
        except ValueError:
            pass
        if ":" in inner and _GENERAL_LITERAL.match(inner):
            return text
        raise AddressError("syntax", "bad address literal")
    if not text or len(text.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("syntax" if not text else "too_long", "domain")
    if not text.isascii():
        if not utf8:
            raise AddressError("utf8")
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except UnicodeError:  # idna.IDNAError is one
            raise AddressError("syntax", "bad internationalised domain") from None
        if len(text) > MAX_DOMAIN:
            raise AddressError("too_long", "domain")
    for label in text.split("."):
        if len(label) > MAX_LABEL or _LDH_LABEL.match(label) is None:
            raise AddressError("syntax", "bad domain label")
    return text


def parse_mailbox(text: str, utf8: bool = False) -> Mailbox:
    """``local@domain`` by the Mailbox grammar; AddressError when it is not one."""
    if not text.isascii() and not utf8:
        raise AddressError("utf8")
    if len(text.encode("utf-8")) > MAX_ADDRESS:
        raise AddressError("too_long")
    if text.startswith('"'):
        end = _closing_quote(text)
        if end < 0 or text[end + 1:end + 2] != "@":
            raise AddressError("syntax", "quoted local part")
        content = _parse_quoted(text[:end + 1], utf8)
        domain_text = text[end + 2:]
        local, quoted = quote_local(content, utf8)
    else:
        local, at, domain_text = text.rpartition("@")
        if not at or not _is_dot_string(local, utf8):
            raise AddressError("syntax", "local part")
        quoted = False
    domain = _parse_domain(domain_text, utf8)
    return Mailbox(local, domain, quoted, domain.startswith("["))


def _closing_quote(text: str) -> int:
    """Index of the quote that ends the Quoted-string starting at ``text[0]``, or -1."""
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return -1


def _strip_source_route(inner: str, utf8: bool) -> str:
    """``@a,@b:user@c`` -> ``user@c`` (RFC 5321 4.1.2 A-d-l; accepted and ignored)."""
    if not inner.startswith("@"):
        return inner
    route, colon, rest = inner.partition(":")
    if not colon:
        raise AddressError("syntax", "source route")
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise AddressError("syntax", "source route")
        _parse_domain(hop[1:], utf8)
    return rest


def parse_path(path: str, *, utf8: bool = False, null_ok: bool = False,
               postmaster_ok: bool = False) -> Optional[Mailbox]:
    """The mailbox of ``<...>`` (or of a bare address, as Postfix accepts by default).

    ``null_ok``: ``<>`` is allowed (MAIL FROM) and gives None.  ``postmaster_ok``:
    ``<postmaster>`` without a domain is allowed (RCPT TO, RFC 5321 4.5.1) and
    gives a Mailbox with an empty domain.
    """
    inner = path[1:-1] if len(path) >= 2 and path[0] == "<" and path[-1] == ">" else path
    if not inner:
        if null_ok and path == "<>":
            return None
        raise AddressError("syntax", "empty path")
    if postmaster_ok and inner.lower() == "postmaster":
        return Mailbox("postmaster", "")
    return parse_mailbox(_strip_source_route(inner, utf8), utf8)


def split_argument(arg: str, keyword: str) -> tuple[str, str]:
    """``FROM:<a@b> SIZE=1`` -> ``("<a@b>", "SIZE=1")``; AddressError when malformed.

    The path may hold ``>`` and spaces inside a Quoted-string; the parameters
    follow it after white space.
    """
    if arg[:len(keyword) + 1].upper() != keyword + ":":
        raise AddressError("syntax", "keyword")
    rest = arg[len(keyword) + 1:].lstrip(" \t")
    if not rest.startswith("<"):
        path, _, params = rest.partition(" ")
        return path, params.strip(" \t")
    i, quoted = 1, False
    while i < len(rest):
        ch = rest[i]
        if ch == "\\" and quoted:
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            break
        i += 1
    else:
        raise AddressError("syntax", "unterminated path")
    path, params = rest[:i + 1], rest[i + 1:]
    if params and params[0] not in " \t":
        raise AddressError("syntax", "text after the path")
    return path, params.strip(" \t")


def parse_params(text: str) -> Optional[dict[str, str]]:
    """ESMTP parameters ``KEY=VALUE KEY`` (RFC 5321 4.1.2) -> {KEY: VALUE}; None when malformed."""
    out: dict[str, str] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if _ESMTP_KEYWORD.match(key) is None or (eq and not value):
            return None
        if any(ord(c) < 33 or ord(c) == 127 for c in value):
            return None
        out[key.upper()] = value
    return out


def maildir_name(address: str) -> Optional[str]:
    """The Maildir directory name of ``address``'s local part, or None when it can have none.

    Lower-cased and in Unicode NFC; ASCII atext except ``/``, letters, marks and
    digits of any script; no leading, trailing or doubled dot; at most 64 octets.
    A quoted local part (one that needs quoting) has no Maildir.
    """
    local = address.rpartition("@")[0] if "@" in address else address
    if not local or local.startswith('"'):
        return None
    name = unicodedata.normalize("NFC", local.lower())
    if len(name.encode("utf-8")) > MAX_LOCAL or name.startswith(".") or name.endswith(".") \
            or ".." in name:
        return None
    for ch in name:
        if ch.isascii():
            if ch not in _MAILDIR_ASCII:
                return None
        elif unicodedata.category(ch)[0] not in "LMN":
            return None
    return name


def header_text(text: str) -> str:
    """``text`` safe inside a header field: every control character (CR, LF, NUL, C1...)
    and line or paragraph separator is replaced by ``?``; a tab stays."""
    return "".join(c if c == "\t" or (c.isprintable() and c != "\x7f") or
                   unicodedata.category(c) not in ("Cc", "Zl", "Zp") else "?" for c in text)


def ar_value(text: str) -> str:
    """An RFC 8601 property value: ``text`` as it is when it is a plain token
    (``user@example.com``), else a quoted-string with ``"`` and ``\\`` escaped."""
    text = header_text(text)
    if text and _AR_TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = ["AddressError", "Mailbox", "ar_value", "header_text", "maildir_name",
           "parse_mailbox", "parse_params", "parse_path", "quote_local", "split_argument",
           "unquote_local"]
