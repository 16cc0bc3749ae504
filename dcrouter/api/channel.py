"""HTTP/1.1 limits of the API listener, enforced while the request arrives.

``twisted.web`` spools a request body to a temporary file before any
resource runs, and lets a client take as long as it likes over a head (the
idle timeout restarts with every byte).  :class:`LimitedChannel` checks each
request as it is read, before authentication or any handler:

* the head (request line and header lines) must arrive within
  ``api.header_timeout`` seconds of its first byte - else ``408`` (HAProxy's
  ``timeout http-request``, nginx's ``client_header_timeout``);
* the head is at most :data:`MAX_HEAD_BYTES` bytes with at most
  :data:`MAX_HEADERS` header lines - else ``431`` (``414`` for a request line
  that alone is too long);
* a declared ``Content-Length`` over ``api.max_body_size`` is answered
  ``413`` as soon as the headers are complete (without ``100 Continue``); a
  chunked body is cut with ``413`` when it passes the limit (nginx's
  ``client_max_body_size``);
* the body must arrive within ``api.body_timeout`` seconds of the head's
  end - else ``408``.

Accepted bodies are kept in memory (they are bounded by the limit), never in
a temporary file.  A refused request gets a JSON error in the API's shape and
``Connection: close``; then the channel stops parsing, half-closes, and reads
and discards what the client still sends for at most :data:`LINGER_SECONDS`
(nginx's lingering close), so the client reads the answer instead of a reset.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Optional

from twisted.internet.error import ConnectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web import http, server

from dcrouter.api import errors
from dcrouter.logsetup import get_logger

log = get_logger("api")

#: Request line plus header lines, in bytes (HAProxy's default buffer is 16 KiB).
MAX_HEAD_BYTES = 16 * 1024
#: Header lines per request (HAProxy's ``tune.http.maxhdr`` is 101).
MAX_HEADERS = 100
#: Seconds a refused connection is still read (and discarded) before it is closed.
LINGER_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one API request may send (from ``[api]``)."""

    max_body_size: int = 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_headers: int = MAX_HEADERS
    max_head_bytes: int = MAX_HEAD_BYTES


class LimitedRequest(server.Request):
    """A request whose body goes to memory, counted against the channel's limit."""

    def gotLength(self, length: Optional[int]) -> None:
        """Bodies are bounded by ``max_body_size``: keep them in memory."""
        self.content = io.BytesIO()  # type: ignore[assignment]

    def handleContentChunk(self, data: bytes) -> None:
        """Store body bytes unless the channel refused the request meanwhile."""
        channel = self.channel
        if isinstance(channel, LimitedChannel) and not channel.body_bytes_allowed(len(data)):
            return
        super().handleContentChunk(data)


class LimitedChannel(http.HTTPChannel):
    """``HTTPChannel`` with the limits of :class:`RequestLimits` (see the module docstring)."""

    # Twisted's own limits answer a bare 400; ours (checked first) answer 431.
    maxHeaders = 10 * MAX_HEADERS
    totalHeadersSize = 10 * MAX_HEAD_BYTES

    def __init__(self, limits: RequestLimits) -> None:
        super().__init__()
        self.limits = limits
        self.MAX_LENGTH = limits.max_head_bytes
        self.refused = False
        self._state = "idle"          # idle -> head -> body -> handling -> idle
        self._head_bytes = 0
        self._header_count = 0
        self._body_bytes = 0
        self._timer: Any = None
        self._linger: Any = None

    # -- request stages ----------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return                      # lingering: read and discard
        if self._state == "idle" and self.line_mode:
            self._start_head()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        if self._state == "idle":
            self._start_head()
        if self._state == "head":
            self._head_bytes += len(line) + 2
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse_head_too_large(first_line=self._header_count == 0 and
                                            self._head_bytes == len(line) + 2)
                return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """One line longer than the whole head may be: 414 for the request line, else 431."""
        self._refuse_head_too_large(first_line=self._state in ("idle", "head")
                                    and self._head_bytes == 0)

    def headerReceived(self, line: bytes) -> bool:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self.refuse(431, "request_header_fields_too_large",
                        f"more than {self.limits.max_headers} header lines")
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        """The head is complete: check the declared length, then time the body."""
        self._cancel_timer()
        if self.refused:
            return
        if not self.check_declared_length(self.length):
            return
        self._state = "body"
        self._body_bytes = 0
        if self.length != 0:
            self._timer = self.callLater(self.limits.body_timeout, self._body_timed_out)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        """The body is complete: the request goes to the resource."""
        self._cancel_timer()
        if self.refused:
            return
        self._state = "handling"
        self._head_bytes = self._header_count = 0
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self.persistent:
            self._state = "idle"
        super().requestDone(request)
        # pipelined bytes replayed from the buffer may have begun the next head
        if self._state == "idle" and self.line_mode and self._buffer and not self.refused:
            self._start_head()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._cancel_timer()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        super().connectionLost(reason)

    # -- the checks ----------------------------------------------------------------
    def check_declared_length(self, length: Optional[int]) -> bool:
        """A ``Content-Length`` over the limit: 413 now, before the body (False)."""
        if length is not None and length > self.limits.max_body_size:
            self.refuse(413, "payload_too_large",
                        f"the body ({length} bytes) exceeds api.max_body_size "
                        f"({self.limits.max_body_size} bytes)")
            return False
        return True

    def body_bytes_allowed(self, count: int) -> bool:
        """Count body bytes as they are decoded; past the limit: 413 (False)."""
        if self.refused:
            return False
        self._body_bytes += count
        if self._body_bytes > self.limits.max_body_size:
            self.refuse(413, "payload_too_large",
                        f"the body exceeds api.max_body_size ({self.limits.max_body_size} "
                        f"bytes)")
            return False
        return True

    def _refuse_head_too_large(self, first_line: bool) -> None:
        if first_line:
            self.refuse(414, "uri_too_long",
                        f"the request line exceeds {self.limits.max_head_bytes} bytes")
        else:
            self.refuse(431, "request_header_fields_too_large",
                        f"the request head exceeds {self.limits.max_head_bytes} bytes")

    # -- timers ----------------------------------------------------------------------
    def _start_head(self) -> None:
        self._state = "head"
        self._head_bytes = self._header_count = 0
        self._cancel_timer()
        self._timer = self.callLater(self.limits.header_timeout, self._head_timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        self.refuse(408, "request_timeout",
                    f"the request head did not arrive within {self.limits.header_timeout:g}s")

    def _body_timed_out(self) -> None:
        self._timer = None
        self.refuse(408, "request_timeout",
                    f"the request body did not arrive within {self.limits.body_timeout:g}s")

    # -- refusing --------------------------------------------------------------------
    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` with the API's JSON error, stop parsing, close after a linger."""
        if self.refused or self.transport is None:
            return
        self.refused = True
        self._cancel_timer()
        self.setTimeout(None)
        peer = getattr(self.transport.getPeer(), "host", "unknown")
        log.info("API request from {client_ip} refused: {status} {message}", client_ip=peer,
                 status=status, message=message)
        body = errors.ApiError(status, code, message).to_bytes()
        reason = http.RESPONSES.get(status, b"Error")
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n"
                             b"X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n"
                             b"\r\n" % (status, reason, len(body)) + body)
        self._linger = self.callLater(LINGER_SECONDS, self._end_linger)
        self._close_write()

    def _close_write(self) -> None:
        """Half-close (TCP) so the answer is read before our close; TLS sends close_notify."""
        transport: Any = self.transport
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None and not isinstance(transport, TLSMemoryBIOProtocol):
            try:
                half_close()
                return
            except (AttributeError, NotImplementedError):
                pass
        transport.loseConnection()

    def _end_linger(self) -> None:
        self._linger = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class LimitedSite(server.Site):
    """A ``Site`` whose connections are :class:`LimitedChannel` with ``limits``."""

    requestFactory = LimitedRequest

    def __init__(self, resource: Any, limits: RequestLimits, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.limits = limits

    def protocol(self) -> LimitedChannel:  # type: ignore[override]
        """One channel per connection (HTTP/1.1; the API does not speak HTTP/2)."""
        return LimitedChannel(self.limits)
