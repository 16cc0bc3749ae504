"""The route table: which route a connection takes.

A route matches on the listener port, the requested name (TLS SNI or HTTP
``Host``), the client address (``client_ips``) and, for HTTP, a path prefix.
Precedence among the routes of a port:

1. an exact domain (``api.example.test``),
2. a ``*.`` wildcard (``*.example.test`` matches any name ending in
   ``.example.test``, at any depth, but not ``example.test`` itself),
3. ``*`` (any name, and connections without a name),

and within the same class, configuration order.  A connection without a
name (no SNI, no ``Host``) only matches routes whose domains contain ``*``.

Each port has one *mode*: ``tls`` when its routes use TLS (the ClientHello is
read first), ``http`` when one of its plain routes is HTTP or the port is
``[proxy.acme] http_port`` with ACME on (the request head is read first, so
http-01 challenges are answered before any route), else ``tcp`` (the target
is connected at once).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from dcrouter.config.base import split_host_port
from dcrouter.config.proxy import ProxyOptions, ProxyRouteOptions
from dcrouter.proxy.limits import IpRules, IPAddress, in_networks, normalize_ip, parse_networks

RANK_EXACT, RANK_WILDCARD, RANK_ANY = 0, 1, 2
_RANK_NAMES = {RANK_EXACT: "exact", RANK_WILDCARD: "wildcard", RANK_ANY: "any"}


def domain_rank(pattern: str, name: Optional[str]) -> Optional[int]:
    """The precedence class with which ``pattern`` matches ``name`` (None: no match)."""
    if pattern == "*":
        return RANK_ANY
    if name is None:
        return None
    pattern = pattern.lower()
    if pattern.startswith("*."):
        return RANK_WILDCARD if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1 else None
    return RANK_EXACT if name == pattern else None


class Route:
    """One configured route, compiled for matching; shared by its connections.

    ``key`` (the route name, or ``routes[i]``) names it in stats and limits.
    ``balancer`` and ``stats`` are attached by the proxy service.
    """

    def __init__(self, index: int, options: ProxyRouteOptions) -> None:
        self.index = index
        self.options = options
        self.key = options.name or f"routes[{index}]"
        self.ports = frozenset(options.all_ports())
        self.domains = tuple(d.lower() for d in options.domains)
        self.client_networks = parse_networks(options.client_ips)
        self.ip_rules = IpRules(options.allowed_ips, options.blocked_ips)
        self.mode = options.mode
        self.targets = tuple(split_host_port(t, "") for t in options.targets)
        self.balancer: Any = None
        self.stats: Any = None

    @property
    def tls(self) -> str:
        """The TLS mode ('' for plain routes)."""
        return self.options.tls

    def rank(self, name: Optional[str]) -> Optional[int]:
        """Best precedence class of this route's domains for ``name``."""
        ranks = [r for r in (domain_rank(d, name) for d in self.domains) if r is not None]
        return min(ranks) if ranks else None

    def accepts_client(self, address: IPAddress) -> bool:
        """``client_ips`` (empty: everyone)."""
        return not self.client_networks or in_networks(address, self.client_networks)

    def accepts_path(self, path: Optional[str]) -> bool:
        """``path_prefix`` (empty: every path)."""
        prefix = self.options.path_prefix
        return not prefix or (path is not None and path.startswith(prefix))

    def __repr__(self) -> str:
        return f"<Route {self.key} {self.mode}>"


class RouteTable:
    """Every route, indexed by port; immutable once built (swapped whole on reload)."""

    def __init__(self, proxy: ProxyOptions) -> None:
        self.routes = [Route(i, r) for i, r in enumerate(proxy.routes)]
        self.acme_http_port: Optional[int] = proxy.acme.http_port if proxy.acme.enabled \
            else None
        self.by_port: dict[int, list[Route]] = {}
        for route in self.routes:
            for port in sorted(route.ports):
                self.by_port.setdefault(port, []).append(route)

    def ports(self) -> list[int]:
        """Every port with at least one route."""
        return sorted(self.by_port)

    def mode(self, port: int) -> str:
        """``tls``, ``http`` or ``tcp`` for the listener on ``port``."""
        modes = {r.mode for r in self.by_port.get(port, ())}
        if "tls" in modes:
            return "tls"
        if "http" in modes or port == self.acme_http_port:
            return "http"
        return "tcp"

    def match(self, port: int, name: Optional[str], client: Union[str, IPAddress],
              path: Optional[str] = None) -> Optional[Route]:
        """The route for a connection on ``port`` asking for ``name``, or None."""
        address = normalize_ip(client)
        if name is not None:
            name = name.rstrip(".").lower() or None
        best: Optional[tuple[int, int, Route]] = None
        for route in self.by_port.get(port, ()):
            rank = route.rank(name)
            if rank is None or not route.accepts_client(address) or not route.accepts_path(path):
                continue
            if best is None or (rank, route.index) < best[:2]:
                best = (rank, route.index, route)
        return best[2] if best else None

    def by_key(self, key: str) -> Optional[Route]:
        """The route named ``key``."""
        for route in self.routes:
            if route.key == key:
                return route
        return None

    def terminate_domains(self) -> list[str]:
        """Names of terminate routes that want ACME certificates (``*.`` wildcards
        included; ``*`` alone is no name)."""
        names: list[str] = []
        for route in self.routes:
            if route.tls.startswith("terminate") and route.options.acme \
                    and not route.options.cert_path:
                names.extend(d for d in route.domains
                             if d != "*" and "*" not in d[2:] and d not in names)
        return names


def _targets_text(route: Route) -> str:
    if route.options.redirect_to_https and not route.targets:
        return "301 https://"
    text = ", ".join(route.options.targets)
    if len(route.targets) > 1:
        text += f" [{route.options.load_balancing}]"
    return text


def describe_routes(proxy: ProxyOptions) -> list[str]:
    """The resolved route table for ``check-config``: per port, entries in match order."""
    table = RouteTable(proxy)
    lines: list[str] = []
    for port in table.ports():
        acme = ", ACME http-01 answered first" if port == table.acme_http_port else ""
        lines.append(f"  port {port}/tcp ({table.mode(port)}{acme}):")
        entries: list[tuple[int, int, str, Route]] = []
        for route in table.by_port[port]:
            for domain in route.domains:
                rank = RANK_ANY if domain == "*" else RANK_WILDCARD if domain.startswith("*.") \
                    else RANK_EXACT
                entries.append((rank, route.index, domain, route))
        for n, (rank, _i, domain, route) in enumerate(sorted(entries, key=lambda e: e[:2]), 1):
            extra: list[str] = []
            if route.options.path_prefix:
                extra.append(f"path {route.options.path_prefix}*")
            if route.options.client_ips:
                extra.append(f"clients {','.join(route.options.client_ips)}")
            how = route.tls or ("http" if route.options.relays_http
                                or port == table.acme_http_port else "tcp")
            if route.tls.startswith("terminate"):
                how += ", http" if route.options.relays_http else ", tcp"
            if route.options.redirect_to_https:
                how += ", redirect to https"
            if route.options.send_proxy_protocol:
                how += f", PROXY {route.options.send_proxy_protocol}"
            suffix = f" ({'; '.join(extra)})" if extra else ""
            lines.append(f"    {n}. {domain} [{_RANK_NAMES[rank]}]{suffix} -> route "
                         f"{route.key}: {how} -> {_targets_text(route)}")
    return lines
