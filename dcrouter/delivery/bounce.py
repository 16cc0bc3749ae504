"""Delivery status notifications (RFC 3464 ``multipart/report``) for failed recipients.

A DSN goes to the envelope sender of the failed message, from the null
sender, and is itself never bounced (see :mod:`dcrouter.delivery.system`).
Its three parts: a human-readable explanation, the machine-readable
``message/delivery-status`` and the original headers (``text/rfc822-headers``).

Addresses and diagnostics come from strangers (envelope, next-hop replies):
each goes through :func:`dcrouter.address.header_text`, so no CR or LF of
theirs can start a header field of ours; a UTF-8 address is typed ``utf-8``
(RFC 6533) rather than ``rfc822``.
"""

from __future__ import annotations

import email.utils
import uuid
from typing import Iterable

from dcrouter.address import header_text
from dcrouter.queue.item import QueueItem, RecipientState

_CRLF = "\r\n"


def original_headers(message: bytes, limit: int = 65536) -> bytes:
    """The header block of ``message`` (without the body), at most ``limit`` bytes."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end + 2]
    return head[:limit]


def build_dsn(item: QueueItem, failed: Iterable[RecipientState], reporting_mta: str,
              from_address: str, message: bytes, status_for: dict[str, str]) -> bytes:
    """The DSN message (CRLF line endings) for the ``failed`` recipients of ``item``.

    ``status_for`` maps a recipient to its RFC 3463 status code (``5.1.1``...).
    """
    failed = list(failed)
    boundary = f"dsn-{uuid.uuid4().hex}"
    now = email.utils.formatdate(localtime=False)
    arrival = email.utils.formatdate(item.created_at, localtime=False)
    lines = [
        f"From: Mail Delivery System <{from_address}>",
        f"To: <{header_text(item.mail_from)}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {now}",
        f"Message-ID: <{uuid.uuid4().hex}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    for r in failed:
        lines.append(f"<{header_text(r.address)}>: {_one_line(r.message) or 'delivery failed'}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Dcrouter-Queue-ID: {item.id}",
        f"Arrival-Date: {arrival}",
    ]
    for r in failed:
        lines += [
            "",
            f"Final-Recipient: {_typed(r.address)}",
            f"Original-Recipient: {_typed(r.address)}",
            "Action: failed",
            f"Status: {status_for.get(r.address, '5.0.0')}",
            f"Diagnostic-Code: smtp; {_one_line(r.message) or str(r.code)}",
            f"Last-Attempt-Date: {now}",
        ]
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered message headers",
        "",
    ]
    head = _CRLF.join(lines).encode("utf-8") + b"\r\n"
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    return head + original_headers(message).rstrip(b"\r\n") + b"\r\n" + tail


def _one_line(text: str) -> str:
    return header_text(" ".join(text.split()))[:500]


def _typed(address: str) -> str:
    """An RFC 3464 address with its type: ``rfc822; a@b``, or ``utf-8; ...`` (RFC 6533)."""
    return f"{'rfc822' if address.isascii() else 'utf-8'}; {header_text(address)}"
