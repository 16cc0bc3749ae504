"""The mail log's summary: one line per recipient and delivery attempt, as Postfix writes.

An :class:`~dcrouter.interfaces.IDeliveryObserver` on the delivery system
(added by :class:`dcrouter.daemon.DaemonRouter`).  After every attempt, each
recipient that was still open when it began gets one line in the
``dcrouter.email.delivery`` log::

    3f9c2a1b7d: to=<alice@example.net>, relay=mx(example.net), delay=1.4, tries=1, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 4XyZ)
    3f9c2a1b7d: to=<bob@example.org>, relay=10.0.0.7:25, delay=61, tries=2, dsn=4.4.1, status=deferred (451 4.4.1 connection refused)
    3f9c2a1b7d: to=<nobody@example.com>, relay=local, delay=0.02, tries=1, dsn=5.1.1, status=bounced (550 5.1.1 no such mailbox)

``delay`` is the seconds since the message was queued, ``relay`` where the
route sends it (``host:port`` of a forward route, ``mx(domain)`` for MX
delivery, ``local`` for a Maildir), ``dsn`` the enhanced status code of the
reply (or one made from its class: 2.0.0, 4.0.0, 5.0.0), ``status`` ``sent``,
``deferred`` or ``bounced`` followed by the last reply.  In JSON logs the same
facts are fields (``event = "mail.summary"``), so ``jq 'select(.status ==
"bounced")'`` finds the bounces.
"""

from __future__ import annotations

import re
import time
from typing import Any

from zope.interface import implementer

from dcrouter.interfaces import IDeliveryObserver
from dcrouter.logsetup import get_logger

log = get_logger("email.delivery")

_ENHANCED = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")


def dsn_of(code: int, reply: str) -> str:
    """The enhanced status code in ``reply``, else one from the reply's class."""
    match = _ENHANCED.match(reply or "")
    if match:
        return match.group(1)
    klass = code // 100 if code > 0 else (5 if reply.startswith("5") else 4)
    return f"{klass if klass in (2, 4, 5) else 4}.0.0"


def relay_of(destination: str, recipient: str) -> str:
    """Where an item with this scheduling key (``QueueItem.destination``: ``host:port`` of a
    forward transport, ``local``, or the recipient domain for MX) sends ``recipient``."""
    if destination == "local":
        return "local"
    if ":" in destination:
        return destination
    return f"mx({(destination or recipient.rpartition('@')[2]).lower()})"


def _clean(text: str) -> str:
    return " ".join((text or "").split())[:300]


@implementer(IDeliveryObserver)
class MailSummaryLog:
    """Writes the summary lines (see the module docstring)."""

    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock
        self._open: dict[str, list[str]] = {}
        self.lines = 0

    def on_delivery_start(self, item: Any) -> None:
        """Remember which recipients this attempt is for."""
        self._open[item.id] = [r.address for r in item.recipients if r.open]

    def on_delivery_success(self, item: Any, result: Any) -> None:
        """Every recipient was delivered."""
        self._summarise(item)

    def on_delivery_failed(self, item: Any, error: Any, permanent: bool) -> None:
        """Some or all recipients failed or were deferred."""
        self._summarise(item)

    def _summarise(self, item: Any) -> None:
        addresses = self._open.pop(item.id, None)
        if addresses is None:
            addresses = [r.address for r in item.recipients]
        by_address = {r.address: r for r in item.recipients}
        created = getattr(item, "created_at", None) or self.clock()
        delay = max(0.0, self.clock() - created)
        for address in addresses:
            rcpt = by_address.get(address)
            if rcpt is None:
                continue
            status = "sent" if rcpt.status == "delivered" else \
                "bounced" if rcpt.status == "failed" else "deferred"
            reply = _clean(rcpt.message) or _clean(item.last_error) or "no reply"
            self.lines += 1
            log.info("{queue_id}: to=<{recipient}>, relay={relay}, delay={delay:.3g}, "
                     "tries={tries}, dsn={dsn}, status={status} ({reply})",
                     queue_id=item.id, recipient=address,
                     relay=relay_of(getattr(item, "destination", ""), address), delay=delay,
                     tries=item.attempts, dsn=dsn_of(rcpt.code, reply), status=status,
                     reply=reply, sender=item.mail_from, correlation_id=item.correlation_id,
                     event="mail.summary")
