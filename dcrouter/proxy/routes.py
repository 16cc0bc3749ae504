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


class _PortIndex:
    """The routes of one port, compiled for lookups: exact names in a dict, ``*.`` suffixes
    in a dict, ``*`` routes in a list (each in configuration order)."""

    __slots__ = ("exact", "wildcard", "any", "cache", "plain")

    def __init__(self, routes: list[Route]) -> None:
        self.exact: dict[str, list[Route]] = {}
        self.wildcard: dict[str, list[Route]] = {}
        self.any: list[Route] = []
        for route in routes:
            for domain in dict.fromkeys(route.domains):
                if domain == "*":
                    self.any.append(route)
                elif domain.startswith("*."):
                    self.wildcard.setdefault(domain[1:], []).append(route)
                else:
                    self.exact.setdefault(domain, []).append(route)
        #: name -> routes in precedence order (bounded: names come from clients)
        self.cache: dict[Optional[str], tuple[Route, ...]] = {}
        #: no route of the port looks at the client address or the path
        self.plain = all(not r.client_networks and not r.options.path_prefix for r in routes)

    def candidates(self, name: Optional[str]) -> tuple[Route, ...]:
        """Routes whose domains match ``name``, best precedence class first, then by index."""
        found = self.cache.get(name)
        if found is not None:
            return found
        ordered: list[Route] = []
        if name is not None:
            ordered.extend(self.exact.get(name, ()))
            if self.wildcard:
                wild: list[Route] = []
                dot = name.find(".")
                while dot != -1:
                    suffix = name[dot:]
                    if len(name) > len(suffix):         # "*.x" never matches "x" itself
                        wild.extend(self.wildcard.get(suffix, ()))
                    dot = name.find(".", dot + 1)
                wild.sort(key=lambda r: r.index)
                ordered.extend(r for r in dict.fromkeys(wild) if r not in ordered)
        ordered.extend(r for r in self.any if r not in ordered)
        found = tuple(ordered)
        if len(self.cache) >= 4096:
            self.cache.clear()
        self.cache[name] = found
        return found


class RouteTable:
    """Every route, indexed by port; immutable once built (swapped whole on reload).

    Lookups are precompiled per port (:class:`_PortIndex`) and their answers
    for a name cached, so a connection's route costs a dict look-up or two.
    """

    def __init__(self, proxy: ProxyOptions) -> None:
        self.routes = [Route(i, r) for i, r in enumerate(proxy.routes)]
        self.acme_http_port: Optional[int] = proxy.acme.http_port if proxy.acme.enabled \
            else None
        self.by_port: dict[int, list[Route]] = {}
        for route in self.routes:
            for port in sorted(route.ports):
                self.by_port.setdefault(port, []).append(route)
        self._index = {port: _PortIndex(routes) for port, routes in self.by_port.items()}
        self._modes = {port: self._mode(port) for port in self.by_port}
        self._initial = {port: min(r.options.initial_data_timeout for r in routes)
                         for port, routes in self.by_port.items()}

    def ports(self) -> list[int]:
        """Every port with at least one route."""
        return sorted(self.by_port)

    def mode(self, port: int) -> str:
        """``tls``, ``http`` or ``tcp`` for the listener on ``port``."""
        mode = self._modes.get(port)
        return mode if mode is not None else self._mode(port)

    def _mode(self, port: int) -> str:
        modes = {r.mode for r in self.by_port.get(port, ())}
        if "tls" in modes:
            return "tls"
        if "http" in modes or port == self.acme_http_port:
            return "http"
        return "tcp"

    def initial_timeout(self, port: int) -> float:
        """The shortest ``initial_data_timeout`` of the routes on ``port``."""
        return self._initial.get(port, 10.0)

    def match(self, port: int, name: Optional[str], client: Union[str, IPAddress],
              path: Optional[str] = None) -> Optional[Route]:
        """The route for a connection on ``port`` asking for ``name``, or None."""
        index = self._index.get(port)
        if index is None:
            return None
        if name is not None:
            name = name.rstrip(".").lower() or None
        candidates = index.candidates(name)
        if index.plain:
            return candidates[0] if candidates else None
        address = normalize_ip(client)
        for route in candidates:
            if route.accepts_client(address) and route.accepts_path(path):
                return route
        return None

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
