"""MIME helpers for plug-in scanners and transformations: parse, walk parts, text, names.

Parsing uses the standard ``email`` package with the modern policy (CRLF
output, original header folding kept).  The server bounds a message by
``max_message_size``, and these helpers read at most :data:`MAX_PART_BYTES`
of any one decoded part.  All functions here are blocking (CPU-bound on
large messages): call them in a thread.  The built-in scanners do not use
them: their pass over the message is :mod:`dcrouter.email.scanning.mimewalk`
in a scan worker, under the scan limits.
"""

from __future__ import annotations

import email.errors
import email.policy
import re
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import collapse_rfc2231_value
from typing import Iterator, Optional

#: The policy for parsing and writing messages: CRLF, no refolding of untouched headers.
POLICY = email.policy.SMTP.clone(refold_source="none")

#: Decoded bytes looked at per part (text and ZIP contents).
MAX_PART_BYTES = 10 * 1024 * 1024


def parse_file(path: str) -> EmailMessage:
    """Parse a message file into an EmailMessage (blocking)."""
    with open(path, "rb") as f:
        msg = BytesParser(policy=POLICY).parse(f)
    assert isinstance(msg, EmailMessage)
    return msg


def parse_bytes(data: bytes) -> EmailMessage:
    """Parse message bytes into an EmailMessage."""
    msg = BytesParser(policy=POLICY).parsebytes(data)
    assert isinstance(msg, EmailMessage)
    return msg


def to_bytes(message: Message) -> bytes:
    """Serialise with CRLF line ends, deterministically (DKIM signs these bytes)."""
    return message.as_bytes(policy=POLICY)


def part_filenames(part: Message) -> list[str]:
    """Every name a part carries: Content-Disposition filename and Content-Type name.

    RFC 2231 encoded and continued parameters are decoded by the email package.
    """
    names: list[str] = []
    try:
        filename = part.get_filename()
    except (ValueError, LookupError):
        filename = None
    if filename:
        names.append(str(filename))
    try:
        name = part.get_param("name", header="content-type")
    except (ValueError, LookupError):
        name = None
    if name:
        value = collapse_rfc2231_value(name) if isinstance(name, tuple) else str(name)
        if value not in names:
            names.append(value)
    return names


def decoded_payload(part: Message, limit: int = MAX_PART_BYTES) -> bytes:
    """The part's body with transfer encoding removed (at most ``limit`` bytes)."""
    if part.is_multipart():
        return b""
    try:
        data = part.get_payload(decode=True)
    except (ValueError, LookupError, AssertionError):
        return b""
    if not isinstance(data, bytes):
        return b""
    return data[:limit]


def leaf_parts(message: Message) -> Iterator[Message]:
    """Every non-multipart part, descending into multiparts and attached messages."""
    for part in message.walk():
        if not part.is_multipart():
            yield part


def text_parts(message: Message) -> Iterator[tuple[str, str]]:
    """``(subtype, text)`` of every text/plain and text/html part that is not an attachment."""
    for part in leaf_parts(message):
        if part.get_content_maintype() != "text":
            continue
        if part.get_content_disposition() == "attachment":
            continue
        subtype = part.get_content_subtype()
        if subtype not in ("plain", "html"):
            continue
        raw = decoded_payload(part)
        charset = part.get_content_charset() or "utf-8"
        try:
            text = raw.decode(charset, "replace")
        except LookupError:
            text = raw.decode("utf-8", "replace")
        yield subtype, text


def header_text(message: Message, name: str) -> Optional[str]:
    """A header's value, unfolded, RFC 2047 words decoded; None when absent.

    Reads the raw header (the modern policy's structured parsing of every
    fetched header is the main cost of scanning small messages) and never
    raises on malformed input.
    """
    wanted = name.lower()
    for key, value in message.raw_items():
        if key.lower() == wanted:
            text = re.sub(r"\r?\n[ \t]", " ", str(value)).strip()
            if "=?" not in text:
                return text
            try:
                return str(make_header(decode_header(text)))
            except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
                return text
    return None
