"""Resolving a queue item's destination to a transport, at every delivery attempt.

The queue holds a :class:`~dcrouter.message.Destination` - the domain rule that
accepted the recipients, "the recipients' addresses" (DSNs) or a literal next
hop - never a resolved route.  Like Postfix's queue manager asking
trivial-rewrite and transport(5) for every delivery, and looking passwords up
in ``smtp_sasl_password_maps`` only when it connects, the delivery system asks
:class:`TransportResolver` each time it takes an item:

* a rule reference is looked up by pattern in the rules in force *now*, so a
  reload or an API change reaches mail already queued (new target, TLS,
  credentials, local path);
* the default route (``rule_pattern`` "") follows ``default_mode`` and
  ``default_server`` as configured now;
* a DSN (routed by address) goes where mail to its recipient would go now;
* the credentials come from the configuration and live only in memory, in the
  :class:`Transport` of one attempt.

A rule that no longer exists (deleted, renamed) does not resolve: like
Postfix's "mail transport unavailable", the item is deferred with a reason
that names the rule, waits for the rule to return, and bounces when its
retries are used up (``email.queue.max_retries``, dcrouter's maximum queue
lifetime).  It is not re-routed by the recipient address, because a rule
decides more than the next hop (the relay permission, scanning, signing) and
those were decided for the old rule at acceptance.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Protocol, Sequence

from dcrouter.config.base import REDACTED
from dcrouter.config.email import DomainRuleOptions, EmailOptions
from dcrouter.errors import ConfigError
from dcrouter.message import BY_ADDRESS, BY_RULE, NEXTHOP, Destination, Route


@dataclasses.dataclass(frozen=True)
class Credentials:
    """AUTH user and password for one next hop (memory only; the repr hides the password)."""

    user: str
    password: str = dataclasses.field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, password={REDACTED!r})"


@dataclasses.dataclass(frozen=True)
class Transport:
    """How one attempt delivers: the resolved next hop.

    ``kind`` is ``forward`` (``server:port``), ``mx`` (the MX hosts of the
    domain in ``server``) or ``local`` (Maildirs under ``local_path``).  Equal
    transports share connections; ``source`` (what resolved it) is left out of
    that comparison.
    """

    kind: str
    server: str = ""
    port: int = 25
    require_tls: bool = False
    ca_path: str = ""
    local_path: str = ""
    credentials: Optional[Credentials] = None
    source: str = dataclasses.field(default="", compare=False)

    @property
    def destination(self) -> str:
        """The scheduling key: ``host:port``, the recipient domain, or ``local``."""
        if self.kind == "forward":
            return f"{self.server}:{self.port}"
        if self.kind == "local":
            return "local"
        return self.server

    @property
    def smtp(self) -> bool:
        """Delivered over SMTP (forward or MX)?"""
        return self.kind in ("forward", "mx")

    def describe(self) -> str:
        """One line for logs, without secrets."""
        if self.kind == "forward":
            what = f"forward to {self.server}:{self.port}" + (", TLS" if self.require_tls else "")
            if self.credentials is not None:
                what += f", AUTH as {self.credentials.user}"
        elif self.kind == "mx":
            what = f"MX of {self.server}"
        else:
            what = f"Maildir under {self.local_path}"
        return f"{what} ({self.source})" if self.source else what


@dataclasses.dataclass
class Resolution:
    """Some recipients of an item and their transport, or why there is none now."""

    transport: Optional[Transport]
    recipients: list[str]
    error: str = ""


class RuleLookup(Protocol):
    """The domain rules in force (``email.routing.DomainRouter`` is one)."""

    def get_rule(self, pattern: str) -> Optional[DomainRuleOptions]:
        """The rule whose pattern is ``pattern``, or None."""

    def match_rule(self, address: str) -> Optional[DomainRuleOptions]:
        """The rule that handles mail to ``address``, or None (the default route)."""


class ItemLike(Protocol):
    """What resolution reads of a queue item."""

    via: Destination
    rule_pattern: str


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def transport_for_rule(rule: Optional[DomainRuleOptions], options: EmailOptions,
                       state_dir: str, recipient_domain: str = "") -> Transport:
    """The transport of ``rule`` (None: the default route) for one recipient domain."""
    if rule is None:
        if options.default_mode == "forward":
            return Transport("forward", options.default_server, options.default_port,
                             require_tls=options.default_tls, source="default route")
        return Transport("mx", recipient_domain, source="default route")
    source = f"rule {rule.pattern}"
    if rule.target is not None and rule.mode in ("forward", "process"):
        t = rule.target
        auth = t.authentication
        credentials = Credentials(auth.user, auth.password) if auth and auth.user else None
        return Transport("forward", t.server, t.port, require_tls=t.use_tls, ca_path=t.ca_path,
                         credentials=credentials, source=source)
    mta = rule.mta_options
    if mta is not None and mta.allow_local_delivery:
        path = mta.local_delivery_path or os.path.join(state_dir or ".", "mail")
        return Transport("local", local_path=path, source=source)
    return Transport("mx", recipient_domain, source=source)


def transport_for_route(route: Route, recipient_domain: str = "") -> Transport:
    """The transport of a literal next hop (never with credentials)."""
    if route.kind == "mx":
        return Transport("mx", recipient_domain, source="next hop")
    return Transport(route.kind, route.server, route.port, require_tls=route.require_tls,
                     ca_path=route.ca_path, local_path=route.local_path, source="next hop")


def rule_gone(pattern: str) -> str:
    """The deferral reason of an item whose rule no longer exists."""
    return (f"451 4.3.5 domain rule '{pattern}' no longer exists (removed or renamed since the "
            "message was queued); delivery waits for it and bounces when the retries are "
            "used up")


class TransportResolver:
    """Turns an item's destination into :class:`Resolution` groups, with the rules in force."""

    def __init__(self, options: EmailOptions, rules: Optional[RuleLookup] = None,
                 state_dir: str = "") -> None:
        self.options = options
        self.rules = rules
        self.state_dir = state_dir

    def update_options(self, options: EmailOptions) -> None:
        """A new ``[email]`` section (the default route; the rules come from ``rules``)."""
        self.options = options

    def rule(self, pattern: str) -> Optional[DomainRuleOptions]:
        """The rule in force with ``pattern`` ("" or unknown: None)."""
        if self.rules is None or not pattern:
            return None
        try:
            return self.rules.get_rule(pattern)
        except ConfigError:  # a pattern the rule table cannot parse any more: no such rule
            return None

    def for_address(self, address: str) -> Transport:
        """Where mail to ``address`` goes now (DSNs are routed so)."""
        rule = self.rules.match_rule(address) if self.rules is not None else None
        return transport_for_rule(rule, self.options, self.state_dir, _domain(address))

    def resolve(self, item: ItemLike, recipients: Sequence[str]) -> list[Resolution]:
        """``recipients`` of ``item`` grouped by transport (MX: one group per domain)."""
        via = item.via
        if via.kind == NEXTHOP:
            assert via.nexthop is not None
            route = via.nexthop
            return self._group(recipients, lambda r: transport_for_route(route, _domain(r)))
        if via.kind == BY_ADDRESS:
            return self._group(recipients, self.for_address)
        assert via.kind == BY_RULE
        pattern = item.rule_pattern
        rule: Optional[DomainRuleOptions] = None
        if pattern:
            rule = self.rule(pattern)
            if rule is None:
                return [Resolution(None, list(recipients), rule_gone(pattern))]
        return self._group(recipients, lambda r: transport_for_rule(rule, self.options,
                                                                    self.state_dir, _domain(r)))

    @staticmethod
    def _group(recipients: Sequence[str], transport_of: Callable[[str], Transport]
               ) -> list[Resolution]:
        groups: dict[Transport, Resolution] = {}
        for rcpt in recipients:
            transport = transport_of(rcpt)
            group = groups.get(transport)
            if group is None:
                group = groups[transport] = Resolution(transport, [])
            group.recipients.append(rcpt)
        return list(groups.values())


__all__ = ["Credentials", "REDACTED", "Resolution", "RuleLookup", "Transport",
           "TransportResolver", "rule_gone", "transport_for_route", "transport_for_rule"]
