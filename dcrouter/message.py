"""The message and session records shared by every stage of the mail path.

These are the stored-message format's in-memory shapes: what the SMTP server
knows about a session (:class:`SessionInfo`), what it received
(:class:`ReceivedMessage`), and what the processor asks the queue to deliver
(:class:`DeliveryRequest` with its :class:`Destination`).  They sit below
``email/``, ``queue/`` and ``delivery/`` so each can import them without
importing the others.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from typing import Any, NamedTuple, Optional

from dcrouter.dsn import EnvelopeDsn

_BASE32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_queue_id() -> str:
    """A sortable, unique queue id: 10 chars of milliseconds + 10 random (Crockford base32).

    Like Postfix's long queue ids: time-ordered, safe as a file name.
    """
    ms = int(time.time() * 1000)
    rnd = int.from_bytes(os.urandom(7), "big")
    out = []
    for _ in range(10):
        out.append(_BASE32[ms & 31])
        ms >>= 5
    head = "".join(reversed(out))
    out = []
    for _ in range(10):
        out.append(_BASE32[rnd & 31])
        rnd >>= 5
    return head + "".join(out)


def new_correlation_id() -> str:
    """A correlation id that ties a session's log events to its deliveries."""
    return uuid.uuid4().hex[:16]


@dataclasses.dataclass
class SessionInfo:
    """What the SMTP server knows about one client session."""

    correlation_id: str
    client_ip: str
    client_port: int
    local_port: int
    helo: str = ""
    tls: bool = False
    tls_version: str = ""
    tls_cipher: str = ""
    auth_user: str = ""
    relay_permitted: bool = False
    submission: bool = False
    #: The client greeted with EHLO (False after HELO).
    esmtp: bool = True

    @property
    def protocol(self) -> str:
        """The ``with`` of the Received header (RFC 3848): SMTP after HELO, else ESMTP,
        ESMTPS (TLS), ESMTPA (AUTH) or ESMTPSA (TLS + AUTH)."""
        return self.protocol_for(False)

    def protocol_for(self, smtputf8: bool) -> str:
        """:attr:`protocol` for a transaction; with SMTPUTF8 the RFC 6531 3.7.3 names
        UTF8SMTP, UTF8SMTPS, UTF8SMTPA and UTF8SMTPSA.  RFC 3848's suffixes are defined
        for ESMTP only: a HELO session is ``SMTP`` with TLS too (as Postfix writes it)."""
        if not self.esmtp:
            return "SMTP"
        suffix = ("S" if self.tls else "") + ("A" if self.auth_user else "")
        return ("UTF8SMTP" if smtputf8 else "ESMTP") + suffix

    @property
    def may_relay(self) -> bool:
        """Authenticated or inside relay_networks: may send to any domain."""
        return self.relay_permitted or bool(self.auth_user)


@dataclasses.dataclass
class ReceivedMessage:
    """A message the SMTP server accepted into its spool, before processing.

    ``spool_path`` holds the whole message as received (CRLF line endings,
    dot-stuffing removed) with dcrouter's ``Received:`` header first.
    """

    queue_id: str
    mail_from: str
    recipients: list[str]
    spool_path: str
    size: int
    session: SessionInfo
    received_at: float = dataclasses.field(default_factory=time.time)
    smtputf8: bool = False
    body_8bit: bool = False
    #: RET, ENVID and each recipient's NOTIFY/ORCPT (RFC 3461); None: none given.
    dsn: Optional[EnvelopeDsn] = None


@dataclasses.dataclass(frozen=True)
class Route:
    """A literal next hop: how to deliver without looking a rule up.

    ``kind`` is ``"forward"`` (relay to ``server:port``), ``"mx"`` (look up the
    recipient domain's MX hosts) or ``"local"`` (Maildir under ``local_path``).
    It never carries credentials: those are looked up at delivery time
    (:mod:`dcrouter.delivery.transport`), so nothing secret reaches a queue store.
    """

    kind: str
    server: str = ""
    port: int = 25
    require_tls: bool = False
    ca_path: str = ""
    local_path: str = ""

    def destination(self, recipient_domain: str = "") -> str:
        """The key used for per-destination limits and connection reuse."""
        if self.kind == "forward":
            return f"{self.server}:{self.port}"
        if self.kind == "local":
            return "local"
        return recipient_domain.lower()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for storage."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Route":
        """Inverse of :meth:`to_dict`; unknown keys (the credentials and DKIM fields of the
        version 1 queue format among them) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


#: Destination kinds: how a queue item's transport is found at delivery time.
BY_RULE = "rule"        # the domain rule named by ``rule_pattern`` ("" = the default route)
BY_ADDRESS = "address"  # each recipient's address is matched against the rules (DSNs)
NEXTHOP = "nexthop"     # a literal :class:`Route` (plug-ins and tests; never credentials)
DESTINATION_KINDS = (BY_RULE, BY_ADDRESS, NEXTHOP)


@dataclasses.dataclass(frozen=True)
class Destination:
    """Where a queue item goes, as a reference resolved again at every delivery attempt.

    The queue keeps this, not a resolved transport: like Postfix's queue manager
    asking trivial-rewrite and transport(5) each time, a reload reaches queued
    mail and no password is ever stored.  ``BY_RULE`` items name their rule by the
    item's ``rule_pattern``; ``NEXTHOP`` items carry ``nexthop``.
    """

    kind: str = BY_RULE
    nexthop: Optional[Route] = None

    def __post_init__(self) -> None:
        if self.kind not in DESTINATION_KINDS:
            raise ValueError(f"unknown destination kind {self.kind!r}")
        if (self.kind == NEXTHOP) != (self.nexthop is not None):
            raise ValueError("a nexthop destination needs a route, and only it has one")

    @classmethod
    def to(cls, route: Route) -> "Destination":
        """A literal next hop."""
        return cls(NEXTHOP, route)

    @property
    def per_domain(self) -> bool:
        """Is the scheduling key the recipient domain (MX delivery, or not known here)?"""
        return self.nexthop is None or self.nexthop.kind == "mx"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for storage and the API (the next hop's non-default fields only)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.nexthop is not None:
            out["nexthop"] = {k: v for k, v in self.nexthop.to_dict().items()
                              if k == "kind" or v != _ROUTE_DEFAULTS[k]}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Destination":
        """Inverse of :meth:`to_dict` (ValueError/TypeError when malformed)."""
        hop = data.get("nexthop")
        return cls(str(data["kind"]), Route.from_dict(hop) if isinstance(hop, dict) else None)


_ROUTE_DEFAULTS = Route(kind="").to_dict()
#: The destination of every item that names its rule (shared: most items are these).
RULE_DESTINATION = Destination(BY_RULE)


class DkimSigning(NamedTuple):
    """What to DKIM-sign a queued message with: ``d=`` and ``s=`` (the key stays in the store).

    Decided when the message is accepted, applied at delivery.
    """

    domain: str
    selector: str


@dataclasses.dataclass
class DeliveryRequest:
    """What the processor asks the queue to deliver: one rule's recipients of one message.

    ``via`` says how the transport is found at delivery time (by default: the rule
    named by ``rule_pattern``); ``destination`` is the scheduling key for
    per-destination limits (``host:port``, ``local``; empty: the recipient domain,
    and the queue splits the request by domain).  ``dkim`` is the signing
    decision taken at enqueue (None: unsigned).  ``dsn`` carries the client's RFC
    3461 parameters (RET, ENVID, NOTIFY and ORCPT per recipient) into the items.

    ``body_path`` is a complete message file; the queue takes it over (moves or
    links it into its own storage) before ``enqueue`` fires.  Several requests
    of one message may name the same ``body_path``: the queue then stores the
    body once.
    """

    queue_id: str
    mode: str
    rule_pattern: str
    mail_from: str
    recipients: list[str]
    via: Destination
    body_path: str
    correlation_id: str
    size: int = 0
    is_bounce: bool = False
    destination: str = ""
    extra: Optional[dict[str, Any]] = None
    dkim: Optional[DkimSigning] = None
    dsn: Optional[EnvelopeDsn] = None
