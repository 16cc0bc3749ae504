"""Load balancing over a route's targets, TCP health checks and connect failover.

* :class:`Balancer` orders a route's targets for a new connection
  (round-robin or least-connections, healthy targets first).
* :class:`HealthChecker` opens a TCP connection to each target every
  ``health_check_interval`` seconds; a target that refuses leaves the
  rotation until a check succeeds again.
* :class:`FailoverConnector` (and :func:`connect_with_failover`, its Deferred
  form) tries the targets in that order until one accepts the connection.
"""

from __future__ import annotations

import ipaddress
import re
import time
from typing import Any, Callable, Optional

from twisted.internet import defer, error
from twisted.internet.endpoints import (
    HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from dcrouter.logsetup import get_logger
from dcrouter.timerwheel import wheel_for

log = get_logger("proxy")


class Target:
    """One backend ``host:port`` with its health and current connection count."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.ip_version = _ip_version(host)
        self.healthy = True
        self.active = 0
        self.failures = 0
        self.since = time.time()      # when ``healthy`` last changed (or the target appeared)
        self.last_error = ""          # the last failed check or connect, kept once healthy

    def mark(self, healthy: bool, error: str = "") -> None:
        """Record a check or connect result: up/down since when, and the last error."""
        if healthy != self.healthy:
            self.since = time.time()
        self.healthy = healthy
        if error:
            self.last_error = error

    @property
    def label(self) -> str:
        """``host:port`` (``[v6]:port``)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<Target {self.label} {'up' if self.healthy else 'down'} {self.active}>"


class Balancer:
    """Chooses the order in which a new connection tries a route's targets."""

    def __init__(self, targets: list[tuple[str, int]], method: str = "round-robin") -> None:
        self.targets = [Target(h, p) for h, p in targets]
        self.method = method
        self._next = 0

    def order(self) -> list[Target]:
        """Healthy targets in balancing order, then unhealthy ones as a last resort."""
        n = len(self.targets)
        if n <= 1:
            return list(self.targets)
        if self.method == "least-connections":
            start = self._next % n
            rotated = self.targets[start:] + self.targets[:start]
            self._next += 1
            ordered = sorted(rotated, key=lambda t: t.active)
        else:
            healthy = [i for i, t in enumerate(self.targets) if t.healthy]
            start = self._next % n
            # advance to the next healthy target so an unhealthy one does not double its neighbour's share
            if healthy:
                start = min(healthy, key=lambda i: (i - start) % n)
            self._next = start + 1
            ordered = self.targets[start:] + self.targets[:start]
        return [t for t in ordered if t.healthy] + [t for t in ordered if not t.healthy]

    def adopt_state(self, old: "Balancer") -> None:
        """Keep health and counts of targets that a reconfiguration kept."""
        by_label = {t.label: t for t in old.targets}
        for i, target in enumerate(self.targets):
            if target.label in by_label:
                self.targets[i] = by_label[target.label]
        self._next = old._next

    def health(self) -> dict[str, dict[str, Any]]:
        """``{target: {"healthy", "active", "failures", "since", "last_error"}}`` for stats."""
        return {t.label: {"healthy": t.healthy, "active": t.active, "failures": t.failures,
                          "since": t.since, "last_error": t.last_error}
                for t in self.targets}


_FAILURE_REPR = re.compile(r"\[Failure instance: Traceback \(failure with no frames\): "
                           r"<class '([\w.]+)'>: (.*?)\s*\]", re.S)


def reason_text(failure: Failure) -> str:
    """A failure's message for a log line, without the nested ``[Failure instance:
    Traceback ...]`` repr Twisted puts in some connect errors."""
    return _FAILURE_REPR.sub(lambda m: m.group(2), failure.getErrorMessage()).strip()


def _ip_version(host: str) -> int:
    """4 or 6 for a literal address, 0 for a name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 0


def target_endpoint(reactor: Any, host: str, port: int, timeout: float,
                    tls_options: Any = None, version: Optional[int] = None) -> Any:
    """A client endpoint for a target (literal IPs skip name resolution)."""
    if version is None:
        version = _ip_version(host)
    if version == 4:
        endpoint: Any = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    elif version == 6:
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if tls_options is not None:
        endpoint = wrapClientTLS(tls_options, endpoint)
    return endpoint


class _Probe(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class HealthChecker:
    """Periodic TCP connect checks of one balancer's targets."""

    def __init__(self, reactor: Any, balancer: Balancer, interval: float, route_key: str,
                 timeout: float = 5.0, path: str = "") -> None:
        self.reactor = reactor
        #: ``health_check_path``: an HTTP check (dcrouter.proxy.httpcheck) instead of a connect.
        self.path = path
        self.balancer = balancer
        self.interval = interval
        self.route_key = route_key
        self.timeout = min(timeout, interval) if interval else timeout
        self._loop: Optional[LoopingCall] = None

    def start(self) -> None:
        """Begin checking (first round after one interval)."""
        if self.interval > 0 and self._loop is None:
            self._loop = LoopingCall(self.check_all)
            self._loop.clock = self.reactor
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: log.failure("health checks stopped", f, route=self.route_key))

    def stop(self) -> None:
        """Stop checking."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check_all(self) -> defer.Deferred:
        """Check every target once; fires when all answered."""
        return defer.gatherResults([self.check(t) for t in self.balancer.targets],
                                   consumeErrors=True)

    def check(self, target: Target) -> defer.Deferred:
        """One TCP connect to ``target``; updates its health."""
        factory = Factory.forProtocol(_Probe)
        factory.noisy = False
        endpoint = target_endpoint(self.reactor, target.host, target.port, self.timeout,
                                   version=target.ip_version)
        if self.path:
            from dcrouter.proxy.httpcheck import http_check
            d = http_check(self.reactor, endpoint, self.path, target.host, target.port,
                           self.timeout)
        else:
            d = endpoint.connect(factory)

        def up(_: Any) -> None:
            if not target.healthy:
                log.info("target {target} of route {route} is healthy again",
                         target=target.label, route=self.route_key)
            target.mark(True)

        def down(failure: Any) -> None:
            if target.healthy:
                log.warn("target {target} of route {route} failed its health check: {error}",
                         target=target.label, route=self.route_key,
                         error=reason_text(failure))
            target.mark(False, f"health check: {reason_text(failure)}")
        d.addCallbacks(up, down)
        return d


def connect_with_failover(balancer: Balancer, connect: Callable[[Target], defer.Deferred],
                          mark_down: bool) -> defer.Deferred:
    """Try ``connect(target)`` for each target in balancing order until one succeeds.

    Fires with ``(target, result)``; fails with the last error when every
    target failed.  A failed target is marked unhealthy when ``mark_down``
    (health checks will bring it back).
    """
    order = balancer.order()
    result: defer.Deferred = defer.Deferred()

    def attempt(i: int, last: Any) -> None:
        if i >= len(order):
            result.errback(last)
            return
        target = order[i]
        d = connect(target)

        def ok(value: Any) -> None:
            result.callback((target, value))

        def failed(failure: Any) -> None:
            target.failures += 1
            if mark_down:
                target.mark(False, f"connect: {failure.getErrorMessage()}")
            else:
                target.last_error = f"connect: {failure.getErrorMessage()}"
            log.warn("connect to {target} failed: {error}", target=target.label,
                     error=failure.getErrorMessage())
            attempt(i + 1, failure)
        d.addCallbacks(ok, failed)

    if not order:
        result.errback(ConnectionError("route has no targets"))
    else:
        attempt(0, None)
    return result


class FailoverConnector(ClientFactory):
    """Connects a route's targets in balancing order until one accepts - the lean path.

    One object per proxied connection, no Deferreds: literal addresses go
    straight to ``reactor.connectTCP`` with the connect timeout on the shared
    timer wheel (a name goes through ``HostnameEndpoint``).  ``build()`` makes
    the protocol of an attempt; the protocol calls :meth:`made` from its
    ``connectionMade``, which calls ``on_connected(target, protocol)``; when
    every target failed, ``on_failed(failure)``.  :meth:`cancel` stops a
    pending attempt (the client left).

    ``raw(target, timeout, done)``, when given, connects literal addresses
    without Twisted (the splice relay needs only a socket): it returns a
    handle with ``cancel()`` and calls ``done(sock, None)`` or
    ``done(None, error)``; ``on_connected`` then receives the socket.
    """

    noisy = False

    def __init__(self, reactor: Any, balancer: Balancer, timeout: float, mark_down: bool,
                 build: Callable[[], Protocol], on_connected: Callable[[Target, Any], None],
                 on_failed: Callable[[Failure], None], raw: Optional[Callable[..., Any]] = None
                 ) -> None:
        self.reactor = reactor
        self.raw = raw
        self.pending: Any = None
        self.order = balancer.order()
        self.timeout = timeout
        self.mark_down = mark_down
        self.build = build
        self.on_connected = on_connected
        self.on_failed = on_failed
        self.index = -1
        self.target: Optional[Target] = None
        self.connector: Any = None
        self.timer: Any = None
        self.timed_out = False
        self.cancelled = False

    def start(self) -> "FailoverConnector":
        """Try the first target."""
        if not self.order:
            self.on_failed(Failure(ConnectionError("route has no targets")))
        else:
            self._next(None)
        return self

    def _next(self, last: Optional[Failure]) -> None:
        self.index += 1
        if self.index >= len(self.order):
            assert last is not None
            self.on_failed(last)
            return
        target = self.target = self.order[self.index]
        self.timed_out = False
        if target.ip_version and self.raw is not None:
            self.pending = self.raw(target, self.timeout, self._raw_done)
            return
        if target.ip_version:
            self.connector = self.reactor.connectTCP(target.host, target.port, self,
                                                     timeout=None)
            self.timer = wheel_for(self.reactor).call_later(self.timeout, self._timeout)
            return
        d = target_endpoint(self.reactor, target.host, target.port, self.timeout,
                            version=0).connect(_EndpointFactory(self))
        d.addErrback(self._failed)

    def _timeout(self) -> None:
        self.timer = None
        if self.connector is not None and self.connector.state == "connecting":
            self.timed_out = True
            self.connector.stopConnecting()

    def buildProtocol(self, addr: Any) -> Protocol:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        protocol = self.build()
        protocol.factory = self  # type: ignore[assignment]
        return protocol

    def made(self, protocol: Any) -> None:
        """The protocol of an attempt is connected (called from its ``connectionMade``)."""
        assert self.target is not None
        self.on_connected(self.target, protocol)

    def _raw_done(self, sock: Any, failure: Optional[BaseException]) -> None:
        self.pending = None
        if self.cancelled:
            if sock is not None:
                sock.close()
            return
        if sock is not None:
            assert self.target is not None
            self.on_connected(self.target, sock)
        else:
            self._failed(Failure(failure))

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.cancelled:
            return
        if self.timed_out:
            reason = Failure(error.TimeoutError(string=f"after {self.timeout:g} s"))
        self._failed(reason)

    def _failed(self, reason: Failure) -> None:
        if self.cancelled:
            return
        target = self.target
        assert target is not None
        target.failures += 1
        if self.mark_down:
            target.healthy = False
        log.warn("connect to {target} failed: {error}", target=target.label,
                 error=reason_text(reason))
        self._next(reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        pass

    def cancel(self) -> None:
        """Give up (the client is gone): stop a pending attempt, report nothing more."""
        self.cancelled = True
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        if self.connector is not None and self.connector.state == "connecting":
            self.connector.stopConnecting()


class _EndpointFactory(Factory):
    """For a target given by name: the endpoint's factory builds the connector's protocol."""

    noisy = False

    def __init__(self, connector: FailoverConnector) -> None:
        self.connector = connector

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = self.connector.build()
        protocol.factory = self.connector  # type: ignore[assignment]
        return protocol
