"""Admission control for proxied connections: IP rules and connection limits.

Every mode (plain TCP, HTTP, passthrough, terminated TLS) asks the one
:class:`Admission` object of the proxy before it connects a client to a
target, so ``allowed_ips``/``blocked_ips``, ``max_connections`` and
``max_connections_per_ip`` are enforced in exactly one place.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Optional, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


_parsed: dict[str, IPAddress] = {}


def normalize_ip(address: Union[str, IPAddress]) -> IPAddress:
    """An address object with IPv4-mapped IPv6 (``::ffff:1.2.3.4``) turned into IPv4.

    A zone suffix (``fe80::1%eth0``) is dropped.  Strings are parsed once
    (a bounded cache: clients come back).
    """
    if isinstance(address, str):
        known = _parsed.get(address)
        if known is not None:
            return known
        text = address
        address = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if len(_parsed) >= 16384:
            _parsed.clear()
        _parsed[text] = address
        return address
    elif isinstance(address, ipaddress.IPv4Address):
        return address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_networks(networks: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings as network objects; IPv4-mapped IPv6 networks become IPv4."""
    out: list[IPNetwork] = []
    for text in networks:
        net = ipaddress.ip_network(text, strict=False)
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None \
                and net.prefixlen >= 96:
            mapped = net.network_address.ipv4_mapped
            net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}", strict=False)
        out.append(net)
    return tuple(out)


def in_networks(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    """True when ``address`` lies in one of ``networks`` (same family only)."""
    return any(address.version == net.version and address in net for net in networks)


class IpRules:
    """``allowed_ips`` and ``blocked_ips`` of a route; a block wins over an allow."""

    def __init__(self, allowed: Iterable[str], blocked: Iterable[str]) -> None:
        self.allowed = parse_networks(allowed)
        self.blocked = parse_networks(blocked)
        #: nothing blocked and both families allowed whole: no address to look at
        self.everyone = not self.blocked and {(n.version, n.prefixlen) for n in self.allowed} \
            >= {(4, 0), (6, 0)}

    def permits(self, address: IPAddress) -> bool:
        """Whether a client at ``address`` (normalised) may use the route."""
        if self.everyone:
            return True
        address = normalize_ip(address)
        if in_networks(address, self.blocked):
            return False
        return in_networks(address, self.allowed)


class LimitExceeded(Exception):
    """A connection was refused; ``kind`` is ``blocked``, ``max_connections`` or ``max_per_ip``."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Ticket:
    """One admitted connection; :meth:`release` gives its slots back (idempotent)."""

    def __init__(self, admission: "Admission", route_key: str, address: IPAddress) -> None:
        self._admission = admission
        self.route_key = route_key
        self.address = address
        self.released = False

    def release(self) -> None:
        """Free the route and per-IP slots of this connection."""
        if not self.released:
            self.released = True
            self._admission._release(self)


class Admission:
    """Counts concurrent connections per route and per (route, client IP).

    Counters are keyed by route name so they survive a reconfiguration that
    keeps the route.
    """

    def __init__(self) -> None:
        self.per_route: dict[str, int] = {}
        self.per_ip: dict[tuple[str, IPAddress], int] = {}

    def admit(self, route_key: str, address: Union[str, IPAddress], rules: IpRules,
              max_connections: int, max_per_ip: int) -> Ticket:
        """Admit one connection or raise :class:`LimitExceeded`."""
        ip = normalize_ip(address)
        if not rules.permits(ip):
            raise LimitExceeded("blocked")
        if self.per_route.get(route_key, 0) >= max_connections:
            raise LimitExceeded("max_connections")
        if self.per_ip.get((route_key, ip), 0) >= max_per_ip:
            raise LimitExceeded("max_per_ip")
        self.per_route[route_key] = self.per_route.get(route_key, 0) + 1
        self.per_ip[(route_key, ip)] = self.per_ip.get((route_key, ip), 0) + 1
        return Ticket(self, route_key, ip)

    def _release(self, ticket: Ticket) -> None:
        key = (ticket.route_key, ticket.address)
        self.per_route[ticket.route_key] -= 1
        if not self.per_route[ticket.route_key]:
            del self.per_route[ticket.route_key]
        self.per_ip[key] -= 1
        if not self.per_ip[key]:
            del self.per_ip[key]

    def active(self, route_key: Optional[str] = None) -> int:
        """Admitted connections of one route, or of all."""
        if route_key is None:
            return sum(self.per_route.values())
        return self.per_route.get(route_key, 0)
