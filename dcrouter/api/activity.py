"""What the console shows of recent mail: counters per domain rule and the last deliveries.

:class:`MailActivity` observes the email service like any plug-in does
(an email event observer and a delivery observer, see
:mod:`dcrouter.interfaces`):

* per rule pattern: recipients accepted (at end of DATA, by the rule that
  routes them now), recipients delivered and bounced (when their queue item
  finishes), and delivery attempts deferred;
* the last :data:`LOG_SIZE` finished deliveries and the last
  :data:`LOG_SIZE` failures (deferrals and bounces), each with its recipients
  and the reply text of the next hop.

Everything is bounded: fixed-length rings, at most :data:`MAX_RULES` rule
keys, :data:`MAX_RECIPIENTS` recipients and :data:`MAX_REPLY` characters of
reply per entry.  Reply texts come from remote servers: they are data, shown
with ``textContent`` by the console, never as markup.  The figures are this
process's own (worker 0 with ``router.workers`` > 1) since the API started.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Optional

from dcrouter.logsetup import get_logger
from dcrouter.service import RouterContext

log = get_logger("api.console")

LOG_SIZE = 50
MAX_RULES = 1000
MAX_RECIPIENTS = 20
MAX_REPLY = 500
#: Rule keys of mail that no configured rule matched, and of DSNs.
DEFAULT_KEY = ""
BOUNCE_KEY = "(dsn)"
COUNTERS = ("accepted", "delivered", "deferred", "bounced")


def _text(value: Any, limit: int = MAX_REPLY) -> str:
    text = value if isinstance(value, str) else str(value or "")
    return text if len(text) <= limit else text[:limit] + "…"


class MailActivity:
    """Rule counters and delivery rings fed by the email service's observer hooks."""

    def __init__(self, context: RouterContext, clock: Callable[[], float] = time.time,
                 size: int = LOG_SIZE) -> None:
        self.context = context
        self.clock = clock
        self.rules: dict[str, collections.Counter[str]] = {}
        self.deliveries: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.failures: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.since = clock()
        self._wired: set[int] = set()

    # -- wiring -------------------------------------------------------------------------
    def wire(self) -> None:
        """Register with the email service's server and delivery parts (once per part)."""
        email = self.context.services.get("email")
        for part in (getattr(email, "server", None), getattr(email, "delivery", None)):
            add = getattr(part, "add_observer", None)
            if callable(add) and id(part) not in self._wired:
                self._wired.add(id(part))
                add(self)

    # -- counters -----------------------------------------------------------------------
    def _count(self, key: str, counter: str, amount: int = 1) -> None:
        counts = self.rules.get(key)
        if counts is None:
            if len(self.rules) >= MAX_RULES:          # forget the longest-known key
                del self.rules[next(iter(self.rules))]
            counts = self.rules[key] = collections.Counter()
        counts[counter] += amount

    def counters_for(self, key: str) -> dict[str, int]:
        """The four counters of one rule key (zeros when nothing happened)."""
        counts: Any = self.rules.get(key, {})
        return {name: int(counts.get(name, 0)) for name in COUNTERS}

    def _rule_key(self, recipient: str) -> str:
        processor = getattr(self.context.services.get("email"), "processor", None)
        match = getattr(processor, "match_rule", None)
        if not callable(match):
            return DEFAULT_KEY
        try:
            rule = match(recipient)
        except Exception:  # an address the router cannot parse: counted as default
            return DEFAULT_KEY
        return getattr(rule, "pattern", DEFAULT_KEY) or DEFAULT_KEY

    @staticmethod
    def item_key(item: Any) -> str:
        """The rule key of a queue item."""
        if getattr(item, "is_bounce", False):
            return BOUNCE_KEY
        return getattr(item, "rule_pattern", "") or DEFAULT_KEY

    # -- email events (IEmailEventObserver) ------------------------------------------------
    def message_received(self, session: Any, message: Any, queue_ids: Any) -> None:
        """Count each recipient for the rule that routes it."""
        for recipient in list(getattr(message, "recipients", []) or []):
            self._count(self._rule_key(str(recipient)), "accepted")

    # -- delivery events (IDeliveryObserver) ---------------------------------------------
    def on_delivery_start(self, item: Any) -> None:
        """Nothing to show before an attempt ends."""

    def on_delivery_success(self, item: Any, result: Any) -> None:
        """Every recipient of ``item`` was delivered."""
        entry = self._entry(item, "delivered", "")
        self._count(self.item_key(item), "delivered", entry["delivered"])
        self.deliveries.append(entry)

    def on_delivery_failed(self, item: Any, error: Any, permanent: bool) -> None:
        """An attempt deferred ``item``, or it finished with failed recipients."""
        key = self.item_key(item)
        entry = self._entry(item, "bounced" if permanent else "deferred", _text(error))
        if permanent:
            self._count(key, "delivered", entry["delivered"])
            self._count(key, "bounced", entry["bounced"])
            if entry["delivered"]:
                self.deliveries.append(entry)
        else:
            self._count(key, "deferred")
        self.failures.append(entry)

    def _entry(self, item: Any, outcome: str, error: str) -> dict[str, Any]:
        recipients = list(getattr(item, "recipients", []) or [])
        shown: list[dict[str, Any]] = []
        delivered = bounced = 0
        for rcpt in recipients:
            status = str(getattr(rcpt, "status", ""))
            delivered += status == "delivered"
            bounced += status == "failed"
            if len(shown) < MAX_RECIPIENTS:
                code = getattr(rcpt, "code", None)
                shown.append({"address": str(getattr(rcpt, "address", "")), "status": status,
                              "code": code if isinstance(code, int) else None,
                              "reply": _text(getattr(rcpt, "message", ""))})
        return {
            "time": self.clock(),
            "queue_id": str(getattr(item, "id", "")),
            "rule": self.item_key(item),
            "mode": str(getattr(item, "mode", "")),
            "destination": str(getattr(item, "destination", "")),
            "mail_from": str(getattr(item, "mail_from", "")),
            "attempts": int(getattr(item, "attempts", 0) or 0),
            "outcome": outcome,
            "error": error,
            "recipients": shown,
            "more_recipients": max(0, len(recipients) - len(shown)),
            "delivered": delivered,
            "bounced": bounced,
            "correlation_id": str(getattr(item, "correlation_id", "")),
        }

    def recent(self, limit: Optional[int] = None) -> dict[str, Any]:
        """The newest deliveries and failures first."""
        deliveries = list(reversed(self.deliveries))
        failures = list(reversed(self.failures))
        if limit is not None:
            deliveries, failures = deliveries[:limit], failures[:limit]
        return {"deliveries": deliveries, "failures": failures, "since": self.since,
                "size": self.deliveries.maxlen}
