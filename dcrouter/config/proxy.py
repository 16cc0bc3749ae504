"""Options of ``[proxy]``, ``[[proxy.routes]]`` and ``[proxy.acme]``: the TCP/TLS proxy."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Union

from dcrouter.config.base import (
    check_host_ports, check_networks, check_non_negative, check_port, check_positive, one_of,
    option,
)
from dcrouter.errors import ConfigError

TLS_MODES = ("passthrough", "terminate", "terminate-and-reencrypt")
_DOMAIN = re.compile(r"^(\*|(\*\.)?([A-Za-z0-9]([A-Za-z0-9\-]*[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9]([A-Za-z0-9\-]*[A-Za-z0-9])?)$")


def parse_port_spec(value: Union[int, str], path: str) -> tuple[int, int]:
    """``8443`` or ``"9000-9010"`` -> an inclusive (low, high) range."""
    if isinstance(value, int):
        low = high = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
        if not m:
            raise ConfigError(path, f"must be a port or a range like '9000-9010', got '{value}'")
        low = int(m.group(1))
        high = int(m.group(2) or m.group(1))
    for port in (low, high):
        if not 1 <= port <= 65535:
            raise ConfigError(path, f"must be 1..65535, got {port}")
    if low > high:
        raise ConfigError(path, f"range is backwards: {low}-{high}")
    return low, high


def _check_port_specs(value: tuple[Union[int, str], ...], path: str) -> tuple[Union[int, str], ...]:
    if not value:
        raise ConfigError(path, "at least one port is needed")
    for i, item in enumerate(value):
        parse_port_spec(item, f"{path}[{i}]")
    return value


def _check_domains(value: tuple[str, ...], path: str) -> tuple[str, ...]:
    for i, domain in enumerate(value):
        if not _DOMAIN.match(domain):
            raise ConfigError(f"{path}[{i}]", f"must be a name, '*.' wildcard or '*', got '{domain}'")
    return value


def _check_health_path(value: str, path: str) -> str:
    """Empty, or an absolute path without spaces or control characters (it goes into a
    request line)."""
    if value and (not value.startswith("/") or any(c <= " " or c == "\x7f" for c in value)):
        raise ConfigError(path, "must be empty or a path starting with '/', without spaces or "
                          f"control characters, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProxyRouteOptions:
    """One route: match (ports, domains, client IPs, path) and action (targets, TLS)."""

    name: str = option("", doc="Route name used in stats, logs and the API.")
    ports: tuple[Union[int, str], ...] = option(check=_check_port_specs,
                                                doc="Ports and ranges ('9000-9010').",
                                                reload="rebind")
    domains: tuple[str, ...] = option(("*",), check=_check_domains,
                                      doc="Names, '*.example.test' wildcards, '*' for all.")
    client_ips: tuple[str, ...] = option((), check=check_networks,
                                         doc="Match only clients in these networks.")
    path_prefix: str = option("", doc="HTTP routes: match only paths under this prefix.")
    tls: str = option("", doc="'passthrough', 'terminate', 'terminate-and-reencrypt'; empty: "
                      "plain TCP/HTTP.")
    targets: tuple[str, ...] = option((), check=check_host_ports,
                                      doc="Backends as host:port; several are load balanced.")
    load_balancing: str = option("round-robin", check=one_of("round-robin", "least-connections"),
                                 doc="How targets share connections.")
    health_check_interval: float = option(10.0, check=check_non_negative,
                                          doc="Seconds between TCP health checks (0: off).")
    health_check_path: str = option("", check=_check_health_path,
                                    doc="HTTP health check instead of a TCP connect: GET this "
                                    "path on each target, healthy on 2xx/3xx (e.g. '/readyz' "
                                    "of a dcrouter API).")
    allowed_ips: tuple[str, ...] = option(("0.0.0.0/0", "::/0"), check=check_networks,
                                          doc="Clients allowed (CIDR).")
    blocked_ips: tuple[str, ...] = option((), check=check_networks,
                                          doc="Clients refused; wins over allowed_ips.")
    max_connections: int = option(10000, check=check_positive, doc="Concurrent connections.")
    max_connections_per_ip: int = option(1000, check=check_positive,
                                         doc="Concurrent connections per client IP.")
    connection_timeout: float = option(3600.0, check=check_positive,
                                       doc="Seconds of silence both ways before closing.")
    initial_data_timeout: float = option(10.0, check=check_positive,
                                         doc="Seconds to wait for the first bytes (SNI/Host) "
                                         "and, on terminate routes, for the TLS handshake.")
    http_request_timeout: float = option(10.0, check=check_positive,
                                         doc="HTTP: seconds for a whole request head to arrive, "
                                         "from its first byte, on every request of a kept-alive "
                                         "connection (HAProxy's timeout http-request); else 408 "
                                         "and close. On a plain port the smallest value of its "
                                         "routes applies.")
    http_keep_alive_timeout: float = option(10.0, check=check_positive,
                                            doc="HTTP: seconds a kept-alive connection may wait "
                                            "for its next request once every response is sent "
                                            "(HAProxy's timeout http-keep-alive); then it is "
                                            "closed.")
    connect_timeout: float = option(10.0, check=check_positive,
                                    doc="Seconds to wait for a target to accept before trying "
                                    "the next one.")
    redirect_to_https: bool = option(False, doc="Answer HTTP with 301 to https://host/path.")
    http: Optional[bool] = option(None, doc="Relay as HTTP request by request (Host routing, "
                                  "request checks, per-request timeouts; on terminate routes the "
                                  "Host must belong to the SNI's route, else 421). Default: true "
                                  "for terminate routes and for plain routes that name domains "
                                  "other than '*' or a path. false on a terminate route: a plain "
                                  "byte tunnel (for TLS services that are not HTTP).")
    add_forwarded_headers: bool = option(False, doc="Add X-Forwarded-For/-Proto (HTTP).")
    http2: bool = option(True, doc="Terminate routes relayed as HTTP: offer HTTP/2 (ALPN h2 "
                         "before http/1.1); streams go to the targets as HTTP/1.1 requests. "
                         "false: ALPN http/1.1 only.")
    http2_max_concurrent_streams: int = option(100, check=check_positive,
                                               doc="HTTP/2: streams a client may have open at "
                                               "once (SETTINGS_MAX_CONCURRENT_STREAMS); a stream "
                                               "counts until its backend exchange is torn down, "
                                               "reset or not.")
    http2_max_header_list_size: int = option(32768, check=check_positive,
                                             doc="HTTP/2: bytes of one decoded header list "
                                             "(SETTINGS_MAX_HEADER_LIST_SIZE, HPACK bombs), and "
                                             "bound of a HEADERS+CONTINUATION block as received "
                                             "(plus 16 KiB).")
    http2_initial_window_size: int = option(65535, check=check_positive,
                                            doc="HTTP/2: bytes of request body a stream may have "
                                            "in flight before the proxy has handed them to the "
                                            "target (SETTINGS_INITIAL_WINDOW_SIZE).")
    send_proxy_protocol: str = option("", doc="'v1' or 'v2': send a PROXY header to targets.")
    cert_path: str = option("", doc="Certificate for terminate modes (else ACME or self-signed).")
    key_path: str = option("", doc="Its key.")
    backend_verify: bool = option(True, doc="Re-encrypt: verify the backend certificate.")
    backend_ca_path: str = option("", doc="Re-encrypt: CA bundle for the backend.")
    backend_server_name: str = option("", doc="Re-encrypt: SNI and name to verify.")
    acme: bool = option(True, doc="Terminate routes: obtain certificates via [proxy.acme].")

    def validate(self, path: str) -> None:
        """A route needs targets unless it only redirects."""
        if self.tls and self.tls not in TLS_MODES:
            one_of(*TLS_MODES)(self.tls, f"{path}.tls")
        if self.send_proxy_protocol:
            one_of("v1", "v2")(self.send_proxy_protocol, f"{path}.send_proxy_protocol")
        if not self.targets and not self.redirect_to_https:
            raise ConfigError(f"{path}.targets", "at least one target is needed")
        if bool(self.cert_path) != bool(self.key_path):
            raise ConfigError(f"{path}.cert_path", "cert_path and key_path must be given together")
        if self.tls == "passthrough" and self.http:
            raise ConfigError(f"{path}.http", "a passthrough route cannot be read as HTTP (the "
                              "traffic stays encrypted); use tls = \"terminate\"")
        if self.http2_initial_window_size > 2 ** 31 - 1:
            raise ConfigError(f"{path}.http2_initial_window_size", "must be at most 2147483647")
        if self.http is False and self.add_forwarded_headers:
            raise ConfigError(f"{path}.add_forwarded_headers",
                              "needs HTTP, but this route sets http = false")

    @property
    def relays_http(self) -> bool:
        """Whether connections of this route are relayed as HTTP, request by request."""
        if self.tls:
            return self.tls != "passthrough" and self.http is not False
        return self.mode == "http"

    @property
    def port_ranges(self) -> tuple[tuple[int, int], ...]:
        """Ports as inclusive (low, high) ranges."""
        return tuple(parse_port_spec(p, "") for p in self.ports)

    def all_ports(self) -> list[int]:
        """Every port this route listens on."""
        return [p for low, high in self.port_ranges for p in range(low, high + 1)]

    @property
    def mode(self) -> str:
        """How the listener reads a connection: ``tls`` (ClientHello), ``http`` (request
        head) or ``tcp`` (nothing: connect at once)."""
        if self.tls:
            return "tls"
        if self.http is not None:
            return "http" if self.http else "tcp"
        wants_http = (any(d != "*" for d in self.domains) or bool(self.path_prefix)
                      or self.redirect_to_https or self.add_forwarded_headers)
        return "http" if wants_http else "tcp"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AcmeOptions:
    """Automatic certificates for terminate routes (ACME http-01 or dns-01)."""

    enabled: bool = option(False, doc="Obtain and renew certificates.")
    directory_url: str = option("https://acme-v02.api.letsencrypt.org/directory",
                                doc="ACME directory.")
    account_email: str = option("", doc="Contact address of the account.")
    renew_threshold_days: int = option(30, check=check_positive,
                                       doc="Renew this many days before expiry.")
    directory_ca_path: str = option("", doc="Extra CA for the ACME server's HTTPS (pebble's).")
    check_interval: float = option(3600.0, check=check_positive,
                                   doc="Seconds between renewal checks.")
    retry_backoff: float = option(300.0, check=check_positive,
                                  doc="First backoff after a failed order; doubles.")
    http_port: int = option(80, check=check_port,
                            doc="The port where the ACME server sends http-01 validation "
                            "requests (80; pebble's httpPort in tests). Every plain listener on "
                            "it reads HTTP and answers challenges before any route, whatever "
                            "its routes' mode; check-config fails when nothing plain listens "
                            "there, or a TLS route or an http = false route claims it.")
    challenge: str = option("http-01", check=one_of("http-01", "dns-01"),
                            doc="'http-01' (answered on the proxy's plain HTTP ports) or "
                            "'dns-01' (a TXT record published by dcrouter's DNS server, for "
                            "names inside its zones). Wildcard names always use dns-01.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProxyOptions:
    """The TCP/TLS proxy."""

    listen: str = option("0.0.0.0", doc="Address the proxy listeners bind.", reload="rebind")
    routes: tuple[ProxyRouteOptions, ...] = option((), doc="Routes.")
    acme: AcmeOptions = option(default_factory=AcmeOptions, doc="ACME.")
    accept_proxy_protocol: bool = option(False, doc="Accept PROXY v1/v2 headers from proxy_ips.")
    proxy_ips: tuple[str, ...] = option((), check=check_networks,
                                        doc="Trusted load balancers that may send PROXY headers.")
    access_log: str = option("", doc="Access log file: one line per client connection in "
                             "HAProxy's tcplog format (empty: off); reopened on every reload.")
    access_log_format: str = option("haproxy", check=one_of("haproxy", "json"),
                                    doc="'haproxy' (tcplog lines) or 'json' (one object a "
                                    "line, the same facts plus requests and bytes_in).")
    self_signed_key: str = option("ecdsa", check=one_of("ecdsa", "rsa"),
                                  doc="Key of the self-signed certificates the proxy makes for "
                                  "terminate routes without files or ACME: 'ecdsa' (P-256, "
                                  "fast handshakes) or 'rsa' (2048 bits, for very old "
                                  "clients). Files made before are kept.")
    tls_ticket_rotation: float = option(43200.0, check=check_non_negative,
                                        doc="Seconds between new TLS session-ticket keys of "
                                        "terminating listeners (0: never; a reload also "
                                        "renews them when the default certificate changes). "
                                        "A ticket resumes at most until the next rotation.")
    splice: bool = option(True, doc="Relay passthrough and plain TCP routes with splice(2) "
                          "through a kernel pipe (Linux; elsewhere, and for TLS-terminated "
                          "routes, the Twisted relay). false: always the Twisted relay.")

    def validate(self, path: str) -> None:
        """Route names unique."""
        names: dict[str, int] = {}
        for i, route in enumerate(self.routes):
            if route.name and route.name in names:
                raise ConfigError(f"{path}.routes[{i}].name",
                                  f"'{route.name}' repeats routes[{names[route.name]}]")
            names[route.name] = i
        modes: dict[int, tuple[str, int]] = {}
        for i, route in enumerate(self.routes):
            for port in route.all_ports():
                first = modes.setdefault(port, (route.mode, i))
                if first[0] != route.mode and "tls" in (first[0], route.mode):
                    raise ConfigError(f"{path}.routes[{i}].ports",
                                      f"port {port} mixes TLS and plain routes "
                                      f"(routes[{first[1]}] is {first[0]}, this one {route.mode})")
        if self.acme.enabled:
            self._check_acme_http_port(path)

    def _check_acme_http_port(self, path: str) -> None:
        """http-01 needs a plain listener on ``acme.http_port`` that may read HTTP."""
        port = self.acme.http_port
        on_port = [(i, r) for i, r in enumerate(self.routes) if port in r.all_ports()]
        for i, route in on_port:
            if route.tls:
                raise ConfigError(f"{path}.routes[{i}].ports",
                                  f"port {port} is proxy.acme.http_port, where http-01 "
                                  f"challenges are answered in plain HTTP; a TLS route cannot "
                                  f"listen there (move it, or set proxy.acme.http_port)")
            if route.http is False:
                raise ConfigError(f"{path}.routes[{i}].http",
                                  f"port {port} is proxy.acme.http_port: its connections are "
                                  f"read as HTTP to answer http-01 challenges before any route, "
                                  f"so http = false cannot hold there (remove it, or set "
                                  f"proxy.acme.http_port)")
        wants_http01 = self.acme.challenge == "http-01" and any(
            r.tls.startswith("terminate") and r.acme and not r.cert_path
            and any(d != "*" and not d.startswith("*.") for d in r.domains)
            for r in self.routes)
        if wants_http01 and not on_port:
            raise ConfigError(f"{path}.acme.http_port",
                              f"no route listens on port {port}: the ACME server's http-01 "
                              f"validation requests would find nothing; add a plain route on "
                              f"port {port} (a redirect_to_https route is enough), or set "
                              f"http_port to the port that receives them")
