"""HTTP/1.1 message framing for the proxy: where each request and response ends.

The proxy relays HTTP request by request (see :mod:`dcrouter.proxy.httprelay`),
so it must know where each message ends without buffering it:

* :class:`RequestFramer` cuts the client's byte stream into request heads
  (parsed, so they can be routed and re-rendered), raw body pieces and
  end-of-request marks.  Bodies are framed by ``Transfer-Encoding: chunked``
  or ``Content-Length``, else a request has none.  Shapes used for request
  smuggling are refused with :class:`FramingError`: both ``Content-Length``
  and ``Transfer-Encoding``, differing ``Content-Length`` values, a transfer
  coding list whose final coding is not ``chunked``, an invalid chunk size,
  bare CR or LF in a head, more than one ``Host``.
* :class:`ResponseFramer` follows the backend's responses, paired with the
  methods of the requests sent (a FIFO, so pipelining works): no body for
  ``HEAD``, 1xx, 204 and 304; chunked; ``Content-Length``; else until the
  backend closes.  ``101 Switching Protocols`` (and a 2xx to ``CONNECT``)
  ends HTTP on the connection: everything after it is tunnel bytes.

Body bytes are passed on verbatim (chunk framing, extensions and trailers
included) as they arrive; only heads are collected, up to
:data:`~dcrouter.proxy.http.MAX_HEAD`.
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Union

from dcrouter.proxy.http import MAX_HEAD, RequestHead, parse_head, parse_headers

HEAD = "head"          # a request head (RequestHead)
BODY = "body"          # raw body bytes
END = "end"            # the current message is complete
DATA = "data"          # raw response bytes to relay
COMPLETE = "complete"  # a final response ended (raw b"close" when it ends the connection)
UPGRADE = "upgrade"    # 101 / CONNECT: from now on a byte tunnel

MAX_LINE = 4096        # chunk-size and trailer lines
_HEX = set(b"0123456789abcdefABCDEF")


class FramingError(ValueError):
    """The byte stream is not HTTP/1.1 the proxy can frame safely."""


def _values(headers: list[tuple[str, str]], name: str) -> list[str]:
    """Every comma-separated element of the headers called ``name``."""
    name = name.lower()
    return [part.strip() for key, value in headers if key.lower() == name
            for part in value.split(",") if part.strip()]


def _has(headers: list[tuple[str, str]], name: str) -> bool:
    name = name.lower()
    return any(key.lower() == name for key, _ in headers)


def _content_length(headers: list[tuple[str, str]]) -> int:
    values = set(_values(headers, "content-length"))
    if len(values) != 1:
        raise FramingError("differing or empty Content-Length values")
    value = values.pop()
    if not value.isdigit() or not value.isascii() or len(value) > 18:
        raise FramingError("invalid Content-Length")
    return int(value)


def _chunked_final(headers: list[tuple[str, str]]) -> bool:
    """True when the codings end with ``chunked`` (exactly once); False otherwise."""
    codings = [c.lower() for c in _values(headers, "transfer-encoding")]
    return bool(codings) and codings[-1] == "chunked" and codings.count("chunked") == 1


class BodyFramer:
    """Frames one body: ``length`` bytes, ``chunked``, or ``close`` (until EOF)."""

    def __init__(self, kind: str, length: int = 0) -> None:
        self.kind = kind
        self.remaining = length
        self.state = "size" if kind == "chunked" else "data"
        self.trailer_size = 0

    def take(self, buf: bytes) -> tuple[bytes, bool, bytes]:
        """Consume from ``buf``: (raw bytes of this body, body complete, unconsumed rest)."""
        if self.kind == "close":
            return buf, False, b""
        if self.kind == "length":
            n = min(self.remaining, len(buf))
            self.remaining -= n
            return buf[:n], self.remaining == 0, buf[n:]
        pos = 0
        while pos < len(buf):
            if self.state == "data":
                n = min(self.remaining, len(buf) - pos)
                pos += n
                self.remaining -= n
                if self.remaining == 0:
                    self.state = "crlf"
                continue
            if self.state == "crlf":
                if len(buf) - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise FramingError("chunk not followed by CRLF")
                pos += 2
                self.state = "size"
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if len(buf) - pos > MAX_LINE or b"\n" in buf[pos:]:
                    raise FramingError("bad chunk line")
                break
            line = buf[pos:end]
            pos = end + 2
            if b"\n" in line or b"\r" in line:
                raise FramingError("bare CR or LF in chunk line")
            if self.state == "size":
                size = line.split(b";", 1)[0]
                if not size or len(size) > 15 or not set(size) <= _HEX:
                    raise FramingError("invalid chunk size")
                self.remaining = int(size, 16)
                self.state = "data" if self.remaining else "trailer"
            else:                                   # trailer section
                if not line:
                    return buf[:pos], True, buf[pos:]
                self.trailer_size += len(line) + 2
                if b":" not in line or self.trailer_size > MAX_HEAD:
                    raise FramingError("bad trailer")
        return buf[:pos], False, buf[pos:]


def _check_head_bytes(raw: bytes) -> None:
    if raw.count(b"\n") != raw.count(b"\r\n") or raw.count(b"\r") != raw.count(b"\r\n") \
            or b"\x00" in raw:
        raise FramingError("bare CR, LF or NUL in head")


def wants_close(version: str, headers: list[tuple[str, str]]) -> bool:
    """Whether a message ends its connection (``Connection: close``, or HTTP/1.0 by default)."""
    tokens = [t.lower() for t in _values(headers, "connection")]
    if "close" in tokens:
        return True
    return version == "HTTP/1.0" and "keep-alive" not in tokens


def request_body(head: RequestHead) -> Optional[BodyFramer]:
    """How the body of ``head`` is framed (None: no body); FramingError for smuggling shapes."""
    if sum(1 for key, _ in head.headers if key.lower() == "host") > 1:
        raise FramingError("more than one Host")    # RFC 9112 3.2: routing would be ambiguous
    has_te = _has(head.headers, "transfer-encoding")
    has_cl = _has(head.headers, "content-length")
    if has_te and has_cl:
        raise FramingError("both Content-Length and Transfer-Encoding")
    if has_te:
        if head.version == "HTTP/1.0":
            raise FramingError("Transfer-Encoding in HTTP/1.0")
        if not _chunked_final(head.headers):
            raise FramingError("Transfer-Encoding without final chunked")
        return BodyFramer("chunked")
    if has_cl:
        length = _content_length(head.headers)
        return BodyFramer("length", length) if length else None
    return None


class RequestFramer:
    """Cuts a client's bytes into request heads, body pieces and ends (pulled by
    :meth:`next_event`)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.body: Optional[BodyFramer] = None
        self.in_message = False
        self._scanned = 0         # head bytes already searched for the blank line

    def feed(self, data: bytes) -> None:
        """Add bytes from the client."""
        self.buffer += data

    def take_buffer(self) -> bytes:
        """Everything not yet framed (for a switch to tunnel mode)."""
        data, self.buffer, self._scanned = self.buffer, b"", 0
        return data

    @property
    def idle(self) -> bool:
        """Between requests with nothing buffered."""
        return not self.in_message and not self.buffer

    def next_event(self) -> Optional[tuple[str, Union[RequestHead, bytes, None]]]:
        """The next (HEAD, head) / (BODY, bytes) / (END, None), or None for more bytes."""
        if not self.in_message:
            while self.buffer.startswith(b"\r\n"):          # RFC 9112 2.2: stray CRLF
                self.buffer = self.buffer[2:]
                self._scanned = 0
            end = self.buffer.find(b"\r\n\r\n", self._scanned)
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise FramingError("request head too large")
                self._scanned = max(0, len(self.buffer) - 3)   # a head sent byte by byte
                return None
            if end > MAX_HEAD:
                raise FramingError("request head too large")
            raw = self.buffer[:end]
            _check_head_bytes(raw)
            try:
                head = parse_head(raw)
            except ValueError as e:
                raise FramingError(str(e)) from None
            self.body = request_body(head)
            self.buffer = self.buffer[end + 4:]
            self._scanned = 0
            self.in_message = True
            return HEAD, head
        if self.body is None:
            self.in_message = False
            return END, None
        if not self.buffer:
            return None
        raw, done, self.buffer = self.body.take(self.buffer)
        if done:
            self.body = None
        if raw:
            return BODY, raw
        return None if not done else self.next_event()


class ResponseFramer:
    """Follows a backend's responses to the requests whose methods are in ``methods``."""

    def __init__(self, methods: "deque[str]") -> None:
        self.methods = methods
        self.buffer = b""
        self.body: Optional[BodyFramer] = None
        self.tunnel = False
        self.error = ""
        self.close_after = False      # the last final response announced the connection's end

    @property
    def close_delimited(self) -> bool:
        """The response being relayed ends when the backend closes."""
        return self.body is not None and self.body.kind == "close"

    @property
    def idle(self) -> bool:
        """No response is in progress and none is awaited."""
        return self.body is None and not self.buffer and not self.methods

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """Events for ``data``: (DATA, raw) to relay, (COMPLETE, b""), (UPGRADE, b"").

        After a framing problem the events up to it are returned and
        :attr:`error` says what went wrong.
        """
        events: list[tuple[str, bytes]] = []
        self.buffer += data
        try:
            self._frame(events)
        except FramingError as e:
            self.error = str(e) or "bad response"
        return events

    def _frame(self, events: list[tuple[str, bytes]]) -> None:
        while self.buffer:
            if self.tunnel:
                events.append((DATA, self.buffer))
                self.buffer = b""
                return
            if self.body is not None:
                raw, done, self.buffer = self.body.take(self.buffer)
                if raw:
                    events.append((DATA, raw))
                if not done:
                    return
                self.body = None
                self.methods.popleft()
                events.append((COMPLETE, b"close" if self.close_after else b""))
                continue
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise FramingError("response head too large")
                if not self.methods:
                    raise FramingError("response without a request")
                return
            if not self.methods:
                raise FramingError("response without a request")
            raw = self.buffer[:end + 4]
            self.buffer = self.buffer[end + 4:]
            version, status, headers = parse_response_head(raw[:-4])
            events.append((DATA, raw))
            method = self.methods[0]
            if status == 101 or (method == "CONNECT" and 200 <= status < 300):
                self.methods.popleft()
                self.tunnel = True
                events.append((UPGRADE, b""))
                continue
            if 100 <= status < 200:
                continue                                # interim: the final one follows
            body = _response_body(method, status, headers)
            self.close_after = wants_close(version, headers)
            if body is None:
                self.methods.popleft()
                events.append((COMPLETE, b"close" if self.close_after else b""))
            else:
                self.body = body

    def backend_closed(self) -> bool:
        """The backend closed: True when that ends the stream cleanly (no cut message)."""
        if self.close_delimited:
            self.body = None
            self.methods.popleft()
            return True
        return self.idle


def parse_response_head(raw: bytes) -> tuple[str, int, list[tuple[str, str]]]:
    """Version, status code and headers of a response head (without the blank line)."""
    _check_head_bytes(raw)
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or len(parts[1]) != 3 \
            or not parts[1].isdigit() or not parts[1].isascii():
        raise FramingError("bad status line")
    try:
        headers = parse_headers(lines[1:])
    except ValueError as e:
        raise FramingError(str(e)) from None
    return parts[0], int(parts[1]), headers


def _response_body(method: str, status: int,
                   headers: list[tuple[str, str]]) -> Optional[BodyFramer]:
    if method == "HEAD" or status in (204, 304):
        return None
    has_te = _has(headers, "transfer-encoding")
    if has_te and _has(headers, "content-length"):
        raise FramingError("response with both Content-Length and Transfer-Encoding")
    if has_te:
        return BodyFramer("chunked") if _chunked_final(headers) else BodyFramer("close")
    if _has(headers, "content-length"):
        length = _content_length(headers)
        return BodyFramer("length", length) if length else None
    return BodyFramer("close")
