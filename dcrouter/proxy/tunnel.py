"""The bidirectional relay between a client and a target, with flow control.

Each side's transport is registered as the *producer* of the other side's
transport (Twisted producers/consumers): when the target's write buffer fills
because it reads slowly, Twisted pauses reading from the client, and the
other way round.  Memory per connection is therefore bounded by roughly two
socket read chunks and two transport buffer high-water marks, whatever the
speed difference of the two ends.

Half-closes are passed on (a client's EOF becomes a write shutdown towards
the target).  The only timer is the idle timeout (``connection_timeout``, an
:class:`~dcrouter.timerwheel.IdleTimeout` on the shared wheel): a long-lived
tunnel that carries traffic, such as a WebSocket, is never cut.

Plain TCP clients (passthrough and tcp routes) use
:class:`~dcrouter.proxy.splice.SpliceTunnel` instead where splice(2) exists;
this relay serves TLS-terminated tunnels and is the fallback.
"""

from __future__ import annotations

from typing import Any, Callable, Optional
from typing import Protocol as Protocol_

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.proxy.stats import RouteStats
from dcrouter.timerwheel import IdleTimeout, wheel_for


def close_write(transport: Any) -> None:
    """Pass an EOF on: a TCP write shutdown (half-close).

    TLS has no half-close in Twisted, and a TCP FIN under a TLS session (the
    ``loseWriteConnection`` a TLS transport forwards to its TCP transport)
    would end it without ``close_notify`` - the client's later ``close_notify``
    then meets a closed transport.  TLS connections get ``loseConnection``
    (``close_notify``; what the peer still sends is read until it answers).
    """
    if isinstance(transport, TLSMemoryBIOProtocol) or getattr(transport, "TLS", False) is True:
        # a TLS transport sends close_notify only once no producer is registered (the
        # other side of a relay always is): without this the client waited for the idle
        # timeout after its backend had closed
        if getattr(transport, "_producer", None) is not None:
            transport.unregisterProducer()
        transport.loseConnection()
        return
    shutdown = getattr(transport, "loseWriteConnection", None)
    if shutdown is not None:
        try:
            shutdown()
            return
        except (AttributeError, NotImplementedError):
            pass
    transport.loseConnection()


def forget_paused_producer(transport: Any) -> None:
    """Clear a consumer's memory of having paused its previous producer.

    Twisted's TCP transport keeps ``producerPaused`` across
    ``unregisterProducer``; left set, it would never pause the next producer
    (so a new backend could fill the client's buffer without bound), or, when
    it drained meanwhile, never resume it.  Cleared, the next write over the
    high-water mark pauses the new producer as usual.  Under TLS the flag
    lives on the TCP transport below.
    """
    for candidate in (transport, getattr(transport, "transport", None)):
        if getattr(candidate, "producerPaused", None) is True:
            candidate.producerPaused = False


class Tunnel:
    """Relays bytes between ``client`` (a transport) and one target connection."""

    def __init__(self, reactor: Any, client: Any, stats: RouteStats, idle_timeout: float,
                 on_done: Callable[[], None]) -> None:
        self.reactor = reactor
        self.client = client
        self.stats = stats
        self.idle_timeout = idle_timeout
        self.on_done = on_done
        self.backend: Optional[Any] = None
        self.pending: list[bytes] = []
        self.client_open = True
        self.backend_open = True
        self.client_eof = False
        self.backend_eof = False
        self.done = False
        self.idle = IdleTimeout(wheel_for(reactor), idle_timeout, self._on_idle)

    # -- setup ---------------------------------------------------------------
    def attach(self, backend_transport: Any, initial: bytes = b"") -> None:
        """The target is connected: send what the client sent so far, start relaying."""
        if self.done or not self.client_open:
            backend_transport.loseConnection()
            self._finish()
            return
        self.backend = backend_transport
        data = initial + b"".join(self.pending)
        self.pending = []
        if data:
            self.stats.bytes_in += len(data)
            backend_transport.write(data)
        backend_transport.registerProducer(self.client, True)
        self.client.registerProducer(backend_transport, True)
        if self.client_eof:
            close_write(backend_transport)
        self.client.resumeProducing()

    # -- client side -----------------------------------------------------------
    def client_data(self, data: bytes) -> None:
        """Bytes from the client."""
        self.idle.touch()
        if self.backend is None:
            self.pending.append(data)
            return
        self.stats.bytes_in += len(data)
        self.backend.write(data)

    def client_read_closed(self) -> None:
        """The client half-closed (EOF): pass it on."""
        self.client_eof = True
        if self.backend is not None:
            close_write(self.backend)
        self._maybe_close()

    def client_lost(self, reason: Optional[Failure] = None) -> None:
        """The client connection is gone."""
        self.client_open = False
        if self.backend is not None and self.backend_open:
            self.backend.loseConnection()
        self._maybe_finish()

    # -- backend side --------------------------------------------------------
    def backend_data(self, data: bytes) -> None:
        """Bytes from the target."""
        self.idle.touch()
        self.stats.bytes_out += len(data)
        self.client.write(data)

    def backend_read_closed(self) -> None:
        """The target half-closed."""
        self.backend_eof = True
        if self.client_open:
            close_write(self.client)
        self._maybe_close()

    def backend_lost(self, reason: Optional[Failure] = None) -> None:
        """The target connection is gone."""
        self.backend_open = False
        if self.client_open:
            self.client.loseConnection()
        self._maybe_finish()

    # -- ending ----------------------------------------------------------------
    def _maybe_close(self) -> None:
        if self.client_eof and self.backend_eof:
            if self.backend is not None:
                self.backend.loseConnection()
            self.client.loseConnection()

    def _maybe_finish(self) -> None:
        if not self.client_open and (self.backend is None or not self.backend_open):
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.idle.cancel()
        self.on_done()

    def abort(self) -> None:
        """Close both sides now (shutdown deadline, idle timeout)."""
        for transport in (self.client, self.backend):
            if transport is not None:
                abort = getattr(transport, "abortConnection", None)
                (abort or transport.loseConnection)()

    def _on_idle(self) -> None:
        if self.done:
            return
        self.stats.error("idle_timeout")
        self.abort()


class BackendSink(Protocol_):
    """What a :class:`BackendProtocol` reports to: a :class:`Tunnel` or an HTTP backend link."""

    stats: RouteStats

    def backend_data(self, data: bytes) -> None:
        """Bytes from the target."""

    def backend_read_closed(self) -> None:
        """The target half-closed."""

    def backend_lost(self, reason: Optional[Failure] = None) -> None:
        """The target connection is gone."""


@implementer(IHalfCloseableProtocol)
class BackendProtocol(Protocol):
    """The target side of a tunnel."""

    def __init__(self, tunnel: BackendSink) -> None:
        self.tunnel = tunnel

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.backend_data(data)

    def readConnectionLost(self) -> None:
        self.tunnel.backend_read_closed()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.tunnel.backend_lost(reason)


class BackendFactory(Factory):
    """Builds the :class:`BackendProtocol` of one connection attempt."""

    noisy = False

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def buildProtocol(self, addr: Any) -> BackendProtocol:
        return BackendProtocol(self.tunnel)
