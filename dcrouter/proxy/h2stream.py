"""One HTTP/2 stream's exchange with an HTTP/1.1 target (see :mod:`dcrouter.proxy.h2frontend`).

* :func:`request_head` turns a stream's header list into an HTTP/1.1
  request head: ``:method``/``:path`` make the request line, ``:authority``
  (or ``Host``) the ``Host``, ``cookie`` crumbs are joined (RFC 9113
  8.2.3), forwarded headers are replaced when the route adds them, and a
  body without ``content-length`` goes out ``chunked``.  Anything HTTP/1.1
  could read differently is refused (400): names that are not tokens,
  ``:authority`` and ``Host`` naming different hosts, ``CONNECT``, a
  ``:path`` that is not origin-form.
* :class:`TargetLink` is one connection to a target: it writes requests,
  reads responses with llhttp (``httptools``, strict) and hands headers,
  body pieces and ends to the :class:`Exchange` it serves.  After a complete
  response on a kept-alive connection it goes back to the relay's idle pool
  for the next stream.
* :class:`Exchange` is the stream's side: response headers with
  connection-specific fields removed (RFC 9113 8.2.2), body bytes queued
  while the client's flow-control window is shut (the target is paused
  meanwhile, so memory stays bounded by one window and a read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import httptools
from twisted.python.failure import Failure

from dcrouter.proxy.http import _TOKENS, RequestHead, split_authority
from dcrouter.proxy.httpio import write_now

if TYPE_CHECKING:  # pragma: no cover
    from dcrouter.proxy.h2frontend import H2Relay

_TOKEN_BYTES = bytes(sorted(_TOKENS))
#: Response fields HTTP/2 has no place for (RFC 9113 8.2.2).
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                        b"upgrade", b"te", b"trailer"))


class BadRequest(ValueError):
    """A stream's headers cannot be sent on as an HTTP/1.1 request (answered 400)."""


def request_head(headers: list[tuple[bytes, bytes]], ended: bool,
                 forwarded: Optional[tuple[str, str]]) -> tuple[RequestHead, bytes, bool]:
    """(head for routing checks, HTTP/1.1 head bytes, body is chunked) for a stream."""
    method = path = authority = b""
    host = b""
    lines: list[bytes] = []
    cookies: list[bytes] = []
    xff: list[bytes] = []
    has_length = False
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name.translate(None, _TOKEN_BYTES):
            raise BadRequest("header name is not a token")
        if name == b"host":
            host = value
        elif name == b"cookie":
            cookies.append(value)
        elif name == b"content-length":
            has_length = True
            lines.append(b"content-length: " + value)
        elif forwarded is not None and name in (b"x-forwarded-for", b"x-forwarded-proto"):
            if name == b"x-forwarded-for":
                xff.append(value)
        else:
            lines.append(name + b": " + value)
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not relayed over HTTP/2")
    if not method or method.translate(None, _TOKEN_BYTES):
        raise BadRequest("bad :method")
    if not (path.startswith(b"/") or (path == b"*" and method == b"OPTIONS")):
        raise BadRequest(":path is not origin-form")
    authority = authority or host
    if not authority:
        raise BadRequest("no :authority or Host")
    try:
        hostname, port = split_authority(authority.decode("latin-1"))
        if host and split_authority(host.decode("latin-1")) != (hostname, port):
            raise BadRequest(":authority and Host differ")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if b"@" in authority or not hostname:
        raise BadRequest("invalid :authority")
    if cookies:
        lines.append(b"cookie: " + b"; ".join(cookies))
    if forwarded is not None:
        client_ip, proto = forwarded
        lines.append(b"X-Forwarded-For: " + b", ".join(xff + [client_ip.encode("latin-1")]))
        lines.append(b"X-Forwarded-Proto: " + proto.encode("latin-1"))
    chunked = not ended and not has_length
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    raw = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, path, authority) \
        + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    head = RequestHead(method.decode("latin-1"), path.decode("latin-1"), "HTTP/2",
                       [("Host", authority.decode("latin-1"))])
    return head, raw, chunked


class TargetLink:
    """One connection to a target, serving one :class:`Exchange` at a time."""

    def __init__(self, relay: "H2Relay") -> None:
        self.relay = relay
        self.stats = relay.stats
        self.transport: Any = None
        self.exchange: Optional[Exchange] = None
        self.pending: list[bytes] = []
        self.closed = False
        self.reusable = True
        self.paused = False
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._until_close = False
        self._parser = httptools.HttpResponseParser(self)
        self._parser.set_dangerous_leniencies(
            lenient_headers=False, lenient_chunked_length=False, lenient_keep_alive=False,
            lenient_transfer_encoding=False, lenient_version=False,
            lenient_data_after_close=False, lenient_optional_lf_after_cr=False,
            lenient_optional_cr_before_lf=False, lenient_optional_crlf_after_chunk=False,
            lenient_spaces_after_chunk_size=False)

    # -- writing ---------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Send request bytes (queued until connected)."""
        self.stats.bytes_in += len(data)
        if self.transport is None:
            self.pending.append(data)
        else:
            write_now(self.transport, data)

    def connected(self, transport: Any) -> None:
        """The connection is made: send what is queued."""
        self.transport = transport
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            write_now(transport, data)
        if self.paused:
            transport.pauseProducing()

    def pause(self) -> None:
        """Stop reading responses (the client cannot take more now)."""
        if not self.paused:
            self.paused = True
            if self.transport is not None:
                self.transport.pauseProducing()

    def resume(self) -> None:
        """Read responses again."""
        if self.paused:
            self.paused = False
            if self.transport is not None and not self.closed:
                self.transport.resumeProducing()

    def close(self) -> None:
        """Close the connection (its exchange is over or was cancelled)."""
        self.reusable = False
        self.exchange = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.loseConnection()
            self.relay.link_closed(self)

    # -- BackendSink -----------------------------------------------------------
    def backend_data(self, data: bytes) -> None:
        """Response bytes from the target."""
        if self.exchange is None:
            self.close()            # bytes nobody asked for
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._failed(f"unparseable response: {e}")

    def backend_read_closed(self) -> None:
        """The target sent EOF: the end of a close-delimited body, else a cut response."""
        self.backend_lost()

    def backend_lost(self, reason: Optional[Failure] = None) -> None:
        """The connection is gone."""
        exchange = self.exchange
        was_closed = self.closed
        self.closed = True
        self.reusable = False
        self.exchange = None
        if exchange is not None:
            if self._until_close and exchange.headers_sent:
                exchange.response_end()
            else:
                exchange.target_failed("the target closed before its response ended")
        if not was_closed:
            self.relay.link_closed(self)

    def _failed(self, reason: str) -> None:
        exchange = self.exchange
        self.stats.error("bad_response")
        self.close()
        if exchange is not None:
            exchange.target_failed(reason)

    # -- llhttp callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        """llhttp: a response starts."""
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        """llhttp: one header field."""
        self._headers.append((name.lower(), value.strip()))

    def on_headers_complete(self) -> None:
        """llhttp: the head is complete; interim (1xx) heads are skipped, 101 refused."""
        status = self._parser.get_status_code()
        self._status = status
        if 100 <= status < 200:
            if status == 101:
                raise ValueError("101 on an HTTP/2 stream")
            return                              # interim: the final response follows
        exchange = self.exchange
        assert exchange is not None
        names = {name for name, _ in self._headers}
        self._until_close = (b"content-length" not in names
                             and b"transfer-encoding" not in names
                             and status not in (204, 304))
        if self._until_close or not self._parser.should_keep_alive():
            self.reusable = False
        exchange.response_headers(status, self._headers)
        if exchange.method == "HEAD":
            self.reusable = False               # llhttp would wait for the announced body
            exchange.response_end()
            self.exchange = None
            self.close()

    def on_body(self, body: bytes) -> None:
        """llhttp: decoded body bytes (chunk framing removed)."""
        if self.exchange is not None:
            self.exchange.response_data(body)

    def on_message_complete(self) -> None:
        """llhttp: the response ended; the connection goes back to the pool when it may."""
        if 100 <= self._status < 200:
            return
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.response_end()
        if self.reusable and not self.closed:
            self.relay.link_idle(self)
        else:
            self.close()


class Exchange:
    """One stream: its request to a target and the response back to the client."""

    def __init__(self, relay: "H2Relay", stream_id: int, method: str, chunked: bool) -> None:
        self.relay = relay
        self.stream_id = stream_id
        self.method = method
        self.chunked = chunked
        self.link: Optional[TargetLink] = None
        self.headers_sent = False
        self.request_ended = False
        self.done = False
        self.out: list[bytes] = []              # response bytes waiting for the window
        self.out_size = 0
        self.out_ended = False
        self.unacked = 0                        # request body bytes not yet acknowledged

    # -- request side ----------------------------------------------------------------
    def request_data(self, data: bytes) -> None:
        """Body bytes of the request (DATA frames)."""
        if self.link is None or self.done:
            return
        if self.chunked:
            if data:
                self.link.write(b"%x\r\n" % len(data) + data + b"\r\n")
        else:
            self.link.write(data)

    def request_end(self, trailers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
        """END_STREAM from the client (with trailers when it sent some)."""
        if self.request_ended:
            return
        self.request_ended = True
        if self.link is None or self.done or not self.chunked:
            return
        tail = b"".join(n + b": " + v + b"\r\n" for n, v in trailers or ()
                        if n[:1] != b":" and not n.translate(None, _TOKEN_BYTES))
        self.link.write(b"0\r\n" + tail + b"\r\n")

    # -- response side ----------------------------------------------------------------
    def response_headers(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The target's final response head, sent on without hop-by-hop fields."""
        if self.done:
            return
        named = {v.strip().lower() for n, v in headers if n == b"connection"
                 for v in v.split(b",")}
        out = [(b":status", b"%d" % status)]
        out.extend((n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named
                   and not n.translate(None, _TOKEN_BYTES))
        self.headers_sent = True
        self.relay.send_headers(self, out)

    def response_data(self, data: bytes) -> None:
        """Response body bytes, queued for the client's window."""
        if self.done:
            return
        self.out.append(data)
        self.out_size += len(data)
        self.relay.flush(self)

    def response_end(self) -> None:
        """The response is complete: END_STREAM once the queued bytes are sent."""
        if self.done:
            return
        self.out_ended = True
        self.relay.flush(self)

    def target_failed(self, reason: str) -> None:
        """The target connection failed or sent something unusable."""
        if self.done:
            return
        self.relay.exchange_failed(self, reason)
