"""The client side of the proxy: one :class:`FrontProtocol` per accepted connection.

A connection goes through these stages, as its listener's mode requires:

1. ``proxy`` - from a trusted load balancer (``proxy_ips``), a PROXY v1/v2
   header that replaces the client address;
2. ``tls`` - the ClientHello is read (:mod:`dcrouter.proxy.sni`) and the
   route chosen by SNI; ``passthrough`` replays the bytes to a target,
   ``terminate*`` feeds them into a server TLS engine whose plain side is
   relayed; ``http`` - an :class:`~dcrouter.proxy.httprelay.HttpRelay`
   routes every request by ``Host`` and path (terminated routes use one too,
   on their route, unless ``http = false``; a ``Host`` of another route is
   answered 421);
   ``tcp`` - the route is chosen by port and client address alone;
3. admission (:mod:`dcrouter.proxy.limits`, the same call for every mode),
   then a :class:`~dcrouter.proxy.tunnel.Tunnel` to a target chosen by the
   route's balancer, with failover.

The first bytes must arrive within the route's ``initial_data_timeout``.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any, Callable, Optional
from typing import Protocol as Protocol_

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.logsetup import get_logger
from dcrouter.proxy import proxyprotocol, sni
from dcrouter.proxy.accesslog import access_log_of
from dcrouter.proxy.certs import alpn_protocols
from dcrouter.proxy.h2frontend import H2Relay
from dcrouter.proxy.httprelay import HttpRelay
from dcrouter.proxy.balancer import FailoverConnector, Target, reason_text
from dcrouter.proxy.limits import Admission, IPAddress, LimitExceeded, Ticket, normalize_ip
from dcrouter.proxy.routes import Route, RouteTable
from dcrouter.proxy.stats import RouteStats
from dcrouter.proxy.rawconnect import RawConnect
from dcrouter.proxy.splice import SpliceTunnel, splice_capable
from dcrouter.proxy.tunnel import BackendProtocol, BackendSink, Tunnel
from dcrouter.timerwheel import wheel_for

log = get_logger("proxy")


class ProxyCore(Protocol_):
    """What connections need from the proxy service (implemented by ``ProxyService``)."""

    reactor: Any
    table: RouteTable
    admission: Admission
    certs: Any
    splice: bool

    def stats_for(self, route: Route) -> RouteStats:
        """Counters of a route."""

    def count_unrouted(self, kind: str) -> None:
        """Count a connection closed before it had a route."""

    def trusts_proxy_header(self, client_ip: IPAddress) -> bool:
        """Whether the peer must start with a PROXY header."""

    def acme_answer(self, token: str) -> Optional[str]:
        """Key authorization of a pending http-01 challenge."""

    def backend_tls_options(self, route: Route, target: Target) -> Any:
        """Client TLS options for re-encryption."""

    def track(self, protocol: "FrontProtocol") -> None:
        """A connection was accepted."""

    def untrack(self, protocol: "FrontProtocol") -> None:
        """A connection closed."""


def _no_delay(transport: Any) -> None:
    """TCP_NODELAY: a relay forwards what it has at once (Nagle would hold small
    writes such as a TLS server's last flight for a delayed ACK)."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


class _Backend(BackendProtocol):
    """Target side that first sends a PROXY header and, for re-encrypt, starts TLS.

    On the splice path the preamble is left to the tunnel (``preamble`` is
    empty here): nothing may sit in a transport buffer the tunnel bypasses.
    """

    factory: Any = None

    def __init__(self, tunnel: BackendSink, preamble: bytes, tls_options: Any) -> None:
        super().__init__(tunnel)
        self.preamble = preamble
        self.tls_options = tls_options

    def connectionMade(self) -> None:
        assert self.transport is not None
        _no_delay(self.transport)
        if self.preamble:
            self.transport.write(self.preamble)
        if self.tls_options is not None:
            self.transport.startTLS(self.tls_options)  # type: ignore[attr-defined]
        if self.factory is not None:
            self.factory.made(self)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self.tls_options is not None and reason.check(SSL.Error):
            self.tunnel.stats.error("backend_tls")
            log.warn("TLS to target failed: {error}", error=reason.getErrorMessage())
        super().connectionLost(reason)


class Connection:
    """What one client connection has been given: its route, admission ticket and tunnel."""

    def __init__(self, core: ProxyCore, route: Route, ticket: Ticket) -> None:
        self.core = core
        self.route = route
        self.ticket = ticket
        self.stats = core.stats_for(route)
        self.target: Optional[Target] = None
        self.tunnel: Any = None
        self.connector: Optional[FailoverConnector] = None
        self.released = False
        self.stats.active += 1
        self.stats.total += 1

    def release(self) -> None:
        """Give back the admission slot and the target's connection count (once)."""
        if self.released:
            return
        self.released = True
        self.ticket.release()
        self.stats.active -= 1
        if self.target is not None:
            self.target.active -= 1

    def use_target(self, target: Target) -> None:
        """Count this connection on ``target`` (moving the count on a reconnect)."""
        if self.target is not None:
            self.target.active -= 1
        self.target = target
        target.active += 1

    def _preamble(self, client_addr: tuple[str, int], local_addr: tuple[str, int]) -> bytes:
        version = self.route.options.send_proxy_protocol
        return proxyprotocol.encode(version, client_addr, local_addr) if version else b""

    def start_connect(self, sink: BackendSink, preamble: bytes,
                      on_connected: Callable[[Target, Any], None],
                      on_failed: Callable[[Failure], None],
                      raw: Optional[Callable[..., Any]] = None) -> FailoverConnector:
        """Connect a target of the route (with failover), calling back without Deferreds."""
        route, core = self.route, self.core
        reencrypt = route.tls == "terminate-and-reencrypt"

        def build() -> _Backend:
            target = connector.target
            assert target is not None
            options = core.backend_tls_options(route, target) if reencrypt else None
            return _Backend(sink, preamble, options)
        connector = FailoverConnector(core.reactor, route.balancer, route.options.connect_timeout,
                                      route.options.health_check_interval > 0, build,
                                      on_connected, on_failed, raw)
        self.connector = connector
        return connector.start()

    def connect(self, sink: BackendSink, client_addr: tuple[str, int],
                local_addr: tuple[str, int]) -> defer.Deferred:
        """Connect a target of the route (with failover); fires ``(target, protocol)``.

        ``sink`` receives the target's bytes and closes (an HTTP relay's
        backend link).
        """
        d: defer.Deferred = defer.Deferred()
        self.start_connect(sink, self._preamble(client_addr, local_addr),
                           lambda target, protocol: d.callback((target, protocol)), d.errback)
        return d

    def open_tunnel(self, client: Any, initial: bytes, client_addr: tuple[str, int],
                    local_addr: tuple[str, int], on_fail: Any = None) -> Any:
        """Pause ``client``, connect a target (with failover), then relay.

        A plain TCP client transport (passthrough and tcp routes) is relayed
        with splice(2) when the proxy may (:mod:`dcrouter.proxy.splice`);
        TLS-terminated clients use the Twisted relay.
        """
        route = self.route
        preamble = self._preamble(client_addr, local_addr)
        reactor = self.core.reactor

        def failed(failure: Failure) -> None:
            self.stats.error("connect")
            log.warn("route {route}: no target reachable: {error}", route=route.key,
                     error=reason_text(failure))
            if on_fail is not None:
                on_fail()
            else:
                client.loseConnection()
            tunnel.backend_lost(failure)

        if self.core.splice and splice_capable(client):
            tunnel: Any = SpliceTunnel(reactor, client, self.stats,
                                       route.options.connection_timeout, self.release, preamble)

            def spliced(target: Target, backend: Any) -> None:
                if not tunnel.done and tunnel.client_open:
                    self.use_target(target)
                # a protocol (a target given by name) or a raw socket (a literal address)
                tunnel.attach(getattr(backend, "transport", backend), initial)

            def raw(target: Target, timeout: float, done: Callable[..., None]) -> RawConnect:
                return RawConnect(reactor, target.host, target.port, target.ip_version,
                                  timeout, done)
            self.tunnel = tunnel
            tunnel.connector = self.start_connect(tunnel, b"", spliced, failed, raw)
            return tunnel
        client.pauseProducing()
        tunnel = Tunnel(reactor, client, self.stats, route.options.connection_timeout,
                        on_done=self.release)
        self.tunnel = tunnel

        def connected(target: Target, protocol: Any) -> None:
            if tunnel.done or not tunnel.client_open:     # the client left meanwhile
                protocol.transport.loseConnection()
                return
            self.use_target(target)
            tunnel.attach(protocol.transport, initial)
        self.start_connect(tunnel, preamble, connected, failed)
        return tunnel


@implementer(IHandshakeListener)
class _TerminatedProtocol(Protocol):
    """The plain side of a terminated TLS connection: relays once the handshake is done."""

    def __init__(self, front: "FrontProtocol", connection: Connection) -> None:
        self.front = front
        self.connection = connection
        self.relay: Any = None                  # HttpRelay or H2Relay
        self.tunnel: Any = None
        self.lost = False
        self.handshake_done = False
        self.timer: Any = None
        self.timed_out = False

    def connectionMade(self) -> None:
        timeout = self.connection.route.options.initial_data_timeout
        self.timer = wheel_for(self.front.core.reactor).call_later(timeout, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        self.timer = None
        self.timed_out = True
        self.connection.stats.error("handshake_timeout" if not self.handshake_done
                                    else "initial_timeout")
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        route = self.connection.route
        if route.options.relays_http:
            # HTTP request by request; the timer now covers the first request head
            front = self.front
            relay_class: Any = HttpRelay
            if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
                relay_class = H2Relay           # dcrouter.proxy.h2frontend
            self.relay = relay_class(front.core, self.transport, "https", front.port,
                                   front.client_ip, front.client_addr, front.local_addr,
                                   admit=lambda route: None, on_first_head=self._cancel_timer,
                                   fixed=self.connection)
        else:
            self._open(b"")

    def _open(self, initial: bytes) -> None:
        self._cancel_timer()
        if self.lost:
            return
        self.tunnel = self.connection.open_tunnel(self.transport, initial, self.front.client_addr,
                                                  self.front.local_addr)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.client_data(data)
        elif self.relay is not None:
            self.relay.client_data(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.lost = True
        self._cancel_timer()
        if self.tunnel is not None:
            self.tunnel.client_lost(reason)
        elif self.relay is not None:
            self.relay.client_lost()
        else:
            if not self.handshake_done and not self.timed_out:
                self.connection.stats.error("tls_handshake")
            self.connection.release()


@implementer(IHalfCloseableProtocol)
class FrontProtocol(Protocol):
    """One accepted client connection on a proxy port."""

    def __init__(self, core: ProxyCore, port: int) -> None:
        self.core = core
        self.port = port
        self.table: RouteTable = core.table
        self.stage = ""
        self.timer: Any = None
        self.parser: Any = None
        self.connection: Optional[Connection] = None
        self.tunnel: Any = None
        self.relay: Optional[HttpRelay] = None
        self.delegate: Optional[Protocol] = None
        self.client_ip: IPAddress = IPv4Address("0.0.0.0")
        self.client_addr: tuple[str, int] = ("", 0)
        self._local_addr: Optional[tuple[str, int]] = None
        self.closed = False

    @property
    def local_addr(self) -> tuple[str, int]:
        """The address the client connected to (asked of the socket on first use: only
        PROXY headers and HTTP relays need it)."""
        if self._local_addr is None:
            assert self.transport is not None
            host: Any = self.transport.getHost()
            self._local_addr = (str(normalize_ip(host.host)), host.port)
        return self._local_addr

    # -- lifecycle -------------------------------------------------------------
    def connectionMade(self) -> None:
        assert self.transport is not None
        _no_delay(self.transport)
        peer: Any = self.transport.getPeer()
        self.client_ip = normalize_ip(peer.host)
        text = peer.host
        if ":" in text or "%" in text:          # IPv6 (maybe IPv4-mapped, or with a zone)
            text = str(self.client_ip)
        self.client_addr = (text, peer.port)
        self.core.track(self)
        if self.core.trusts_proxy_header(self.client_ip):
            self.stage = "proxy"
            self.parser = proxyprotocol.ProxyHeaderParser()
            self._start_timer()
        else:
            self._start_mode(b"")

    def _start_mode(self, leftover: bytes) -> None:
        mode = self.table.mode(self.port)
        if mode == "tcp":
            self.stage = "route"
            route = self.table.match(self.port, None, self.client_ip)
            if route is None:
                self._refuse("no_route")
                return
            self._proxy(route, leftover)
            return
        self.stage = mode
        self._start_timer()
        if mode == "tls":
            self.parser = sni.ClientHelloParser()
        else:
            self.relay = HttpRelay(self.core, self.transport, "http", self.port, self.client_ip,
                                   self.client_addr, self.local_addr, admit=self._admit,
                                   on_first_head=self._cancel_timer)
        if leftover:
            self.dataReceived(leftover)

    def _start_timer(self) -> None:
        self.timer = wheel_for(self.core.reactor).call_later(
            self.table.initial_timeout(self.port), self._initial_timeout)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _initial_timeout(self) -> None:
        self.timer = None
        self._refuse("initial_timeout")

    def _refuse(self, kind: str, route: Optional[Route] = None, reply: bytes = b"") -> None:
        """Close a connection that gets no tunnel (counted as an error of ``kind``)."""
        self._cancel_timer()
        access_log_of(self.core).refused(self, kind, route)
        if route is not None:
            self.core.stats_for(route).error(kind)
        else:
            self.core.count_unrouted(kind)
        log.debug("closing {client} on port {port}: {kind}", client=self.client_addr[0],
                  port=self.port, kind=kind)
        assert self.transport is not None
        if reply:
            self.transport.write(reply)
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- data ------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.delegate is not None:
            self.delegate.dataReceived(data)
        elif self.tunnel is not None:
            self.tunnel.client_data(data)
        elif self.relay is not None:
            self.relay.client_data(data)
        elif self.stage == "proxy":
            self._on_proxy_header(data)
        elif self.stage == "tls":
            self._on_tls(data)
        # other stages (waiting for a target, closing): bytes are dropped only after close

    def _on_proxy_header(self, data: bytes) -> None:
        state = self.parser.feed(data)
        if state == proxyprotocol.INVALID:
            self._refuse("bad_proxy_header")
        elif state == proxyprotocol.DONE:
            self._cancel_timer()
            if self.parser.source is not None:
                self.client_ip = normalize_ip(self.parser.source[0])
                self.client_addr = (str(self.client_ip), self.parser.source[1])
            rest = self.parser.rest
            self.parser = None
            self._start_mode(rest)

    def _on_tls(self, data: bytes) -> None:
        state = self.parser.feed(data)
        if state == sni.NEED_MORE:
            return
        self._cancel_timer()
        if state == sni.NOT_TLS:
            self._refuse("not_tls")
            return
        hello = self.parser.hello
        route = self.table.match(self.port, hello.server_name, self.client_ip)
        if route is None:
            self._refuse("no_route")
            return
        buffered = bytes(self.parser.buffered)
        self.parser = None
        if route.tls == "passthrough":
            self._proxy(route, buffered)
        else:
            self._terminate(route, buffered)

    # -- routing outcomes --------------------------------------------------------
    def _admit(self, route: Route) -> Optional[Connection]:
        try:
            ticket = self.core.admission.admit(route.key, self.client_ip, route.ip_rules,
                                               route.options.max_connections,
                                               route.options.max_connections_per_ip)
        except LimitExceeded as e:
            log.debug("route {route} refused {client}: {kind}", route=route.key,
                      client=self.client_addr[0], kind=e.kind)
            self._refuse(e.kind, route)
            return None
        connection = Connection(self.core, route, ticket)
        access_log_of(self.core).admitted(self, connection)
        return connection

    def _proxy(self, route: Route, initial: bytes) -> None:
        connection = self._admit(route)
        if connection is not None:
            self._relay(connection, initial)

    def _relay(self, connection: Connection, initial: bytes, on_fail: Any = None) -> None:
        self.stage = "relay"
        self.connection = connection
        local = self.local_addr if connection.route.options.send_proxy_protocol else ("", 0)
        self.tunnel = connection.open_tunnel(self.transport, initial, self.client_addr, local,
                                             on_fail=on_fail)

    def _terminate(self, route: Route, buffered: bytes) -> None:
        connection = self._admit(route)
        if connection is None:
            return
        self.stage = "terminated"
        self.connection = connection
        # one TLS factory per certificate store, the wrapped protocol made here
        tls = TLSMemoryBIOProtocol(self.core.certs.tls_factory(),
                                   _TerminatedProtocol(self, connection))
        assert self.transport is not None
        tls.alpn_protocols = alpn_protocols(route)  # type: ignore[attr-defined]  # certs' ALPN
        self.delegate = tls
        tls.makeConnection(self.transport)
        tls.dataReceived(buffered)

    # -- closing -------------------------------------------------------------
    def readConnectionLost(self) -> None:
        if self.tunnel is not None:
            self.tunnel.client_read_closed()
        elif self.relay is not None:
            self.relay.client_read_closed()
        elif self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.closed = True
        self._cancel_timer()
        if self.delegate is not None:
            self.delegate.connectionLost(reason)
        elif self.tunnel is not None:
            self.tunnel.client_lost(reason)
        elif self.relay is not None:
            self.relay.client_lost()
        elif self.connection is not None:
            self.connection.release()
        self.core.untrack(self)

    def abort(self) -> None:
        """Close now (shutdown deadline passed)."""
        if self.tunnel is not None:
            self.tunnel.abort()
        if self.relay is not None:
            self.relay.abort()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class FrontFactory(Factory):
    """Builds a :class:`FrontProtocol` for each connection on one proxy port."""

    noisy = False

    def __init__(self, core: ProxyCore, port: int) -> None:
        self.core = core
        self.port = port

    def buildProtocol(self, addr: Any) -> FrontProtocol:
        return FrontProtocol(self.core, self.port)
