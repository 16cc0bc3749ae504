"""UDP and TCP transports of the DNS server, with their abuse limits.

* :class:`DnsDatagramProtocol` answers datagrams, after the per-client-IP
  :class:`RateLimiter` (``dns.rate_limit`` responses a second; over it the
  query is dropped, so the server cannot amplify floods at a spoofed victim).
* :class:`DnsTcpProtocol` reads length-prefixed queries (RFC 1035 4.2.2,
  RFC 7766): pipelined queries are answered in order; a length prefix of 0
  or above :data:`~dcrouter.dns.server.MAX_TCP_QUERY` closes the connection
  (so a huge prefix cannot make it buffer); idle connections close after
  ``dns.tcp_timeout``; reading pauses while the client does not read its
  answers.  :class:`DnsTcpFactory` caps concurrent connections.
* Zone transfers (:mod:`dcrouter.dns.transfer`) answer with many messages:
  they are written one by one as the client reads them (the write buffer
  pauses the protocol), and later pipelined queries wait their turn.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Callable, Iterator, Optional

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from dcrouter.dns.server import MAX_TCP_QUERY, Responder
from dcrouter.dns.transfer import TransferHandler
from dcrouter.logsetup import get_logger

log = get_logger("dns")


class RateLimiter:
    """At most ``limit`` responses per client IP in each one-second window (0: unlimited).

    Memory is bounded: at most ``max_clients`` addresses are tracked per
    window; beyond that new addresses are refused until the next second.
    """

    def __init__(self, limit: int, max_clients: int = 100000,
                 clock: Callable[[], float] = time.monotonic, slip: int = 0) -> None:
        self.limit = limit
        #: Every ``slip``-th refused query gets a truncated answer (0: none).
        self.slip = slip
        self.max_clients = max_clients
        self.clock = clock
        self.window = -1
        self.counts: dict[str, int] = {}
        self.limited = 0

    def allow(self, host: str) -> bool:
        """Count one response to ``host``; False when over the limit."""
        if not self.limit:
            return True
        now = int(self.clock())
        counts = self.counts
        if now != self.window:
            self.window = now
            counts.clear()
        seen = counts.get(host, 0)
        if seen >= self.limit or (not seen and len(counts) >= self.max_clients):
            self.limited += 1
            return False
        counts[host] = seen + 1
        return True

    def slip_now(self) -> bool:
        """After a refusal: whether this one gets a truncated answer instead of silence."""
        return bool(self.slip) and self.limited % self.slip == 0


class DnsDatagramProtocol(DatagramProtocol):
    """Answers DNS queries arriving over UDP."""

    noisy = False

    def __init__(self, responder: Responder, limiter: RateLimiter) -> None:
        self.responder = responder
        self.limiter = limiter
        self.errors = 0
        self._sendto: Optional[Callable[[bytes, Any], Any]] = None

    def startProtocol(self) -> None:
        """Send through the socket directly: the transport's per-datagram address
        validation costs more than the rest of a cached answer (measured with py-spy)."""
        sock = getattr(self.transport, "socket", None)
        self._sendto = sock.sendto if sock is not None else None

    def stopProtocol(self) -> None:
        """The port closed."""
        self._sendto = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """Rate-limit, answer, send."""
        try:
            if self.limiter.allow(addr[0]):
                response = self.responder.handle_udp(datagram)
            elif self.limiter.slip_now():
                response = self.responder.slip_response(datagram)
            else:
                return
        except Exception as e:  # never let one packet stop the listener
            self.errors += 1
            log.error("DNS query failed: {error}", error=repr(e), client=addr[0])
            return
        self._send(response, addr)

    def _send(self, response: Optional[bytes], addr: Any) -> None:
        if response is not None:
            try:
                if self._sendto is not None:
                    self._sendto(response, addr)
                else:
                    self.transport.write(response, addr)
            except OSError:  # unreachable client, full buffer: nothing to do for UDP
                pass


@implementer(IHalfCloseableProtocol)
class DnsTcpProtocol(Protocol, TimeoutMixin):
    """One TCP client: length-prefixed queries in, length-prefixed answers out.

    A client that half-closes after its queries still gets every answer.
    """

    def __init__(self, factory: "DnsTcpFactory") -> None:
        self.factory = factory
        self.buffer = bytearray()
        self.paused = False
        self.closing = False
        self.read_closed = False
        #: The messages of a zone transfer still to be written.
        self.stream: Optional[Iterator[bytes]] = None

    def connectionMade(self) -> None:
        """Count the connection, arm the idle timer, let the write buffer pause reads."""
        self.factory.connections += 1
        self.setTimeout(self.factory.timeout)
        self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Any = None) -> None:
        """Forget the connection."""
        self.factory.connections -= 1
        self.setTimeout(None)

    def timeoutConnection(self) -> None:
        """Idle too long."""
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        """Buffer and answer every complete query."""
        if self.closing:
            return
        self.buffer += data
        self._process()

    def _process(self) -> None:
        buf = self.buffer
        while not self.paused and not self.closing:
            if self.stream is not None:
                self._stream_next()
                continue
            if len(buf) < 2:
                return
            (length,) = struct.unpack_from("!H", buf)
            if length == 0 or length > MAX_TCP_QUERY:
                self.factory.oversized += 1
                self.closing = True
                self.transport.loseConnection()
                return
            if len(buf) < 2 + length:
                return
            message = bytes(buf[2:2 + length])
            del buf[:2 + length]
            self.resetTimeout()
            try:
                transfers = self.factory.transfers
                if transfers is not None:
                    self.stream = transfers.messages(message, self._peer_host())
                    if self.stream is not None:
                        continue
                response = self.factory.responder.handle_tcp(message)
            except Exception as e:
                self.factory.errors += 1
                log.error("DNS query failed: {error}", error=repr(e))
                response = None
            if response is not None:
                self.transport.write(struct.pack("!H", len(response)) + response)

    def _stream_next(self) -> None:
        """Write the next message of a transfer (the stream ends on an encoding error)."""
        assert self.stream is not None
        try:
            chunk = next(self.stream, None)
        except Exception as e:
            self.factory.errors += 1
            log.error("zone transfer failed: {error}", error=repr(e))
            chunk = None
            self.closing = True
            self.transport.loseConnection()
        if chunk is None:
            self.stream = None
            return
        self.resetTimeout()
        self.transport.write(struct.pack("!H", len(chunk)) + chunk)

    def _peer_host(self) -> str:
        peer = self.transport.getPeer()
        return str(getattr(peer, "host", ""))

    def readConnectionLost(self) -> None:
        """The client sent everything: close once its answers are written."""
        self.read_closed = True
        if not self.paused:
            self._finish()

    def writeConnectionLost(self) -> None:
        """The client cannot read any more."""
        self.closing = True
        self.transport.loseConnection()

    def _finish(self) -> None:
        if not self.closing:
            self.closing = True
            self.transport.loseConnection()

    # IPushProducer: the transport pauses us when the client does not read.
    def pauseProducing(self) -> None:
        """Stop reading queries until the answers drain."""
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """Read again and answer what was buffered."""
        self.paused = False
        if not self.read_closed:
            self.transport.resumeProducing()
        self._process()
        if self.read_closed and not self.paused:
            self._finish()

    def stopProducing(self) -> None:
        """The connection is going away."""
        self.closing = True


class DnsTcpFactory(Factory):
    """Builds :class:`DnsTcpProtocol`; refuses clients beyond ``max_connections``."""

    noisy = False

    def __init__(self, responder: Responder, max_connections: int, timeout: float) -> None:
        self.responder = responder
        self.max_connections = max_connections
        self.timeout = timeout
        self.connections = 0
        self.refused = 0
        self.oversized = 0
        self.errors = 0
        #: Answers zone transfers; None: they get the ordinary (REFUSED) answer.
        self.transfers: Optional[TransferHandler] = None

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        """A protocol, or None (the connection is closed) when at the limit."""
        if self.connections >= self.max_connections:
            self.refused += 1
            return None
        return DnsTcpProtocol(self)
