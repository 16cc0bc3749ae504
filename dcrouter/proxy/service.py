"""The proxy service: listeners, the live route table, TLS, health checks, ACME and stats.

:class:`ProxyService` is the ``proxy`` child of the router.  It owns one
listener per configured port (shared by every route on that port), the
current :class:`~dcrouter.proxy.routes.RouteTable` (replaced whole on
reconfiguration, so a connection sees either the old or the new table and
existing tunnels keep their routes), the admission counters, the certificate
store and, when ``[proxy.acme]`` is enabled, the ACME manager.
"""

from __future__ import annotations

import gc
import re
from typing import Any, Optional

from twisted.internet import defer, ssl
from twisted.internet.task import LoopingCall

from dcrouter.config.options import DcRouterOptions
from dcrouter.config.proxy import ProxyOptions
from dcrouter.errors import ConfigError
from dcrouter.logsetup import get_logger
from dcrouter.proxy.accesslog import close_access_log, open_access_log, reopen_access_log
from dcrouter.proxy.balancer import Balancer, HealthChecker, Target
from dcrouter.proxy.certs import CertStore
from dcrouter.proxy.frontend import FrontFactory, FrontProtocol
from dcrouter.proxy.limits import Admission, IPAddress, in_networks, parse_networks
from dcrouter.proxy.routes import Route, RouteTable
from dcrouter.proxy.splice import available as splice_available
from dcrouter.proxy.stats import RouteStats
from dcrouter.service import ListenerSet, ListenSpec, ManagedService, RouterContext

log = get_logger("proxy")

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", re.S)


#: Allocations between two young-generation collections (CPython's default: 700).
GC_THRESHOLD = (20000, 20, 20)


def tune_gc() -> None:
    """Fewer garbage-collector passes for a connection-heavy process.

    Every proxied connection allocates a few hundred short-lived objects; with
    CPython's default threshold a collection runs every few connections and
    traverses the objects of every connection in flight (profiled: a fifth of
    the CPU at 2,000 new connections/s).  ``gc.freeze()`` moves what start-up
    built (modules, configuration) out of the collector's sight, and a
    young-generation threshold of 20,000 lets most connections die by
    reference counting before a collection sees them.  Process-wide, once.
    """
    if gc.get_threshold()[0] < GC_THRESHOLD[0]:
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLD)


class ProxyService(ManagedService):
    """The TCP/TLS proxy: SNI passthrough, termination, HTTP routing, load balancing, ACME."""

    def __init__(self, context: RouterContext) -> None:
        super().__init__("proxy", context)
        self.reactor = context.reactor
        self.admission = Admission()
        self.route_stats: dict[str, RouteStats] = {}
        self.unrouted: dict[str, int] = {}
        self.connections: set[FrontProtocol] = set()
        self.challenges: dict[str, str] = {}
        self.acme: Any = None
        self._drain_waiters: list[defer.Deferred] = []
        self._backend_tls: dict[tuple[str, str], Any] = {}
        self.checkers: list[HealthChecker] = []
        self._rotation: Optional[LoopingCall] = None
        proxy = self._proxy_options(context.options)
        self.table, self.certs = self._build(proxy, None)
        self._proxy_ips = parse_networks(proxy.proxy_ips) if proxy.accept_proxy_protocol else ()
        self.splice = proxy.splice and splice_available()
        self.listeners = ListenerSet(context.reactor, self._factory)
        self.access_log = open_access_log(proxy, context.reactor, self)

    # -- building --------------------------------------------------------------
    @staticmethod
    def _proxy_options(options: DcRouterOptions) -> ProxyOptions:
        if options.proxy is None:
            raise ConfigError("proxy", "the proxy section is missing")
        return options.proxy

    def _build(self, proxy: ProxyOptions, old: Optional[RouteTable]) -> tuple[RouteTable, CertStore]:
        table = RouteTable(proxy)
        for route in table.routes:
            route.balancer = Balancer(list(route.targets), route.options.load_balancing)
            previous = old.by_key(route.key) if old is not None else None
            if previous is not None and previous.balancer is not None:
                route.balancer.adopt_state(previous.balancer)
            route.stats = self.stats_for(route)
        certs = CertStore(self.context.state_dir, key_type=proxy.self_signed_key)
        certs.load(table.routes)
        return table, certs

    def _specs(self) -> list[ListenSpec]:
        proxy = self._proxy_options(self.context.options)
        # a port that stays keeps its listener even if the route naming it moved in the list
        bound = {(s.host, s.port): s for s in self.listeners.ports}
        specs = []
        for port in self.table.ports():
            first = self.table.by_port[port][0]
            specs.append(bound.get((proxy.listen, port))
                         or ListenSpec("tcp", proxy.listen, port, f"proxy.routes[{first.index}].ports"))
        return specs

    def _factory(self, spec: ListenSpec) -> FrontFactory:
        return FrontFactory(self, spec.port)

    def _start_checks(self) -> None:
        for checker in self.checkers:
            checker.stop()
        self.checkers = []
        for route in self.table.routes:
            if route.options.health_check_interval > 0 and route.targets:
                checker = HealthChecker(self.reactor, route.balancer,
                                        route.options.health_check_interval, route.key,
                                        path=route.options.health_check_path)
                checker.start()
                self.checkers.append(checker)

    def _start_acme(self) -> None:
        proxy = self._proxy_options(self.context.options)
        if not proxy.acme.enabled:
            if self.acme is not None:
                self.acme.stop()
                self.acme = None
            return
        from dcrouter.proxy.acme import AcmeManager
        if self.acme is None:
            self.acme = AcmeManager(self.reactor, proxy.acme, self.context.state_dir,
                                    self.challenges, self._acme_issued,
                                    self.context.dns_challenge_publisher)
        self.acme.update(proxy.acme, self.table.terminate_domains())
        self.acme.start()

    def _acme_issued(self, name: str) -> None:
        self.certs.add_acme(name)

    # -- what connections ask of the service --------------------------------------
    def stats_for(self, route: Route) -> RouteStats:
        """The counters of ``route`` (kept across reconfigurations by route name)."""
        stats = self.route_stats.get(route.key)
        if stats is None:
            stats = self.route_stats[route.key] = RouteStats()
        return stats

    def count_unrouted(self, kind: str) -> None:
        """Count a connection closed before it had a route."""
        self.unrouted[kind] = self.unrouted.get(kind, 0) + 1

    def trusts_proxy_header(self, client_ip: IPAddress) -> bool:
        """Whether a connection from ``client_ip`` (normalised) must start with a PROXY header."""
        return bool(self._proxy_ips) and in_networks(client_ip, self._proxy_ips)

    def acme_answer(self, token: str) -> Optional[str]:
        """The key authorization of a pending http-01 challenge."""
        return self.challenges.get(token)

    def backend_tls_options(self, route: Route, target: Target) -> Any:
        """Client TLS options for re-encrypting to ``target`` (verifying per the route)."""
        key = (f"{route.key}/{id(route.options)}", target.label)
        options = self._backend_tls.get(key)
        if options is None:
            opts = route.options
            if opts.backend_verify:
                trust: Any = None
                if opts.backend_ca_path:
                    with open(opts.backend_ca_path, "rb") as f:
                        pems = re.findall(_PEM, f.read())
                    trust = ssl.trustRootFromCertificates(
                        [ssl.Certificate.loadPEM(p) for p in pems])
                options = ssl.optionsForClientTLS(opts.backend_server_name or target.host,
                                                  trustRoot=trust)
            else:
                options = ssl.CertificateOptions(verify=False,
                                                 raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
            self._backend_tls[key] = options
        return options

    def track(self, protocol: FrontProtocol) -> None:
        """A connection was accepted."""
        self.connections.add(protocol)
        self.access_log.opened(protocol)

    def untrack(self, protocol: FrontProtocol) -> None:
        """A connection closed; fires :meth:`drain` waiters when none is left."""
        self.connections.discard(protocol)
        self.access_log.closed(protocol)
        if not self.connections and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                d.callback(None)

    # -- ManagedService ------------------------------------------------------------
    def _start_rotation(self) -> None:
        interval = self._proxy_options(self.context.options).tls_ticket_rotation
        if self._rotation is not None and self._rotation.running:
            if self._rotation.interval == interval:
                return
            self._rotation.stop()
        self._rotation = None
        if interval > 0:
            self._rotation = LoopingCall(lambda: self.certs.rotate_tickets())
            self._rotation.clock = self.reactor
            self._rotation.start(interval, now=False)

    def startService(self) -> None:
        tune_gc()
        self.listeners.start(self._specs())
        self._start_rotation()
        self._start_checks()
        self._start_acme()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        if self._rotation is not None and self._rotation.running:
            self._rotation.stop()
        self._rotation = None
        for checker in self.checkers:
            checker.stop()
        self.checkers = []
        if self.acme is not None:
            self.acme.stop()
        d = self.listeners.stop()
        d.addBoth(self._close_access_log)
        for protocol in list(self.connections):
            protocol.abort()
        return d

    def _close_access_log(self, result: Any) -> Any:
        close_access_log(self.access_log)
        return result

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        return self.listeners.addresses()

    def reconfigure(self, options: DcRouterOptions) -> Optional[defer.Deferred]:
        """Swap in a new route table; re-bind only ports that changed."""
        proxy = self._proxy_options(options)
        table, certs = self._build(proxy, self.table)
        certs.adopt_session_context(self.certs)
        self.table, self.certs = table, certs
        self._proxy_ips = parse_networks(proxy.proxy_ips) if proxy.accept_proxy_protocol else ()
        self.splice = proxy.splice and splice_available()
        self._backend_tls = {}
        self.access_log = reopen_access_log(self.access_log, proxy, self.reactor, self)
        keep = {r.key for r in table.routes}
        for key in list(self.route_stats):
            if key not in keep and not self.route_stats[key].active:
                del self.route_stats[key]
        if self.running:
            self._start_rotation()
            self._start_checks()
            self._start_acme()
            return self.listeners.update(self._specs())
        return None

    def stop_accepting(self) -> Optional[defer.Deferred]:
        return self.listeners.stop()

    def drain(self) -> Optional[defer.Deferred]:
        if not self.connections:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._drain_waiters.append(d)
        return d

    def get_stats(self) -> dict:
        routes: dict[str, Any] = {}
        for route in self.table.routes:
            entry = self.stats_for(route).as_dict()
            entry["targets"] = route.balancer.health()
            routes[route.key] = entry
        out: dict[str, Any] = {
            "active_connections": len(self.connections),
            "routes": routes,
            "unrouted": dict(self.unrouted),
        }
        if self.acme is not None:
            out["acme"] = self.acme.status()
        return out
