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
from typing import Any, Optional, Union

import httptools

from dcrouter.proxy.http import _TOKENS, MAX_HEAD, RequestHead, normalize_request_target

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


class _HeadCollector:
    """llhttp's callbacks for one request head (url and header pairs, as bytes)."""

    __slots__ = ("url", "headers", "complete", "messages")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False           # on_headers_complete was called
        self.messages = 0               # on_message_complete calls

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True

    def on_message_complete(self) -> None:
        self.messages += 1


def _new_parser(sink: _HeadCollector) -> Any:
    """A strict llhttp request parser: every leniency off (they are off by default; set
    explicitly so a library default can never turn one on)."""
    parser = httptools.HttpRequestParser(sink)
    parser.set_dangerous_leniencies(
        lenient_headers=False, lenient_chunked_length=False, lenient_keep_alive=False,
        lenient_transfer_encoding=False, lenient_version=False, lenient_data_after_close=False,
        lenient_optional_lf_after_cr=False, lenient_optional_cr_before_lf=False,
        lenient_optional_crlf_after_chunk=False, lenient_spaces_after_chunk_size=False)
    return parser


_SPECIAL = frozenset((b"host", b"transfer-encoding", b"content-length", b"connection",
                      b"upgrade", b"x-forwarded-for", b"x-forwarded-proto"))


def _merge_content_lengths(raw: bytes) -> bytes:
    """The head with one ``Content-Length`` line when all of them carry the same value
    (RFC 9110 8.6 allows taking it, HAProxy forwards one); FramingError otherwise."""
    lines = raw.split(b"\r\n")
    kept: list[bytes] = []
    values = set()
    for line in lines:
        name, sep, value = line.partition(b":")
        if sep and name.lower() == b"content-length":
            values.add(value.strip())
            if len(values) > 1:
                raise FramingError("differing Content-Length values")
            if any(k.partition(b":")[0].lower() == b"content-length" for k in kept):
                continue
        kept.append(line)
    return b"\r\n".join(kept)


class RequestFramer:
    """Cuts a client's bytes into request heads, body pieces and ends (pulled by
    :meth:`next_event`).

    Two parsers read every byte of a message and must agree where it ends:
    llhttp (``httptools``, strict) parses and checks the head and the body
    framing, and this module's own framing cuts the raw bytes (so bodies and
    chunk framing go on verbatim, without a copy when a read is all body).
    On top of llhttp, refused here: a request line other than ``METHOD SP
    target SP HTTP/1.x``, more than one ``Host``, ``Transfer-Encoding`` in
    HTTP/1.0, chunk-size lines over 15 hex digits or :data:`MAX_LINE`, and
    any disagreement between the two parsers.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.body: Optional[BodyFramer] = None
        self.in_message = False
        self._scanned = 0         # head bytes already searched for the blank line
        self._sink = _HeadCollector()
        self._parser: Any = None
        self._drop_parser = False  # a new parser for the next request

    def feed(self, data: bytes) -> None:
        """Add bytes from the client."""
        self.buffer += data

    def take_buffer(self) -> bytes:
        """Everything not yet framed (for a switch to tunnel mode)."""
        data, self.buffer, self._scanned = self.buffer, b"", 0
        self._parser = None
        return data

    @property
    def idle(self) -> bool:
        """Between requests with nothing buffered."""
        return not self.in_message and not self.buffer

    def next_event(self) -> Optional[tuple[str, Union[RequestHead, bytes, None]]]:
        """The next (HEAD, head) / (BODY, bytes) / (END, None), or None for more bytes."""
        if not self.in_message:
            return self._next_head()
        if self.body is None:
            return self._end()
        if not self.buffer:
            return None
        raw, done, self.buffer = self.body.take(self.buffer)
        if raw and self._parser is not None:
            self._llhttp(raw)
        if done:
            self.body = None
            return (BODY, raw) if raw else self._end()
        if self._sink.messages:
            raise FramingError("llhttp ends the request before its framing does")
        return (BODY, raw) if raw else None

    def _end(self) -> tuple[str, None]:
        if self._sink.messages != 1:
            raise FramingError("llhttp does not end the request where its framing does")
        self.in_message = False
        self._sink.messages = 0
        if self._drop_parser:
            self._parser = None            # llhttp refuses bytes after a closing request
        return END, None

    def _llhttp(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._parser = None            # bytes after it are not HTTP for llhttp
        except httptools.HttpParserError as e:
            raise FramingError(str(e) or "invalid request") from None

    def _next_head(self) -> Optional[tuple[str, Union[RequestHead, bytes, None]]]:
        buffer = self.buffer
        if buffer[:2] == b"\r\n":                       # RFC 9112 2.2: stray CRLF
            while buffer.startswith(b"\r\n"):
                buffer = buffer[2:]
            self.buffer = buffer
            self._scanned = 0
        end = buffer.find(b"\r\n\r\n", self._scanned)
        if end < 0:
            if len(buffer) > MAX_HEAD:
                raise FramingError("request head too large")
            self._scanned = max(0, len(buffer) - 3)    # a head sent byte by byte
            return None
        if end > MAX_HEAD:
            raise FramingError("request head too large")
        raw = buffer[:end]              # bare CR, LF and NUL: refused by llhttp
        line_end = raw.find(b"\r\n")
        line = raw if line_end < 0 else raw[:line_end]
        if line.count(b" ") != 2 or not (line.endswith(b" HTTP/1.1")
                                         or line.endswith(b" HTTP/1.0")):
            raise FramingError("bad request line")
        sink = self._sink
        sink.url = b""
        sink.headers = []
        sink.complete = False
        sink.messages = 0
        if self._parser is None:
            self._parser = _new_parser(sink)
        try:
            self._llhttp(buffer[:end + 4])
        except FramingError as e:
            if str(e) != "Duplicate Content-Length":
                raise
            raw = _merge_content_lengths(raw)        # identical values: kept once
            sink.url, sink.headers = b"", []
            self._parser = _new_parser(sink)
            self._llhttp(raw + b"\r\n\r\n")
        if not sink.complete:
            raise FramingError("llhttp did not read a whole head")
        head = self._make_head(raw, line)               # sets self.body
        if self.body is not None and self._parser is None:
            raise FramingError("a body after an upgrade request")
        if self.body is None and sink.messages != 1:
            raise FramingError("llhttp expects a body the head does not announce")
        self._drop_parser = self._parser is not None and not self._parser.should_keep_alive()
        self.buffer = buffer[end + 4:]
        self._scanned = 0
        self.in_message = True
        return HEAD, head

    def _make_head(self, raw: bytes, line: bytes) -> RequestHead:
        sink = self._sink
        method, _, rest = line.decode("latin-1").partition(" ")
        target, _, version = rest.partition(" ")
        if target.encode("latin-1") != sink.url:
            raise FramingError("llhttp read another request target")
        headers = []
        forwarded = upgrade = False
        hosts = 0
        te: list[str] = []
        cl: list[str] = []
        connection: list[str] = []
        for name, value in sink.headers:
            text = value.decode("latin-1").strip()
            headers.append((name.decode("latin-1"), text))
            lower = name.lower()
            if lower in _SPECIAL:
                if lower == b"host":
                    hosts += 1
                elif lower == b"transfer-encoding":
                    te.append(text)
                elif lower == b"content-length":
                    cl.append(text)
                elif lower == b"connection":
                    connection.append(text)
                elif lower == b"upgrade":
                    upgrade = True
                else:
                    forwarded = True
        if hosts > 1:
            raise FramingError("more than one Host")    # RFC 9112 3.2: routing would be ambiguous
        if te:
            if cl:
                raise FramingError("both Content-Length and Transfer-Encoding")
            if version == "HTTP/1.0":
                raise FramingError("Transfer-Encoding in HTTP/1.0")
            if not _chunked_final([("transfer-encoding", v) for v in te]):
                raise FramingError("Transfer-Encoding without final chunked")
            self.body = BodyFramer("chunked")
        elif cl:
            length = _content_length([("content-length", v) for v in cl])
            self.body = BodyFramer("length", length) if length else None
        else:
            self.body = None
        head = RequestHead(method, target, version, headers, raw, forwarded,
                           keep_alive=not wants_close(version, [("connection", v)
                                                                for v in connection]),
                           upgrade=upgrade)
        try:
            normalize_request_target(head)
        except ValueError as e:
            raise FramingError(str(e)) from None
        return head


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


_TOKEN_BYTES = bytes(sorted(_TOKENS))
_FRAMING = {b"content-length": "content-length", b"transfer-encoding": "transfer-encoding",
            b"connection": "connection"}


def parse_response_head(raw: bytes) -> tuple[str, int, list[tuple[str, str]]]:
    """Version, status code and the framing headers (``Content-Length``,
    ``Transfer-Encoding``, ``Connection``) of a response head (without the blank line);
    every header line is checked (a token name, a colon, no folding)."""
    _check_head_bytes(raw)
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 \
            or not parts[1].isdigit():
        raise FramingError("bad status line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name.translate(None, _TOKEN_BYTES):
            raise FramingError("obsolete header folding" if line[:1] in (b" ", b"\t")
                               else "bad header line")
        known = _FRAMING.get(name.lower())
        if known is not None:
            headers.append((known, value.strip().decode("latin-1")))
    return parts[0].decode("latin-1"), int(parts[1]), headers


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
