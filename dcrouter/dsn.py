"""Delivery status notification parameters of the SMTP envelope (RFC 3461, RFC 6533).

What a client may ask with the ``DSN`` extension, read and validated here for
the SMTP server and written again here for the SMTP client (neither may
import the other)::

    MAIL FROM:<s@x> RET=FULL|HDRS ENVID=<xtext, at most 100 characters>
    RCPT TO:<r@y>   NOTIFY=NEVER|SUCCESS,FAILURE,DELAY  ORCPT=<addr-type>;<xtext>

``xtext`` (RFC 3461 4) is printable ASCII except ``+`` and ``=``, with ``+XX``
(two hexadecimal digits) for any other octet.  The decoded ENVID and an
``rfc822`` ORCPT address must be printable ASCII; a ``utf-8`` ORCPT address
(RFC 6533 3) is written with ``\\x{HEX}`` escapes instead (utf-8-addr-xtext) or,
when the transaction declared SMTPUTF8, in UTF-8 itself (utf-8-addr-unitext).
Anything else is a :class:`DsnSyntaxError` (the server answers ``501 5.5.4``
with Postfix's wording), so no control character, CR or LF from a client ever
reaches a DSN header field or the next hop's command line.

Decoded values are what dcrouter keeps (queue items, reports); they are
encoded again when passed on to a next hop that offers DSN.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Mapping

from dcrouter.errors import ProtocolError

#: The NOTIFY keywords other than NEVER, in the order dcrouter writes them.
NOTIFY_KEYWORDS = ("SUCCESS", "FAILURE", "DELAY")
#: RFC 3461 4.4 and 4.2: the longest ENVID and ORCPT values (as sent, encoded).
MAX_ENVID = 100
MAX_ORCPT = 500
#: Report kinds, as in the ``Action:`` field of RFC 3464 2.3.3.
FAILED, DELAYED, DELIVERED, RELAYED = "failed", "delayed", "delivered", "relayed"

_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+\Z")
_HEX = frozenset("0123456789ABCDEFabcdef")


class DsnSyntaxError(ProtocolError):
    """A DSN parameter the RFC 3461 grammar refuses; ``param`` names it (NOTIFY, ORCPT...)."""

    def __init__(self, param: str, detail: str = "") -> None:
        self.param = param
        self.detail = detail
        super().__init__(f"bad {param} parameter" + (f": {detail}" if detail else ""),
                         param=param)

    @property
    def reply(self) -> str:
        """The SMTP reply (Postfix's texts)."""
        if self.param in ("NOTIFY", "ORCPT"):
            return f"501 5.5.4 Error: Bad {self.param} parameter syntax"
        return f"501 5.5.4 Bad {self.param} parameter syntax"


# -- xtext (RFC 3461 4) ----------------------------------------------------------------------

def xtext_decode(value: str, param: str) -> str:
    """The text an xtext stands for (octets as Latin-1); DsnSyntaxError when malformed."""
    out = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            pair = value[i + 1:i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise DsnSyntaxError(param, "bad +XX escape")
            out.append(chr(int(pair, 16)))
            i += 3
            continue
        if not "\x21" <= ch <= "\x7e" or ch == "=":
            raise DsnSyntaxError(param, "character outside xtext")
        out.append(ch)
        i += 1
    return "".join(out)


def xtext_encode(text: str) -> str:
    """``text`` (UTF-8 octets) as xtext: ``+XX`` for ``+``, ``=`` and anything not graphic."""
    return "".join(chr(b) if 0x21 <= b <= 0x7e and b not in (0x2b, 0x3d) else f"+{b:02X}"
                   for b in text.encode("utf-8"))


def _printable_ascii(text: str) -> bool:
    return all(" " <= ch <= "~" for ch in text)


# -- utf-8-addr-xtext / utf-8-addr-unitext (RFC 6533 3) ---------------------------------------

def _unicode_ok(ch: str) -> bool:
    """A character an internationalised address may hold once decoded (no controls,
    surrogates or line/paragraph separators)."""
    return unicodedata.category(ch) not in ("Cc", "Cs", "Zl", "Zp")


def utf8_addr_decode(value: str, unitext: bool) -> str:
    """A utf-8 ORCPT address: QCHARs and ``\\x{HEX}``, plus raw UTF-8 when ``unitext``."""
    out = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            end = value.find("}", i)
            digits = value[i + 3:end] if value[i + 1:i + 3] == "x{" and end > 0 else ""
            if not 2 <= len(digits) <= 6 or not set(digits) <= _HEX:
                raise DsnSyntaxError("ORCPT", "bad \\x{HEX} escape")
            point = int(digits, 16)
            if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
                raise DsnSyntaxError("ORCPT", "escape outside Unicode")
            out.append(chr(point))
            i = end + 1
            continue
        if ch.isascii():
            if not "\x21" <= ch <= "\x7e" or ch in "+=":
                raise DsnSyntaxError("ORCPT", "character outside utf-8-addr-xtext")
        elif not unitext:
            raise DsnSyntaxError("ORCPT", "UTF-8 without SMTPUTF8")
        out.append(ch)
        i += 1
    text = "".join(out)
    if not all(ch == " " or _unicode_ok(ch) for ch in text):
        raise DsnSyntaxError("ORCPT", "control character")
    return text


def utf8_addr_encode(text: str) -> str:
    """``text`` as utf-8-addr-xtext (7-bit): ``\\x{HEX}`` for ``\\``, ``+``, ``=``,
    space, controls and every non-ASCII character."""
    return "".join(ch if "\x21" <= ch <= "\x7e" and ch not in "\\+=" else f"\\x{{{ord(ch):02X}}}"
                   for ch in text)


# -- the parameters -------------------------------------------------------------------------------

def parse_notify(value: str) -> str:
    """``NEVER`` or a comma list of SUCCESS, FAILURE, DELAY -> canonical form."""
    if not value.isascii():  # "ſuccess".upper() is "SUCCESS": compare ASCII only
        raise DsnSyntaxError("NOTIFY")
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return "NEVER"
    if any(w not in NOTIFY_KEYWORDS for w in words):
        raise DsnSyntaxError("NOTIFY")
    return ",".join(k for k in NOTIFY_KEYWORDS if k in words)


def parse_ret(value: str) -> str:
    """``FULL`` or ``HDRS``."""
    ret = value.upper()
    if not value.isascii() or ret not in ("FULL", "HDRS"):
        raise DsnSyntaxError("RET")
    return ret


def parse_envid(value: str) -> str:
    """The decoded ENVID: xtext of printable ASCII, at most 100 characters."""
    if len(value) > MAX_ENVID:
        raise DsnSyntaxError("ENVID", "longer than 100 characters")
    text = xtext_decode(value, "ENVID")
    if not text or not _printable_ascii(text):
        raise DsnSyntaxError("ENVID", "not printable ASCII")
    return text


def parse_orcpt(value: str, utf8: bool = False) -> str:
    """``addr-type;address`` decoded: ``rfc822;a@b``, ``utf-8;jörg@b`` (RFC 6533).

    ``utf8``: the transaction declared SMTPUTF8, so a utf-8 address may be sent
    in UTF-8 itself.  Other address types (x400...) are kept as they are: the
    RFC does not constrain their syntax, only their characters.
    """
    if len(value) > MAX_ORCPT:
        raise DsnSyntaxError("ORCPT", "longer than 500 characters")
    kind, semicolon, coded = value.partition(";")
    if not semicolon or not _ATOM.match(kind) or not coded:
        raise DsnSyntaxError("ORCPT")
    kind = kind.lower()
    if kind == "utf-8":
        address = utf8_addr_decode(coded, unitext=utf8)
    else:
        if not coded.isascii():
            raise DsnSyntaxError("ORCPT", "8-bit xtext")
        address = xtext_decode(coded, "ORCPT")
        if not _printable_ascii(address):
            raise DsnSyntaxError("ORCPT", "not printable ASCII")
    if not address.strip():
        raise DsnSyntaxError("ORCPT", "empty address")
    orcpt = f"{kind};{address}"
    if len(orcpt_param(orcpt)) > MAX_ORCPT:
        # raw UTF-8 grows when escaped for a next hop: refuse what could not be passed on
        raise DsnSyntaxError("ORCPT", "longer than 500 characters once 7-bit")
    return orcpt


def orcpt_for(address: str) -> str:
    """The ORCPT a recipient that gave none is passed on with (RFC 3461 5.2.1: the
    address of the RCPT command the message was received with)."""
    return f"{'rfc822' if address.isascii() else 'utf-8'};{address}"


def orcpt_param(orcpt: str) -> str:
    """A decoded ``type;address`` as the ORCPT value on the wire (always 7-bit)."""
    kind, _, address = orcpt.partition(";")
    if kind == "utf-8":
        return f"utf-8;{utf8_addr_encode(address)}"
    return f"{kind};{xtext_encode(address)}"


def report_address(orcpt: str, global_report: bool) -> str:
    """``type; address`` for an RFC 3464 address field (Original-/Final-Recipient).

    A utf-8 address is written in UTF-8 in a ``message/global-delivery-status``
    (RFC 6533 6.2) and as utf-8-addr-xtext in a 7-bit ``message/delivery-status``.
    The caller neutralises control characters (none survive the parsers).
    """
    kind, _, address = orcpt.partition(";")
    if kind == "utf-8" and not global_report:
        address = utf8_addr_encode(address)
    return f"{kind}; {address}"


@dataclasses.dataclass(frozen=True)
class RecipientDsn:
    """One recipient's NOTIFY and ORCPT as received (``""``: not given)."""

    notify: str = ""
    orcpt: str = ""

    def rcpt_params(self, address: str) -> bytes:
        """`` NOTIFY=... ORCPT=...`` for a RCPT TO to a next hop that offers DSN.

        NOTIFY only when the client gave one (RFC 3461 5.2.1 forbids making one
        up); ORCPT always, as Postfix does, the received address when none was
        given.
        """
        out = f" NOTIFY={self.notify}" if self.notify else ""
        out += f" ORCPT={orcpt_param(self.orcpt or orcpt_for(address))}"
        return out.encode("ascii")


def wants(notify: str, event: str) -> bool:
    """Does NOTIFY ``notify`` ask for a report of ``event`` (failed, delayed, delivered)?

    No NOTIFY means FAILURE,DELAY (RFC 3461 4.1: what an MTA without the
    extension would do); NEVER means none.
    """
    if not notify:
        return event in (FAILED, DELAYED)
    keyword = {FAILED: "FAILURE", DELAYED: "DELAY", DELIVERED: "SUCCESS",
               RELAYED: "SUCCESS"}[event]
    return keyword in notify.split(",")


@dataclasses.dataclass(frozen=True)
class EnvelopeDsn:
    """A transaction's DSN parameters: RET and ENVID of MAIL, NOTIFY/ORCPT per recipient.

    ``recipients`` maps an envelope address to its parameters; recipients that
    gave none are not in it.
    """

    ret: str = ""
    envid: str = ""
    recipients: Mapping[str, RecipientDsn] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.ret or self.envid or self.recipients)

    def mail_params(self) -> bytes:
        """`` RET=... ENVID=...`` for a MAIL FROM to a next hop that offers DSN (only what
        the client gave: RFC 3461 5.2.1)."""
        out = f" RET={self.ret}" if self.ret else ""
        if self.envid:
            out += f" ENVID={xtext_encode(self.envid)}"
        return out.encode("ascii")

    def for_recipient(self, address: str) -> RecipientDsn:
        """``address``'s parameters (empty when it gave none)."""
        return self.recipients.get(address, _NONE)


_NONE = RecipientDsn()

__all__ = ["DsnSyntaxError", "EnvelopeDsn", "RecipientDsn", "orcpt_for", "orcpt_param",
           "parse_envid", "parse_notify", "parse_orcpt", "parse_ret", "report_address",
           "utf8_addr_decode", "utf8_addr_encode", "wants", "xtext_decode", "xtext_encode"]
