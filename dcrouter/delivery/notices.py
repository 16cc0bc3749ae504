"""Which delivery status notifications a delivery attempt produces, and queueing them.

After every attempt :class:`Notices` looks at what happened to each recipient
and at what its client asked with NOTIFY (RFC 3461; none given means
FAILURE,DELAY):

* **failed** (a 5xx, or retries used up): a failure report, unless NOTIFY
  leaves FAILURE out (NEVER, or only SUCCESS/DELAY);
* **delivered** with NOTIFY=SUCCESS: a success report when dcrouter made the
  final delivery (a Maildir: ``Action: delivered``) or passed the message to a
  next hop that does not offer DSN (``Action: relayed``, as Postfix does); a
  next hop that offers DSN got NOTIFY itself and reports on its own;
* **still deferred** once ``email.delivery.delay_warning_time`` has passed since
  the message arrived (0, the default as in Postfix, turns it off): one delay
  report per item, for the recipients that want one.

There is never a report about a report (an item that is itself a DSN) nor one
to the null sender.  A report is an ordinary queue item from the null sender,
routed by its recipient's address (``Destination(BY_ADDRESS)``) like any mail
to that address, with the item's ENVID, each recipient's ORCPT and the
message (or its header, :mod:`dcrouter.delivery.bounce`) in it.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import TYPE_CHECKING, Optional

from twisted.internet import threads

from dcrouter.delivery.bounce import ReportEntry, build_report, success_status
from dcrouter.delivery.classify import classify
from dcrouter.delivery.lines import normalise
from dcrouter.delivery.payload import Payload
from dcrouter.delivery.smtpclient import Outcome
from dcrouter.dsn import DELAYED, DELIVERED, FAILED, RELAYED, EnvelopeDsn, RecipientDsn, wants
from dcrouter.logsetup import get_logger
from dcrouter.message import BY_ADDRESS, DeliveryRequest, Destination, new_queue_id
from dcrouter.queue.item import QueueItem, RecipientState

if TYPE_CHECKING:  # pragma: no cover
    from dcrouter.delivery.system import MultiModeDeliverySystem

log = get_logger("email.delivery")


def envelope_dsn(item: QueueItem) -> Optional[EnvelopeDsn]:
    """The item's DSN parameters as the SMTP client passes them on (None: none given)."""
    per_rcpt = {r.address: RecipientDsn(r.notify, r.orcpt) for r in item.recipients
                if r.notify or r.orcpt}
    dsn = EnvelopeDsn(item.ret, item.envid, per_rcpt)
    return dsn if dsn else None


class Notices:
    """Decides and queues the failure, delay and success reports of a delivery system."""

    def __init__(self, system: "MultiModeDeliverySystem") -> None:
        self.system = system

    async def after_attempt(self, item: QueueItem, results: dict[str, Outcome],
                            failed: list[RecipientState], body: Payload) -> None:
        """Reports on what this attempt finished: ``failed`` recipients (their 5xx, or
        retries used up), and deliveries in ``results`` whose NOTIFY asked for one."""
        asked = [r for r in item.recipients if r.notify and r.address in results
                 and results[r.address].delivered]
        if not failed and not asked:
            return  # the common case: nothing to report
        entries = []
        for r in failed:
            if wants(r.notify, FAILED):
                outcome = results.get(r.address)
                entries.append(ReportEntry(
                    r.address, FAILED, classify(r.code, r.message).status, r.message, r.orcpt,
                    outcome.remote if outcome is not None else ""))
            else:
                log.info("no failure DSN for {queue_id} to {recipient}: NOTIFY={notify}",
                         queue_id=item.id, recipient=r.address, notify=r.notify,
                         correlation_id=item.correlation_id)
        await self._queue(item, entries, body)
        successes = []
        for r in asked:
            outcome = results[r.address]
            if not wants(r.notify, DELIVERED) or (outcome.dsn_passed and not outcome.final):
                continue  # not asked for, or the next hop got NOTIFY=SUCCESS itself
            successes.append(ReportEntry(
                r.address, DELIVERED if outcome.final else RELAYED,
                success_status(outcome.message), outcome.message, r.orcpt,
                "" if outcome.final else outcome.remote))
        await self._queue(item, successes, body)

    async def after_deferral(self, item: QueueItem, body: Payload,
                             now: Optional[float] = None) -> None:
        """The delay report, once, when the item has waited ``delay_warning_time``.

        Called before the deferral is stored, so the mark it leaves on the item
        (``delay_warned``) is stored with it.
        """
        after = self.system.delivery.delay_warning_time
        now = time.time() if now is None else now
        if not after or item.delay_warned or now - item.created_at < after:
            return
        item.delay_warned = True
        entries = [ReportEntry(r.address, DELAYED, classify(r.code, r.message).status,
                               r.message, r.orcpt)
                   for r in item.open_recipients if wants(r.notify, DELAYED)]
        await self._queue(item, entries, body)

    # -- one report -------------------------------------------------------------------------
    async def _queue(self, item: QueueItem, entries: list[ReportEntry], body: Payload) -> None:
        if not entries:
            return
        kind = entries[0].action
        if item.is_bounce or not item.mail_from:
            log.info("no DSN ({kind}) for {queue_id}: {why}", kind=kind, queue_id=item.id,
                     why="it is a bounce" if item.is_bounce else "null sender",
                     correlation_id=item.correlation_id)
            return
        system = self.system
        hostname = system.delivery.helo_name or system.options.hostname
        sender = system.delivery.bounce_sender or f"MAILER-DAEMON@{hostname}"
        try:
            data = normalise(await body.read(), limit=0)
        except Exception:
            data = b""
        report = build_report(item, entries, hostname, sender, data,
                              system.delivery.bounce_size_limit)
        spool = os.path.join(system.state_dir or tempfile.gettempdir(), "spool")
        path = await threads.deferToThread(_write_spool, spool, report)
        # an ordinary item: routed by its recipient's address when it is delivered
        transport = system.transports.for_address(item.mail_from)
        request = DeliveryRequest(queue_id=new_queue_id(), mode="bounce", rule_pattern="",
                                  mail_from="", recipients=[item.mail_from],
                                  via=Destination(BY_ADDRESS), body_path=path,
                                  correlation_id=item.correlation_id, size=len(report),
                                  is_bounce=True, destination=transport.destination)
        ids = await system.queue.enqueue([request])
        system.counters[{FAILED: "bounces", DELAYED: "dsn_delays"}.get(kind, "dsn_successes")] += 1
        log.info("DSN {dsn_id} ({kind}) for {queue_id} queued to {sender}", dsn_id=ids[0],
                 kind=kind, queue_id=item.id, sender=item.mail_from,
                 recipients=[e.address for e in entries], correlation_id=item.correlation_id)


def _write_spool(spool: str, data: bytes) -> str:
    os.makedirs(spool, mode=0o700, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="dsn-", suffix=".eml", dir=spool)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


__all__ = ["Notices", "envelope_dsn"]
