"""Queue items: one message's envelope for one destination, with per-recipient state.

A :class:`QueueItem` is what every store keeps and what the delivery system
works on (the seed's ``IQueueItem``).  It serialises to compact JSON for the
disk and Redis stores and to a plain dict for the management API.

An item holds a :class:`~dcrouter.message.Destination` (a reference: its rule,
the recipients' addresses, or a literal next hop without credentials), never a
resolved transport: the delivery system resolves it at every attempt
(:mod:`dcrouter.delivery.transport`).  Format version 2 stores that; version 1
records (which froze the whole route, passwords included) still load: the route
becomes the rule reference or, for a bounce, routing by address; the
credentials and the DKIM fields (``d=`` came from the envelope) are dropped.
The DSN fields (RET, ENVID, each recipient's NOTIFY and ORCPT, the delay
notice sent) are stored only when set, so records without them - those of
older versions among them - load with none.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
from typing import Any, Optional

from dcrouter.message import (
    BY_ADDRESS, RULE_DESTINATION, DeliveryRequest, Destination, DkimSigning,
)

#: Item states.
PENDING = "pending"
PROCESSING = "processing"
DELIVERED = "delivered"
FAILED = "failed"
DEFERRED = "deferred"
STATUSES = (PENDING, PROCESSING, DELIVERED, FAILED, DEFERRED)
#: States in which an item still waits for delivery.
WAITING = (PENDING, DEFERRED)


class RecipientState:
    """One recipient of an item and what happened to it so far.

    ``notify`` and ``orcpt`` are the client's RFC 3461 NOTIFY and ORCPT for it
    (canonical NOTIFY, decoded ``type;address``; ``""`` when not given).
    """

    __slots__ = ("address", "status", "code", "message", "notify", "orcpt")

    def __init__(self, address: str, status: str = PENDING, code: int = 0,
                 message: str = "", notify: str = "", orcpt: str = "") -> None:
        self.address = address
        self.status = status
        self.code = code
        self.message = message
        self.notify = notify
        self.orcpt = orcpt

    @property
    def open(self) -> bool:
        """Still to be delivered (not delivered, not failed)."""
        return self.status not in (DELIVERED, FAILED)

    def to_list(self) -> list[Any]:
        """Compact form for storage (the DSN fields only when given: older versions' records
        have four entries, and load with none)."""
        out = [self.address, self.status, self.code, self.message]
        if self.notify or self.orcpt:
            out += [self.notify, self.orcpt]
        return out

    @classmethod
    def from_list(cls, data: list[Any]) -> "RecipientState":
        """Inverse of :meth:`to_list`."""
        notify, orcpt = (str(data[4]), str(data[5])) if len(data) >= 6 else ("", "")
        return cls(str(data[0]), str(data[1]), int(data[2]), str(data[3]),
                   sys.intern(notify), orcpt)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the API."""
        out: dict[str, Any] = {"address": self.address, "status": self.status,
                               "code": self.code, "message": self.message}
        if self.notify or self.orcpt:
            out.update(notify=self.notify, orcpt=self.orcpt)
        return out


class QueueItem:
    """A queued delivery: envelope, destination, state and a reference to the stored body.

    ``via`` is how the transport is found at delivery; ``destination`` is the
    scheduling key (``host:port``, ``local`` or the recipient domain) the stores
    count items by.  ``ret`` and ``envid`` are the client's RFC 3461 RET and ENVID
    (``""``: not given); ``delay_warned`` says the delay notice went out.
    """

    lazy = False

    __slots__ = ("id", "mode", "rule_pattern", "mail_from", "recipients", "status", "attempts",
                 "next_attempt", "last_error", "created_at", "updated_at", "delivered_at",
                 "correlation_id", "via", "body_ref", "size", "is_bounce", "destination",
                 "dkim", "ret", "envid", "delay_warned",
                 "sched", "lease_owner", "stored_status")

    def __init__(self, *, id: str, mode: str, rule_pattern: str, mail_from: str,
                 recipients: list[RecipientState], body_ref: str,
                 via: Destination = RULE_DESTINATION,
                 correlation_id: str = "", size: int = 0, is_bounce: bool = False,
                 status: str = PENDING, attempts: int = 0, next_attempt: float = 0.0,
                 last_error: str = "", created_at: Optional[float] = None,
                 updated_at: Optional[float] = None, delivered_at: float = 0.0,
                 destination: str = "", dkim: Optional[DkimSigning] = None,
                 ret: str = "", envid: str = "", delay_warned: bool = False) -> None:
        now = time.time()
        self.id = id
        self.mode = mode
        self.rule_pattern = rule_pattern
        self.mail_from = mail_from
        self.recipients = recipients
        self.via = via
        self.body_ref = body_ref
        self.correlation_id = correlation_id
        self.size = size
        self.is_bounce = is_bounce
        self.status = status
        self.attempts = attempts
        self.next_attempt = next_attempt or now
        self.last_error = last_error
        self.created_at = created_at if created_at is not None else now
        self.updated_at = updated_at if updated_at is not None else now
        self.delivered_at = delivered_at
        self.destination = destination or compute_destination(via, recipients)
        self.dkim = dkim  # d= and s= to sign with at delivery (None: unsigned)
        self.ret = ret
        self.envid = envid
        self.delay_warned = delay_warned
        self.sched = 0          # sequence number of the item's live heap entry
        self.lease_owner = ""   # who holds it while processing
        self.stored_status = ""  # the status a store counted it under

    @classmethod
    def from_request(cls, request: DeliveryRequest, item_id: str, body_ref: str,
                     recipients: Optional[list[str]] = None) -> "QueueItem":
        """A new pending item for ``request`` (or a subset of its recipients)."""
        rcpts = recipients if recipients is not None else request.recipients
        dsn = request.dsn
        if dsn:
            states = []
            for r in rcpts:
                params = dsn.for_recipient(r)
                states.append(RecipientState(r, notify=params.notify, orcpt=params.orcpt))
        else:
            states = [RecipientState(r) for r in rcpts]
        return cls(id=item_id, mode=request.mode, rule_pattern=request.rule_pattern,
                   mail_from=request.mail_from, recipients=states, via=request.via,
                   body_ref=body_ref, correlation_id=request.correlation_id,
                   size=request.size, is_bounce=request.is_bounce,
                   destination=request.destination, dkim=request.dkim,
                   ret=dsn.ret if dsn else "", envid=dsn.envid if dsn else "")

    @property
    def open_recipients(self) -> list[RecipientState]:
        """Recipients still to be delivered."""
        return [r for r in self.recipients if r.open]

    @property
    def finished(self) -> bool:
        """No recipient is left to deliver."""
        return not any(r.open for r in self.recipients)

    def to_json(self) -> bytes:
        """The stored form (compact JSON, format version 2; never a credential)."""
        data: dict[str, Any] = {
            "v": 2, "id": self.id, "mode": self.mode, "rule": self.rule_pattern,
            "from": self.mail_from, "rcpt": [r.to_list() for r in self.recipients],
            "body": self.body_ref, "cid": self.correlation_id,
            "size": self.size, "bounce": self.is_bounce, "status": self.status,
            "attempts": self.attempts, "next": self.next_attempt, "err": self.last_error,
            "created": self.created_at, "updated": self.updated_at,
            "delivered": self.delivered_at, "dest": self.destination,
        }
        if self.via is not RULE_DESTINATION:
            data["via"] = self.via.to_dict()
        if self.dkim:
            data["dkim"] = list(self.dkim)
        if self.ret:
            data["ret"] = self.ret
        if self.envid:
            data["envid"] = self.envid
        if self.delay_warned:
            data["dwarn"] = True
        return json.dumps(data, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "QueueItem":
        """Inverse of :meth:`to_json` (formats 1 and 2); ValueError/KeyError/TypeError when
        malformed."""
        d = json.loads(data)
        if not isinstance(d, dict) or d.get("v") not in (1, 2):
            raise ValueError("not a queue item")
        status = d["status"]
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        if d["v"] == 1:
            via, dkim = _from_v1(d)
        else:
            via = shared_destination(d["via"]) if "via" in d else RULE_DESTINATION
            dkim = DkimSigning(*map(sys.intern, map(str, d["dkim"][:2]))) if d.get("dkim") \
                else None
        return cls(id=str(d["id"]), mode=sys.intern(str(d["mode"])),
                   rule_pattern=sys.intern(str(d["rule"])), mail_from=str(d["from"]),
                   recipients=[RecipientState.from_list(r) for r in d["rcpt"]],
                   via=via, body_ref=str(d["body"]),
                   correlation_id=str(d["cid"]), size=int(d["size"]),
                   is_bounce=bool(d["bounce"]), status=status, attempts=int(d["attempts"]),
                   next_attempt=float(d["next"]), last_error=str(d["err"]),
                   created_at=float(d["created"]), updated_at=float(d["updated"]),
                   delivered_at=float(d["delivered"]),
                   destination=sys.intern(str(d["dest"])), dkim=dkim,
                   ret=str(d.get("ret", "")), envid=str(d.get("envid", "")),
                   delay_warned=bool(d.get("dwarn", False)))

    def journal_payload(self) -> bytes:
        """Index fields, then the JSON: what the disk journal stores (see :class:`StoredItem`)."""
        dest = urllib.parse.quote(self.destination, safe="") or "-"
        return b"%r %s %s %d %r %s " % (self.next_attempt, self.status.encode("ascii"),
                                        dest.encode("ascii"), self.size, self.created_at,
                                        self.body_ref.encode("ascii")) + self.to_json()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the management API."""
        return {
            "id": self.id, "mode": self.mode, "rule_pattern": self.rule_pattern,
            "mail_from": self.mail_from, "recipients": [r.to_dict() for r in self.recipients],
            "status": self.status, "attempts": self.attempts, "next_attempt": self.next_attempt,
            "last_error": self.last_error, "created_at": self.created_at,
            "updated_at": self.updated_at, "delivered_at": self.delivered_at,
            "correlation_id": self.correlation_id, "via": self.via.to_dict(),
            "destination": self.destination, "size": self.size, "is_bounce": self.is_bounce,
            "dkim": self.dkim._asdict() if self.dkim else None,
            "ret": self.ret, "envid": self.envid, "delay_warned": self.delay_warned,
        }

    def __repr__(self) -> str:
        return f"<QueueItem {self.id} {self.status} {self.destination} attempts={self.attempts}>"


def compute_destination(via: Destination, recipients: list[RecipientState]) -> str:
    """The scheduling key of an item that has none yet: a literal next hop's, or the
    first recipient's domain."""
    domain = recipients[0].address.rpartition("@")[2] if recipients else ""
    if via.nexthop is not None:
        return via.nexthop.destination(domain)
    return domain.lower()


_DESTINATIONS: dict[str, Destination] = {}


def shared_destination(data: dict[str, Any]) -> Destination:
    """One Destination object per distinct value (many items share few: saves memory)."""
    key = json.dumps(data, sort_keys=True)
    found = _DESTINATIONS.get(key)
    if found is None:
        if len(_DESTINATIONS) > 10000:
            _DESTINATIONS.clear()
        found = _DESTINATIONS[key] = Destination.from_dict(data)
    return found


def _from_v1(d: dict[str, Any]) -> tuple[Destination, Optional[DkimSigning]]:
    """A version 1 record's frozen route as a destination (and no DKIM decision).

    The route named the transport the processor had resolved; now the rule is
    looked up again (``rule`` "" is the default route), a bounce is routed by its
    recipient's address (as its route was made), and the credentials are dropped.
    Its ``dkim_*`` fields are ignored: that version took ``d=`` from the envelope,
    which an outsider chose, so such items go out unsigned.
    """
    route = d.get("route") or {}
    if not isinstance(route, dict):
        raise ValueError("malformed route")
    via = Destination(BY_ADDRESS) if d.get("bounce") or d.get("mode") == "bounce" \
        else RULE_DESTINATION
    return via, None


class StoredItem:
    """An item known by its index fields only; the rest is parsed when needed.

    The disk store recovers items as StoredItems (a few fields split from the
    journal record instead of a full JSON parse), which makes restarts fast
    and keeps memory low; ``materialize`` gives the full :class:`QueueItem`.
    """

    lazy = True
    __slots__ = ("id", "status", "next_attempt", "destination", "size", "body_ref",
                 "created_at", "sched", "stored_status", "lease_owner", "raw")

    def __init__(self, item_id: str, payload: bytes) -> None:
        parts = payload.split(b" ", 6)
        if len(parts) != 7:
            raise ValueError("malformed journal payload")
        self.id = item_id
        self.next_attempt = float(parts[0])
        status = parts[1].decode("ascii")
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        self.status = status
        dest = parts[2].decode("ascii")
        self.destination = sys.intern(urllib.parse.unquote(dest) if "%" in dest else
                                      ("" if dest == "-" else dest))
        self.size = int(parts[3])
        self.created_at = float(parts[4])
        self.body_ref = parts[5].decode("ascii")
        self.raw = parts[6]
        self.sched = 0
        self.stored_status = ""
        self.lease_owner = ""

    def materialize(self) -> QueueItem:
        """The full item (raises ValueError/KeyError/TypeError when the JSON is damaged)."""
        item = QueueItem.from_json(self.raw)
        item.status = self.status
        item.next_attempt = self.next_attempt
        item.sched = self.sched
        item.stored_status = self.stored_status
        item.lease_owner = self.lease_owner
        return item
