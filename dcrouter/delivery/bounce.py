"""Delivery status notifications (RFC 3464 ``multipart/report``): failed, delayed, delivered.

A report goes to the envelope sender of the message it is about, from the
null sender, and is itself never reported on (:mod:`dcrouter.delivery.notices`
decides when one is due).  Its three parts: a human-readable explanation, the
machine-readable ``message/delivery-status`` (per message: ``Reporting-MTA``,
``Original-Envelope-Id`` when the client gave ENVID, ``Arrival-Date``; per
recipient: ``Original-Recipient`` (the ORCPT given, else the address),
``Final-Recipient``, ``Action``, ``Status``, ``Remote-MTA``,
``Diagnostic-Code``), and the message returned: whole (``message/rfc822``) or
its header only (``text/rfc822-headers``).

What is returned follows Postfix: a failure report returns the whole message
unless the client said ``RET=HDRS`` or the message is larger than
``bounce_size_limit`` (then the header only, so the MIME structure stays
whole); delay and success reports return the header only.  When the message
was sent with UTF-8 addresses (SMTPUTF8) the parts are RFC 6533's
``message/global-delivery-status`` and ``message/global`` /
``message/global-headers``.

Addresses and diagnostics come from strangers (envelope, next-hop replies):
each goes through :func:`dcrouter.address.header_text`, so no CR or LF of
theirs can start a header field of ours; ENVID and ORCPT were validated as
printable by :mod:`dcrouter.dsn` already.
"""

from __future__ import annotations

import dataclasses
import email.utils
import uuid
from dcrouter.address import header_text
from dcrouter.dsn import DELAYED, DELIVERED, FAILED, orcpt_for, report_address
from dcrouter.queue.item import QueueItem

_CRLF = "\r\n"
#: Postfix's bounce_size_limit: a failed message larger than this is returned as headers.
DEFAULT_SIZE_LIMIT = 50000

_SUBJECTS = {FAILED: "Undelivered Mail Returned to Sender",
             DELAYED: "Delayed Mail (still being retried)",
             DELIVERED: "Successful Mail Delivery Report"}
_INTROS = {
    FAILED: ["Your message could not be delivered to one or more recipients.",
             "The reasons are given below; the message is attached."],
    DELAYED: ["Your message could not be delivered yet to one or more recipients.",
              "It is still queued and will be retried; you do not need to send it again.",
              "You will be told if it finally fails."],
    DELIVERED: ["Your message was delivered to the recipients listed below, as you asked.",
                "A message that was relayed to a system without delivery notifications may",
                "still fail there: that system would tell you."],
}


@dataclasses.dataclass(frozen=True)
class ReportEntry:
    """One recipient in a report: its envelope address, ORCPT, what happened and why."""

    address: str
    action: str
    status: str
    diagnostic: str
    orcpt: str = ""
    remote: str = ""


def original_headers(message: bytes, limit: int = 65536) -> bytes:
    """The header block of ``message`` (without the body), at most ``limit`` bytes."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end + 2]
    return head[:limit]


def build_report(item: QueueItem, entries: list[ReportEntry], reporting_mta: str,
                 from_address: str, message: bytes,
                 size_limit: int = DEFAULT_SIZE_LIMIT) -> bytes:
    """The report (CRLF line endings) on ``entries`` of ``item``, to its sender.

    ``message`` is the original (CRLF lines); ``size_limit`` is
    ``bounce_size_limit`` (0: no limit).
    """
    actions = {e.action for e in entries}
    kind = FAILED if FAILED in actions else DELAYED if DELAYED in actions else DELIVERED
    full = kind == FAILED and item.ret != "HDRS" and bool(message) and (
        not size_limit or len(message) <= size_limit)
    utf8 = not (item.mail_from.isascii() and all(
        e.address.isascii() and e.orcpt.isascii() for e in entries))
    boundary = f"dsn-{uuid.uuid4().hex}"
    now = email.utils.formatdate(localtime=False)
    lines = [
        f"From: Mail Delivery System <{from_address}>",
        f"To: <{header_text(item.mail_from)}>",
        f"Subject: {_SUBJECTS[kind]}",
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
        *_INTROS[kind],
        "",
    ]
    for e in entries:
        lines.append(f"<{header_text(e.address)}>: {e.action}: "
                     f"{_one_line(e.diagnostic) or e.status}")
    lines += [
        "",
        f"--{boundary}",
        f"Content-Type: message/{'global-' if utf8 else ''}delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Dcrouter-Queue-ID: {item.id}",
    ]
    if item.envid:
        lines.append(f"Original-Envelope-Id: {header_text(item.envid)}")
    lines.append(f"Arrival-Date: {email.utils.formatdate(item.created_at, localtime=False)}")
    for e in entries:
        lines += [
            "",
            f"Original-Recipient: {_field(e.orcpt or orcpt_for(e.address), utf8)}",
            f"Final-Recipient: {_field(orcpt_for(e.address), utf8)}",
            f"Action: {e.action}",
            f"Status: {e.status}",
        ]
        if e.remote:
            lines.append(f"Remote-MTA: dns; {header_text(e.remote)}")
        if e.diagnostic:
            lines.append(f"Diagnostic-Code: smtp; {_one_line(e.diagnostic)}")
        if e.action in (FAILED, DELAYED):
            lines.append(f"Last-Attempt-Date: {now}")
    returned, content_type = _returned(message, full, utf8)
    lines += [
        "",
        f"--{boundary}",
        f"Content-Type: {content_type}",
        f"Content-Description: {'Undelivered ' if kind != DELIVERED else ''}"
        f"Message{'' if full else ' Headers'}",
    ]
    if not returned.isascii():
        lines.append("Content-Transfer-Encoding: 8bit")
    lines.append("")
    head = _CRLF.join(lines).encode("utf-8") + b"\r\n"
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    return head + returned.rstrip(b"\r\n") + b"\r\n" + tail


def _returned(message: bytes, full: bool, utf8: bool) -> tuple[bytes, str]:
    """The part that returns the message: its bytes and its content type."""
    if full:
        return message, "message/global" if utf8 else "message/rfc822"
    return original_headers(message), ("message/global-headers" if utf8
                                        else "text/rfc822-headers")


def _field(orcpt: str, utf8: bool) -> str:
    return header_text(report_address(orcpt, utf8))


def _one_line(text: str) -> str:
    return header_text(" ".join(text.split()))[:500]


def success_status(reply: str, default: str = "2.0.0") -> str:
    """The 2.x.x status in a success reply, or ``default``."""
    for word in reply.split()[:2]:
        parts = word.split(".")
        if len(parts) == 3 and parts[0] == "2" and all(p.isdigit() for p in parts):
            return word
    return default


__all__ = ["DEFAULT_SIZE_LIMIT", "ReportEntry", "build_report",
           "original_headers", "success_status"]
