"""HTTP/2 on terminated routes: one :class:`H2Relay` per TLS connection that chose ALPN ``h2``.

The ``h2`` library (hyper-h2) keeps the protocol state; this module routes
and bounds.  Every stream is a request like an HTTP/1.1 one on the same
route: its ``:authority`` must belong to the route the SNI chose, else
``421 Misdirected Request`` on that stream (RFC 9110 15.5.20; a client that
coalesced connections, RFC 9113 9.1.1, retries on a new one), and it goes to
a target of the route as an HTTP/1.1 request (:mod:`dcrouter.proxy.h2stream`)
on a kept-alive target connection of this relay's pool.

Limits, each answered the way nginx, HAProxy and the RFC expect:

* ``http2_max_concurrent_streams`` (SETTINGS_MAX_CONCURRENT_STREAMS); a
  stream counts until its target exchange is torn down, so a reset stream
  frees its slot only when its target connection is closed;
* rapid reset (CVE-2023-44487): streams the client resets cost tokens of a
  bucket of ``2 x max streams`` refilled at ``max streams`` per second;
  when it is empty: GOAWAY ``ENHANCE_YOUR_CALM`` and close;
* control-frame floods (PING, SETTINGS, PRIORITY, empty DATA, WINDOW_UPDATE
  while no response is under way, unknown frames): a bucket of :data:`CONTROL_BURST` refilled at
  :data:`CONTROL_RATE` per second, then GOAWAY ``ENHANCE_YOUR_CALM``;
  besides, while the client does not read what the proxy owes it (PING and
  SETTINGS acknowledgements included) nothing more is read from it;
* ``http2_max_header_list_size``: decoded header lists (HPACK bombs) and,
  as received, a HEADERS+CONTINUATION block (CVE-2024-27316 class) longer
  than that plus 16 KiB, or more than 64 CONTINUATION frames: the
  connection ends with GOAWAY;
* flow control both ways: request bodies are acknowledged (WINDOW_UPDATE)
  only once the target connection has taken them (``http2_initial_window_size``
  bounds what a stream has in flight); response bodies wait for the
  client's window with the target connection paused.

Protocol errors close the connection with the GOAWAY ``h2`` prepares;
nothing a client sends reaches the log as a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
from h2.errors import ErrorCodes
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from dcrouter.logsetup import get_logger
from dcrouter.proxy.h2stream import BadRequest, Exchange, TargetLink, request_head
from dcrouter.proxy.httpchecks import misdirected
from dcrouter.proxy.httpio import write_now

if TYPE_CHECKING:  # pragma: no cover
    from dcrouter.proxy.frontend import Connection
    from dcrouter.proxy.limits import IPAddress

log = get_logger("proxy.http")

#: Control frames (PING, SETTINGS, PRIORITY, empty DATA...) a client may send in a burst...
CONTROL_BURST = 200
#: ...and per second after it.
CONTROL_RATE = 50.0
#: Slack over http2_max_header_list_size for a header block as received (HPACK encoded).
HEADER_BLOCK_SLACK = 16 * 1024


class Bucket:
    """A token bucket on the reactor's clock."""

    def __init__(self, seconds: Callable[[], float], burst: float, rate: float) -> None:
        self.seconds = seconds
        self.burst = burst
        self.rate = rate
        self.tokens = burst
        self.at = seconds()

    def take(self, n: float = 1.0) -> bool:
        """Spend ``n`` tokens; False when the bucket is empty."""
        now = self.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        return self.tokens >= 0


class BoundedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer with a byte bound on a header block still being received."""

    def __init__(self, limit: int) -> None:
        super().__init__(server=True)
        self.limit = limit
        self._block = 0

    def _update_header_buffer(self, f: Any) -> Any:
        if f is not None and (self._headers_buffer or "END_HEADERS" not in f.flags) \
                and getattr(f, "data", None) is not None:
            self._block = (self._block if self._headers_buffer else 0) + len(f.data)
            if self._block > self.limit:
                raise h2.exceptions.DenialOfServiceError("header block too large")
        return super()._update_header_buffer(f)


@implementer(IPushProducer)
class H2Relay:
    """Serves one HTTP/2 client connection of a terminated route (see the module docstring)."""

    def __init__(self, core: Any, client: Any, proto: str, port: int, client_ip: "IPAddress",
                 client_addr: tuple[str, int], local_addr: tuple[str, int],
                 admit: Any, on_first_head: Callable[[], None], fixed: "Connection") -> None:
        self.core = core
        self.client = client
        self.proto = proto
        self.port = port
        self.client_ip = client_ip
        self.client_addr = client_addr
        self.local_addr = local_addr
        self.on_first_head = on_first_head
        self.fixed = fixed
        self.route = fixed.route
        self.stats = fixed.stats
        options = self.route.options
        self.max_streams = options.http2_max_concurrent_streams
        self.exchanges: dict[int, Exchange] = {}
        self.links: set[TargetLink] = set()
        self.idle_links: list[TargetLink] = []
        self.first = True
        self.closing = False
        self.client_open = True
        self.client_paused = False          # the client's transport buffer is full
        self.first_target = True
        seconds = core.reactor.seconds
        self.resets = Bucket(seconds, 2.0 * self.max_streams, float(self.max_streams))
        self.control = Bucket(seconds, CONTROL_BURST, CONTROL_RATE)
        self.last_activity = self.idle_since = seconds()
        self._idle_call: Any = core.reactor.callLater(self._next_check(), self._check_idle)
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_inbound_headers=True,
                                           normalize_inbound_headers=True)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.incoming_buffer = BoundedFrameBuffer(options.http2_max_header_list_size
                                                     + HEADER_BLOCK_SLACK)
        self.h2.decoder.max_header_list_size = options.http2_max_header_list_size
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: options.http2_max_header_list_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: options.http2_initial_window_size,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.h2.initiate_connection()
        client.registerProducer(self, True)
        self._send()

    # -- client side ---------------------------------------------------------------
    def client_data(self, data: bytes) -> None:
        """Bytes from the client (after TLS)."""
        if self.closing:
            return
        self.last_activity = self.core.reactor.seconds()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._protocol_error(e)
            return
        for event in events:
            if self.closing:
                break
            self._event(event)
        self._send()

    def _event(self, event: Any) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event.stream_id, event.headers, event.stream_ended is not None)
        elif isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.StreamEnded):
            exchange = self.exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.request_end()
        elif isinstance(event, h2.events.TrailersReceived):
            exchange = self.exchanges.get(event.stream_id)
            if exchange is not None and event.stream_ended is not None:
                exchange.request_end(event.headers)
                event.stream_ended = None       # handled with its trailers
        elif isinstance(event, h2.events.StreamReset):
            self._client_reset(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            if not self.exchanges:
                self._control_frame()           # a window for nothing: a control frame
            self._window_opened(event.stream_id)
        elif isinstance(event, (h2.events.PingReceived, h2.events.RemoteSettingsChanged,
                                h2.events.PriorityUpdated, h2.events.UnknownFrameReceived)):
            self._control_frame()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close()

    def _control_frame(self) -> None:
        if not self.control.take():
            self._calm_down("control frame flood")

    def _calm_down(self, reason: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM and close (a flood)."""
        if self.closing:
            return
        log.info("HTTP/2 client {client} on route {route}: {reason}",
                 client=self.client_addr[0], route=self.route.key, reason=reason)
        self.stats.error("h2_flood")
        self.h2.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
        self._send()
        self._close()

    def _protocol_error(self, error: Exception) -> None:
        log.debug("HTTP/2 protocol error from {client}: {error}", client=self.client_addr[0],
                  error=str(error))
        self.stats.error("bad_http2")
        self._send()                            # the GOAWAY h2 prepared
        self._close()

    # -- streams -----------------------------------------------------------------------
    def _request(self, stream_id: int, headers: list, ended: bool) -> None:
        if self.first:
            self.first = False
            self.on_first_head()
        if len(self.exchanges) >= self.max_streams:
            # h2 counts open streams; this counts exchanges not yet torn down (resets included)
            self.h2.reset_stream(stream_id, error_code=ErrorCodes.REFUSED_STREAM)
            return
        forwarded = (self.client_addr[0], self.proto) \
            if self.route.options.add_forwarded_headers else None
        try:
            head, raw, chunked = request_head(headers, ended, forwarded)
        except BadRequest as e:
            log.debug("bad HTTP/2 request from {client}: {reason}", client=self.client_addr[0],
                      reason=str(e))
            self.stats.error("bad_http")
            self._answer(stream_id, 400, b"bad request\n")
            return
        if misdirected(head, self.core.table, self.port, self.client_ip, self.route):
            self.stats.error("misdirected")
            self._answer(stream_id, 421, b"this connection's TLS name does not serve that Host\n")
            return
        exchange = Exchange(self, stream_id, head.method, chunked)
        self.exchanges[stream_id] = exchange
        self.stats.requests += 1
        link = self._link()
        exchange.link = link
        link.exchange = exchange
        link.write(raw)
        if ended:
            exchange.request_ended = True

    def _answer(self, stream_id: int, status: int, body: bytes) -> None:
        """A local answer on one stream (400, 421, 502)."""
        try:
            self.h2.send_headers(stream_id, [(b":status", b"%d" % status),
                                             (b"content-type", b"text/plain"),
                                             (b"content-length", b"%d" % len(body))])
            self.h2.send_data(stream_id, body, end_stream=True)
        except h2.exceptions.H2Error:
            pass                                # the stream or window is gone: nothing to say

    def _data(self, event: Any) -> None:
        exchange = self.exchanges.get(event.stream_id)
        if not event.data and not event.stream_ended:
            self._control_frame()               # empty DATA frames cost like control frames
        if exchange is None or exchange.done:
            self._ack(event.stream_id, event.flow_controlled_length)
            return
        exchange.request_data(event.data)
        exchange.unacked += event.flow_controlled_length
        self._ack_exchange(exchange)

    def _ack_exchange(self, exchange: Exchange) -> None:
        link = exchange.link
        if exchange.unacked and (link is None or not _buffer_full(link.transport)):
            self._ack(exchange.stream_id, exchange.unacked)
            exchange.unacked = 0

    def _ack(self, stream_id: int, length: int) -> None:
        if length:
            try:
                self.h2.acknowledge_received_data(length, stream_id)
            except h2.exceptions.H2Error:
                pass

    def _client_reset(self, stream_id: int) -> None:
        exchange = self.exchanges.get(stream_id)
        if exchange is not None:
            exchange.done = True
            self._forget(exchange)
            if exchange.link is not None:
                exchange.link.close()           # the response is cut: never reused
            if not self.resets.take():
                self._calm_down("rapid reset")

    def link_closed(self, link: TargetLink) -> None:
        """A target connection ended."""
        self.links.discard(link)
        if link in self.idle_links:
            self.idle_links.remove(link)

    def link_idle(self, link: TargetLink) -> None:
        """A target connection finished a response and may serve the next stream."""
        if self.closing or len(self.idle_links) >= self.max_streams:
            link.close()
            return
        self.idle_links.append(link)

    def _link(self) -> TargetLink:
        while self.idle_links:
            link = self.idle_links.pop()
            if not link.closed:
                return link
        link = TargetLink(self)
        self.links.add(link)
        d = self.fixed.connect(link, self.client_addr, self.local_addr)
        d.addCallbacks(lambda result: self._connected(link, *result),
                       lambda failure: self._connect_failed(link, failure))
        return link

    def _connected(self, link: TargetLink, target: Any, protocol: Any) -> None:
        if self.closing or link.closed:
            protocol.transport.loseConnection()
            return
        if self.first_target:
            self.first_target = False
            self.fixed.use_target(target)
        link.connected(protocol.transport)
        protocol.transport.registerProducer(_LinkProducer(self, link), True)
        self.link_drained(link)                 # what arrived while connecting

    def _connect_failed(self, link: TargetLink, failure: Any) -> None:
        self.stats.error("connect")
        log.warn("route {route}: no target reachable: {error}", route=self.route.key,
                 error=failure.getErrorMessage())
        exchange = link.exchange
        link.closed = True
        self.link_closed(link)
        if exchange is not None:
            self.exchange_failed(exchange, "no target reachable")

    def exchange_failed(self, exchange: Exchange, reason: str) -> None:
        """A target failed a stream: 502 if nothing was sent yet, else reset the stream."""
        log.debug("route {route}: HTTP/2 stream {stream}: {reason}", route=self.route.key,
                  stream=exchange.stream_id, reason=reason)
        exchange.done = True
        self._forget(exchange)
        if exchange.headers_sent:
            try:
                self.h2.reset_stream(exchange.stream_id, error_code=ErrorCodes.INTERNAL_ERROR)
            except h2.exceptions.H2Error:
                pass
        else:
            self._answer(exchange.stream_id, 502, b"no target reachable\n")
        self._send()

    # -- responses ------------------------------------------------------------------------
    def send_headers(self, exchange: Exchange, headers: list[tuple[bytes, bytes]]) -> None:
        """The response head of a stream."""
        try:
            self.h2.send_headers(exchange.stream_id, headers)
        except h2.exceptions.H2Error as e:
            self.exchange_failed(exchange, f"cannot send the response head: {e}")
            return
        self._send()

    def flush(self, exchange: Exchange) -> None:
        """Send what the client's window allows of a stream's response; pause its target
        connection while bytes wait."""
        stream_id = exchange.stream_id
        h2c = self.h2
        try:
            while exchange.out:
                window = min(h2c.local_flow_control_window(stream_id),
                             h2c.max_outbound_frame_size)
                if window <= 0:
                    break
                piece = exchange.out[0]
                if len(piece) > window:
                    exchange.out[0] = piece[window:]
                    piece = piece[:window]
                else:
                    exchange.out.pop(0)
                exchange.out_size -= len(piece)
                self.stats.bytes_out += len(piece)
                h2c.send_data(stream_id, piece)
            if not exchange.out and exchange.out_ended:
                h2c.end_stream(stream_id)
                self._finished(exchange)
        except h2.exceptions.H2Error as e:
            self.exchange_failed(exchange, f"cannot send the response: {e}")
            return
        link = exchange.link
        if link is not None and not link.closed:
            if exchange.out or self.client_paused:
                link.pause()
            else:
                link.resume()
        self._send()

    def _finished(self, exchange: Exchange) -> None:
        exchange.done = True
        self._forget(exchange)
        if exchange.unacked:
            self._ack(exchange.stream_id, exchange.unacked)
            exchange.unacked = 0

    def _window_opened(self, stream_id: int) -> None:
        targets = [self.exchanges[stream_id]] if stream_id in self.exchanges \
            else list(self.exchanges.values()) if stream_id == 0 else []
        for exchange in targets:
            if exchange.out or exchange.out_ended:
                self.flush(exchange)

    def link_drained(self, link: TargetLink) -> None:
        """A target connection's write buffer drained: acknowledge the request body sent."""
        if link.exchange is not None:
            self._ack_exchange(link.exchange)
            self._send()

    # -- the client's transport ------------------------------------------------------------
    def _send(self) -> None:
        data = self.h2.data_to_send()
        if data and self.client_open:
            write_now(self.client, data)

    def pauseProducing(self) -> None:
        """IPushProducer: the client's transport buffer is full; pause every target, and read
        nothing more from a client that does not read what it is owed (PING and SETTINGS
        acknowledgements included)."""
        self.client_paused = True
        for link in list(self.links):
            link.pause()
        if self.client_open and not self.closing:
            self.client.pauseProducing()

    def resumeProducing(self) -> None:
        """IPushProducer: the client drained; targets whose window is open read again."""
        self.client_paused = False
        if self.client_open and not self.closing:
            self.client.resumeProducing()
        for exchange in list(self.exchanges.values()):
            if exchange.link is not None and not exchange.out:
                exchange.link.resume()
            elif exchange.out:
                self.flush(exchange)

    def stopProducing(self) -> None:
        """IPushProducer: the client connection is going away."""
        self._close()

    # -- ending ---------------------------------------------------------------------------
    def _close(self) -> None:
        if self.closing:
            return
        self.closing = True
        for link in list(self.links):
            link.close()
        if self.client_open:
            self.client.loseConnection()

    def client_lost(self) -> None:
        """The client connection is gone: close every target connection, release the slot."""
        self.client_open = False
        self._close()
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self.fixed.release()

    def abort(self) -> None:
        """Close now (shutdown deadline)."""
        for link in list(self.links):
            link.close()
        abort = getattr(self.client, "abortConnection", None)
        (abort or self.client.loseConnection)()

    def _next_check(self) -> float:
        """Seconds to the nearer deadline: ``http_keep_alive_timeout`` after the last stream
        ended (control frames do not extend it), ``connection_timeout`` of silence."""
        options = self.route.options
        now = self.core.reactor.seconds()
        deadline = self.last_activity + options.connection_timeout
        if not self.exchanges:
            deadline = min(deadline, self.idle_since + options.http_keep_alive_timeout)
        return max(0.05, deadline - now)

    def _check_idle(self) -> None:
        self._idle_call = None
        if not self.client_open:
            return
        options = self.route.options
        now = self.core.reactor.seconds()
        if now - self.last_activity >= options.connection_timeout:
            self.stats.error("idle_timeout")
            self.abort()
            return
        if not self.exchanges and now - self.idle_since >= options.http_keep_alive_timeout:
            self.h2.close_connection()          # GOAWAY NO_ERROR: the client may reconnect
            self._send()
            self._close()
            return
        self._idle_call = self.core.reactor.callLater(self._next_check(), self._check_idle)

    def _forget(self, exchange: Exchange) -> None:
        if self.exchanges.get(exchange.stream_id) is exchange:
            del self.exchanges[exchange.stream_id]
            if not self.exchanges:
                self.idle_since = self.core.reactor.seconds()


@implementer(IPushProducer)
class _LinkProducer:
    """Registered on a target connection: its buffer fills (stop acknowledging the request
    body) and drains (acknowledge it)."""

    def __init__(self, relay: H2Relay, link: TargetLink) -> None:
        self.relay = relay
        self.link = link

    def pauseProducing(self) -> None:
        pass                                    # acknowledgements stop by _buffer_full

    def resumeProducing(self) -> None:
        self.relay.link_drained(self.link)

    def stopProducing(self) -> None:
        pass


def _owed(transport: Any) -> int:
    """Bytes a transport still has to send (TLS: on the TCP transport below)."""
    below = getattr(transport, "transport", None)
    total = 0
    for t in (transport, below):
        if t is not None:
            total += getattr(t, "_tempDataLen", 0) + len(getattr(t, "dataBuffer", b"")) \
                - getattr(t, "offset", 0)
    return total


def _buffer_full(transport: Any) -> bool:
    """Whether a target connection holds more unsent request bytes than it wants."""
    if transport is None:
        return True
    return _owed(transport) > getattr(transport, "bufferSize", 65536)

