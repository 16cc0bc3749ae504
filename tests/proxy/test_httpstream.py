"""Per-request HTTP/1.1 relaying: framing, re-routing per request, forwarded headers, upgrades."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.web import resource, server

from dcrouter.proxy.httpstream import (BODY, COMPLETE, DATA, END, HEAD, UPGRADE, FramingError,
                                       RequestFramer, ResponseFramer)
from tests.proxy.conftest import proxy_port
from tests.proxy.test_tunnel import buffered, rss_kib


# -- framing units -------------------------------------------------------------------

def frame_requests(data: bytes) -> list[tuple[str, Any]]:
    framer = RequestFramer()
    framer.feed(data)
    events = []
    while (event := framer.next_event()) is not None:
        events.append(event)
    return events


def test_request_framer_bodies_pipelining_and_chunk_syntax() -> None:
    chunked = (b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n")
    data = chunked + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n" \
        + b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    events = frame_requests(data)
    kinds = [e[0] for e in events]
    assert kinds == [HEAD, BODY, END, HEAD, END, HEAD, BODY, END]
    assert events[1][1] == b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"   # verbatim
    assert events[3][1].target == "/next" and events[6][1] == b"abc"
    # byte by byte gives the same body bytes
    framer = RequestFramer()
    body = b""
    for i in range(len(chunked)):
        framer.feed(chunked[i:i + 1])
        while (event := framer.next_event()) is not None:
            if event[0] == BODY:
                body += event[1]
    assert body == chunked[chunked.index(b"\r\n\r\n") + 4:]


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nX: a\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
])
def test_request_smuggling_shapes_are_refused(head: bytes) -> None:
    # each shape with a Host, so it is refused for its smuggling shape, not for a missing Host
    if b"\r\nHost:" not in head:
        head = head.replace(b"\r\n", b"\r\nHost: a\r\n", 1)
    with pytest.raises(FramingError) as info:
        frame_requests(head)
    assert "without Host" not in str(info.value)


@pytest.mark.parametrize("head", [
    # shapes llhttp (httptools) accepts on its own: refused by the framer's explicit checks
    b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0000000000000000000005\r\nhello\r\n0\r\n\r\n",
    # shapes llhttp refuses (strict: every leniency off)
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7f\r\n\r\n",
    b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
    b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\nok",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nX : t\r\n\r\n",
])
def test_llhttp_framer_keeps_strict_refusals(head: bytes) -> None:
    framer = RequestFramer()
    with pytest.raises(FramingError):
        for i in range(0, len(head), 7):              # in pieces: both parsers see every cut
            framer.feed(head[i:i + 7])
            while framer.next_event() is not None:
                pass


def test_llhttp_framer_forwards_heads_as_received() -> None:
    from dcrouter.proxy.http import render_head
    events = frame_requests(b"GET /a HTTP/1.1\r\nHost: a\r\nX-Y:  v \r\n\r\n"
                            b"GET /b HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
                            b"GET http://a/c HTTP/1.1\r\nHost: a\r\n\r\n"
                            b"POST /d HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                            b"content-length: 1\r\n\r\nz")
    heads = [value for kind, value in events if kind == HEAD]
    assert render_head(heads[0], "192.0.2.1", "http") == (
        b"GET /a HTTP/1.1\r\nHost: a\r\nX-Y:  v \r\n"
        b"X-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Proto: http\r\n\r\n")
    assert render_head(heads[1], "192.0.2.1", "http").count(b"X-Forwarded-For") == 1
    assert b"6.6.6.6, 192.0.2.1" in render_head(heads[1], "192.0.2.1", "http")
    assert render_head(heads[2]).startswith(b"GET /c HTTP/1.1\r\n")      # origin-form
    assert render_head(heads[3]).lower().count(b"content-length") == 1     # merged
    assert [kind for kind, _ in events][-3:] == [HEAD, BODY, END]


def test_request_identical_content_lengths_are_accepted() -> None:
    events = frame_requests(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
                            b"Content-Length: 2\r\n\r\nok")
    assert [e[0] for e in events] == [HEAD, BODY, END]


def frame_responses(methods: list[str], data: bytes) -> tuple[list, ResponseFramer]:
    queue: deque[str] = deque(methods)
    framer = ResponseFramer(queue)
    return framer.feed(data), framer


def test_response_framer_statuses_methods_and_bodies() -> None:
    data = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"              # HEAD: no body
            b"HTTP/1.1 204 No Content\r\n\r\n"
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    events, framer = frame_responses(["POST", "HEAD", "GET", "GET", "GET"], data)
    assert [k for k, _ in events].count(COMPLETE) == 5
    assert b"".join(raw for kind, raw in events if kind == DATA) == data
    assert framer.idle and not framer.error
    # until close
    events, framer = frame_responses(["GET"], b"HTTP/1.0 200 OK\r\n\r\npart")
    assert framer.close_delimited and framer.backend_closed() and framer.idle
    # a cut response is not clean
    events, framer = frame_responses(["GET"], b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    assert not framer.backend_closed()
    # 101: tunnel afterwards
    events, framer = frame_responses(["GET"], b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\nRAW")
    assert [k for k, _ in events] == [DATA, UPGRADE, DATA] and events[2][1] == b"RAW"


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxEXTRA",           # bytes nobody asked for
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nnothex\r\n",
])
def test_response_framer_reports_errors(data: bytes) -> None:
    _events, framer = frame_responses(["GET"], data)
    assert framer.error


STREAM = (b"\r\nPOST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
          b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n"
          b"GET /next HTTP/1.1\r\nHost: b\r\n\r\n"
          b"PUT /x HTTP/1.1\r\nHost: c\r\nContent-Length: 3\r\n\r\nabc")


def summary(pieces: list[bytes]) -> list:
    framer = RequestFramer()
    out: list = []
    for piece in pieces:
        framer.feed(piece)
        while (event := framer.next_event()) is not None:
            kind, value = event
            if kind == BODY and out and out[-1][0] == BODY:
                out[-1] = (BODY, out[-1][1] + value)
            else:
                out.append((kind, (value.method, value.target, value.headers)
                            if kind == HEAD else value))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_request_framing_does_not_depend_on_segmentation(cuts: list[int]) -> None:
    points = [0] + sorted(cuts) + [len(STREAM)]
    pieces = [STREAM[a:b] for a, b in zip(points, points[1:])]
    assert summary(pieces) == summary([STREAM])
    assert [e[0] for e in summary([STREAM])] == [HEAD, BODY, END, HEAD, END, HEAD, BODY, END]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_framers_never_raise_anything_but_framing_errors(data: bytes, cut: int) -> None:
    framer = RequestFramer()
    try:
        for i in range(0, len(data), cut):
            framer.feed(data[i:i + cut])
            while framer.next_event() is not None:
                pass
    except FramingError:
        pass
    response = ResponseFramer(deque(["GET", "HEAD", "GET"]))
    for i in range(0, len(data), cut):
        response.feed(data[i:i + cut])
    response.backend_closed()


# -- backends and a blocking client ------------------------------------------------------

class EchoResource(resource.Resource):
    """Answers with JSON: its tag, the request line parts, headers and body digest."""

    isLeaf = True

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def render(self, request: Any) -> Any:
        path = request.path
        if path == b"/204":
            request.setResponseCode(204)
            return b""
        if path == b"/304":
            request.setResponseCode(304)
            return b""
        if path == b"/slow":               # answers after 1.5 s
            request.setHeader(b"content-length", b"4")
            reactor.callLater(1.5, lambda: (request.write(b"slow"), request.finish()))
            return server.NOT_DONE_YET
        body = request.content.read()
        data = json.dumps({
            "tag": self.tag, "method": request.method.decode(), "uri": request.uri.decode(),
            "headers": {k.decode().lower(): [v.decode() for v in vs]
                        for k, vs in request.requestHeaders.getAllRawHeaders()},
            "body_len": len(body), "body_sha": hashlib.sha256(body).hexdigest(),
            "client_port": request.getClientAddress().port}).encode()
        if path == b"/chunked":            # no length: twisted.web sends it chunked
            request.write(data[:7])
            request.write(data[7:])
            request.finish()
            return server.NOT_DONE_YET
        return data


class WebBackend:
    """A twisted.web server (keep-alive, pipelining, chunked) on 127.0.0.1."""

    def __init__(self, tag: str) -> None:
        site = server.Site(EchoResource(tag))
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port.getHost().port}"


@pytest.fixture
def web_backends() -> Any:
    made: list[WebBackend] = []

    def make(tag: str) -> WebBackend:
        backend = WebBackend(tag)
        made.append(backend)
        return backend
    yield make
    for b in made:
        pytest_twisted.blockon(b.port.stopListening())


class RawBackend:
    """A thread serving one connection with ``handler(conn)`` (scripted HTTP)."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.handler = handler
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.settimeout(30)
            while True:
                conn, _ = self.server.accept()
                conn.settimeout(30)
                if not conn.recv(1, socket.MSG_PEEK):      # a health check probe
                    conn.close()
                    continue
                with conn:
                    self.handler(conn)
                return
        except BaseException as e:        # reported by the test
            self.error = e
        finally:
            self.server.close()


class Reader:
    """Reads HTTP/1.1 responses from a blocking socket (an independent, simple parser)."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.buf = b""
        self.raw = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("closed")
        self.buf += chunk

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._fill()
        out, self.buf = self.buf.split(marker, 1)
        self.raw += out + marker
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        self.raw += out
        return out

    def response(self, method: str = "GET") -> tuple[int, dict, bytes]:
        head = self.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in head[1:])}
        body = b""
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif headers.get("transfer-encoding") == "chunked":
            while True:
                size = int(self.until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    while self.until(b"\r\n"):     # trailer lines, then the empty one
                        pass
                    break
                body += self.exact(size)
                self.exact(2)
        elif "content-length" in headers:
            body = self.exact(int(headers["content-length"]))
        return status, headers, body

    def closed(self) -> bool:
        try:
            self._fill()
        except (EOFError, ConnectionResetError):
            return True
        return False


def req(method: str, host: str, path: str = "/", extra: str = "", body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if extra:
        lines.append(extra)
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def connect(port: int, tls_name: str = "") -> Any:
    sock: Any = socket.create_connection(("127.0.0.1", port), timeout=20)
    if tls_name:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        sock = ctx.wrap_socket(sock, server_hostname=tls_name)
    return sock


# -- end to end ---------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_each_request_is_routed_and_gets_its_own_forwarded_for(proxy_router, web_backends):
    alpha, beta = web_backends("alpha"), web_backends("beta")
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "a", "ports": [port], "domains": ["a.test"], "targets": [alpha.address],
         "add_forwarded_headers": True},
        {"name": "b", "ports": [port], "domains": ["b.test"], "targets": [beta.address],
         "add_forwarded_headers": True},
    ]})

    def client() -> list[dict]:
        seen = []
        with connect(port) as s:
            reader = Reader(s)
            for host, extra in [("a.test", ""), ("b.test", "X-Forwarded-For: 6.6.6.6"),
                                ("b.test", "X-Forwarded-For: 7.7.7.7"),
                                ("a.test", "X-Forwarded-Proto: https")]:
                s.sendall(req("GET", host, f"/{host}", extra))
                status, _h, body = reader.response()
                assert status == 200
                seen.append(json.loads(body))
        return seen
    seen = yield deferToThread(client)
    assert [s["tag"] for s in seen] == ["alpha", "beta", "beta", "alpha"]
    for s in seen:
        assert s["headers"]["x-forwarded-proto"] == ["http"]
        assert len(s["headers"]["x-forwarded-for"]) == 1
        assert s["headers"]["x-forwarded-for"][0].split(", ")[-1] == "127.0.0.1"
    assert seen[0]["headers"]["x-forwarded-for"] == ["127.0.0.1"]
    assert seen[1]["headers"]["x-forwarded-for"] == ["6.6.6.6, 127.0.0.1"]
    assert seen[2]["headers"]["x-forwarded-for"] == ["7.7.7.7, 127.0.0.1"]
    assert seen[1]["client_port"] == seen[2]["client_port"]      # same backend connection
    stats = router.get_stats()["proxy"]["routes"]
    for _ in range(100):                  # the proxy notices the client's close
        if not stats["a"]["active_connections"]:
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
        stats = router.get_stats()["proxy"]["routes"]
    assert stats["a"]["total_connections"] == 2 and stats["b"]["total_connections"] == 1
    assert stats["a"]["active_connections"] == 0 and stats["b"]["active_connections"] == 0
    assert stats["b"]["bytes_out"] > 0 and stats["b"]["bytes_in"] > 0
    assert stats["a"]["requests"] == 2 and stats["b"]["requests"] == 2


@pytest_twisted.inlineCallbacks
def test_pipelined_requests_head_204_304_and_chunked_responses(proxy_router, web_backends):
    alpha = web_backends("alpha")
    port = proxy_port()
    proxy_router({"routes": [{"name": "a", "ports": [port], "domains": ["*"],
                              "targets": [alpha.address], "add_forwarded_headers": True}]})

    def client() -> list:
        with connect(port) as s:
            s.sendall(req("GET", "x.test", "/one") + req("HEAD", "x.test", "/two")
                      + req("GET", "x.test", "/204") + req("GET", "x.test", "/304")
                      + req("GET", "x.test", "/chunked")
                      + req("POST", "x.test", "/post", body=b"payload")
                      + req("GET", "x.test", "/last", "Connection: close"))
            reader = Reader(s)
            out = [reader.response(m) for m in ["GET", "HEAD", "GET", "GET", "GET", "POST",
                                                "GET"]]
            return out + [reader.closed(), reader.raw]
    *out, closed, raw = yield deferToThread(client)
    assert [o[0] for o in out] == [200, 200, 204, 304, 200, 200, 200]
    assert json.loads(out[0][2])["uri"] == "/one"
    assert out[1][2] == b"" and int(out[1][1]["content-length"]) > 0          # HEAD
    assert out[4][1]["transfer-encoding"] == "chunked"
    assert json.loads(out[4][2])["uri"] == "/chunked"
    post = json.loads(out[5][2])
    assert post["body_len"] == 7 and post["method"] == "POST"
    assert json.loads(out[6][2])["uri"] == "/last"
    assert closed
    assert raw.count(b"HTTP/1.1 ") == 7


CHUNKED_REQUEST = (b"POST /up HTTP/1.1\r\nHost: c.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"4;name=\"v\"\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n"
                   b"0\r\nExpires: never\r\n\r\n")
CHUNKED_RESPONSE = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"7;ext\r\nchunked\r\n1\r\n!\r\n0\r\nX-Sum: 8\r\n\r\n")


@pytest_twisted.inlineCallbacks
def test_chunked_bodies_relay_byte_exact_and_smuggling_gets_400(proxy_router):
    received: list[bytes] = []

    def script(conn: socket.socket) -> None:
        data = b""
        while not data.endswith(b"0\r\nExpires: never\r\n\r\n"):
            data += conn.recv(65536)
        received.append(data)
        conn.sendall(CHUNKED_RESPONSE)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        received.append(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        received.append(conn.recv(65536))        # the smuggled request must never come

    backend = RawBackend(script)
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "c", "ports": [port], "domains": ["c.test"],
                                       "targets": [backend.address],
                                       "add_forwarded_headers": True}]})

    def client() -> tuple:
        with connect(port) as s:
            s.sendall(CHUNKED_REQUEST)
            reader = Reader(s)
            status, _h, body = reader.response()
            first = reader.raw
            s.sendall(req("GET", "c.test", "/after"))
            second = reader.response()
            s.sendall(b"POST /x HTTP/1.1\r\nHost: c.test\r\nContent-Length: 4\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n")
            third = reader.response()
            return first, body, second, third, reader.closed()
    first, body, second, third, closed = yield deferToThread(client)
    assert first == CHUNKED_RESPONSE and body == b"chunked!"
    head, _, rest = CHUNKED_REQUEST.partition(b"\r\n\r\n")
    assert received[0] == head + b"\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http" \
        b"\r\n\r\n" + rest
    assert second[0] == 200 and second[2] == b"ok"
    assert third[0] == 400 and closed
    yield deferToThread(backend.thread.join, 10)
    assert received[2] == b""          # the backend saw the proxy close, not the smuggled bytes
    assert router.get_stats()["proxy"]["routes"]["c"]["errors"].get("bad_http") == 1


@pytest_twisted.inlineCallbacks
def test_upgrade_101_becomes_a_tunnel(proxy_router, web_backends):
    plain = web_backends("plain")

    def script(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        assert b"X-Forwarded-For: 127.0.0.1" in data
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\nserver-first")
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            conn.sendall(chunk.upper())

    ws = RawBackend(script)
    port = proxy_port()
    proxy_router({"routes": [
        {"name": "ws", "ports": [port], "domains": ["ws.test"], "targets": [ws.address],
         "add_forwarded_headers": True},
        {"name": "plain", "ports": [port], "domains": ["*"], "targets": [plain.address]},
    ]})

    def client() -> tuple:
        with connect(port) as s:
            reader = Reader(s)
            s.sendall(req("GET", "other.test", "/before"))
            before = json.loads(reader.response()[2])["tag"]
            s.sendall(req("GET", "ws.test", "/chat", "Upgrade: websocket\r\nConnection: Upgrade"))
            status, headers, _b = reader.response()
            first = reader.exact(len(b"server-first"))
            # raw bytes that look like HTTP go through untouched now
            s.sendall(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\nhello")
            echoed = reader.exact(len(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\nhello"))
            s.shutdown(socket.SHUT_WR)
            return before, status, first, echoed, reader.closed()
    before, status, first, echoed, closed = yield deferToThread(client)
    assert before == "plain" and status == 101 and first == b"server-first"
    assert echoed == b"GET / HTTP/1.1\r\nHOST: OTHER.TEST\r\n\r\nHELLO"
    assert closed
    assert ws.error is None


@pytest_twisted.inlineCallbacks
def test_unparseable_response_closes_both_without_traceback(proxy_router):
    failures: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    def script(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"NONSENSE\r\n\r\n")
        conn.recv(65536)

    backend = RawBackend(script)
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "bad", "ports": [port], "domains": ["x.test"],
                                       "targets": [backend.address]}]})
    globalLogPublisher.addObserver(observer)
    try:
        def client() -> bytes:
            with connect(port) as s:
                s.sendall(req("GET", "x.test"))
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                return data
        assert (yield deferToThread(client)) == b""
        yield deferToThread(backend.thread.join, 10)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not failures
    assert router.get_stats()["proxy"]["routes"]["bad"]["errors"] == {"bad_response": 1}


@pytest_twisted.inlineCallbacks
def test_terminated_tls_route_rewrites_every_request(proxy_router, web_backends):
    site = web_backends("tls-site")
    port = proxy_port()
    proxy_router({"routes": [{"name": "https", "ports": [port], "domains": ["w.test"],
                              "tls": "terminate", "targets": [site.address],
                              "add_forwarded_headers": True}]})

    def client() -> list:
        with connect(port, "w.test") as s:
            reader = Reader(s)
            s.sendall(req("GET", "w.test", "/1"))
            first = json.loads(reader.response()[2])
            s.sendall(req("POST", "w.test", "/2", "X-Forwarded-For: 6.6.6.6\r\n"
                                                  "X-Forwarded-Proto: http", body=b"x" * 70000))
            second = json.loads(reader.response()[2])
            s.sendall(req("GET", "w.test", "/3", "Transfer-Encoding: chunked\r\nContent-Length: 1"))
            third = reader.response()
            return [first, second, third[0], reader.closed()]
    first, second, third, closed = yield deferToThread(client)
    assert first["headers"]["x-forwarded-for"] == ["127.0.0.1"]
    assert second["headers"]["x-forwarded-for"] == ["6.6.6.6, 127.0.0.1"]
    assert second["headers"]["x-forwarded-proto"] == ["https"] and second["body_len"] == 70000
    assert first["client_port"] == second["client_port"]
    assert third == 400 and closed


BIG = 50 * 1024 * 1024


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "terminated"])
@pytest_twisted.inlineCallbacks
def test_big_post_to_a_slow_backend_stays_bounded(proxy_router, tls):
    big = BIG if not tls else 24 * 1024 * 1024
    counted: list[int] = []

    def slow(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(16384)
        rest = data.split(b"\r\n\r\n", 1)[1]
        time.sleep(1.0)                           # the client is far ahead by now
        received = len(rest)
        while received < big:
            chunk = conn.recv(16384)
            if not chunk:
                break
            received += len(chunk)
        counted.append(received)
        body = str(received).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        conn.recv(100)

    backend = RawBackend(slow)
    port = proxy_port()
    route = {"name": "up", "ports": [port], "domains": ["*"], "targets": [backend.address],
             "add_forwarded_headers": True}
    if tls:
        route["tls"] = "terminate"
    router = proxy_router({"routes": [route]})
    service = router.by_name["proxy"]
    peak = {"buffer": 0, "rss": 0, "seen": 0}
    rss_before = rss_kib()

    def sample() -> None:
        for front in list(service.connections):
            relay = front.relay
            if relay is None and front.delegate is not None:       # terminated TLS
                relay = getattr(getattr(front.delegate, "wrappedProtocol", None), "relay", None)
            link = relay.link if relay is not None else None
            peak["seen"] += link is not None and link.transport is not None
            total = buffered(front.transport) + buffered(link.transport if link else None) \
                + (len(relay.framer.buffer) if relay is not None else 0)
            peak["buffer"] = max(peak["buffer"], total)
        peak["rss"] = max(peak["rss"], rss_kib() - rss_before)
    loop = task.LoopingCall(sample)
    loop.start(0.005)

    def client() -> bytes:
        block = b"\xab" * (1024 * 1024)
        with connect(port, "u.test" if tls else "") as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            s.sendall(f"POST /big HTTP/1.1\r\nHost: u.test\r\nContent-Length: {big}\r\n\r\n"
                      .encode())
            for _ in range(big // len(block)):
                s.sendall(block)
            return Reader(s).response()[2]
    try:
        answer = yield deferToThread(client)
    finally:
        loop.stop()
    assert answer == str(big).encode() and counted == [big]
    assert peak["seen"] > 10            # the watch saw the relay's backend connection
    assert router.get_stats()["proxy"]["routes"]["up"]["bytes_in"] > big
    assert peak["buffer"] < 2 * 1024 * 1024, peak["buffer"]
    assert peak["rss"] < 64 * 1024, peak["rss"]
    yield task.deferLater(reactor, 0, lambda: None)


@pytest_twisted.inlineCallbacks
def test_pipelined_requests_for_two_routes_switch_in_order(proxy_router, web_backends):
    alpha, beta = web_backends("alpha"), web_backends("beta")
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "a", "ports": [port], "domains": ["a.test"], "targets": [alpha.address],
         "add_forwarded_headers": True},
        {"name": "b", "ports": [port], "domains": ["b.test"], "targets": [beta.address],
         "add_forwarded_headers": True, "blocked_ips": ["127.0.0.0/8"]},
        {"name": "r", "ports": [port], "domains": ["r.test"], "redirect_to_https": True},
        {"name": "c", "ports": [port], "domains": ["c.test"], "targets": [beta.address]},
    ]})

    def pipelined() -> list:
        with connect(port) as s:
            s.sendall(req("GET", "a.test", "/1") + req("POST", "c.test", "/2", body=b"x" * 999)
                      + req("GET", "a.test", "/3", "X-Forwarded-For: 1.2.3.4")
                      + req("GET", "nowhere.test", "/4") + req("GET", "a.test", "/5"))
            reader = Reader(s)
            out = [reader.response() for _ in range(4)]
            return out + [reader.closed()]

    def redirected() -> list:
        with connect(port) as s:
            reader = Reader(s)
            s.sendall(req("GET", "a.test", "/1"))
            first = reader.response()
            s.sendall(req("GET", "r.test", "/p?q"))
            return [first, reader.response(), reader.closed()]

    def blocked() -> list:
        with connect(port) as s:
            reader = Reader(s)
            s.sendall(req("GET", "a.test", "/1"))
            first = reader.response()
            s.sendall(req("GET", "b.test", "/2"))
            return [first, reader.closed()]
    *out, closed = yield deferToThread(pipelined)
    seen = [json.loads(o[2]) for o in out[:3]]
    assert [(s["tag"], s["uri"]) for s in seen] == [("alpha", "/1"), ("beta", "/2"),
                                                    ("alpha", "/3")]
    assert seen[1]["body_len"] == 999 and "x-forwarded-for" not in seen[1]["headers"]
    assert seen[2]["headers"]["x-forwarded-for"] == ["1.2.3.4, 127.0.0.1"]
    assert out[3][0] == 404 and closed             # /5 after the 404 is never served
    first, second, closed = yield deferToThread(redirected)
    assert json.loads(first[2])["tag"] == "alpha"
    assert second[0] == 301 and second[1]["location"] == "https://r.test/p?q" and closed
    first, closed = yield deferToThread(blocked)
    assert first[0] == 200 and closed
    stats = router.get_stats()["proxy"]["routes"]
    assert stats["b"]["errors"] == {"blocked": 1} and stats["b"]["total_connections"] == 0
    assert stats["a"]["total_connections"] == 4 and stats["c"]["total_connections"] == 1


@pytest_twisted.inlineCallbacks
def test_connection_close_from_either_side_closes_after_the_response(proxy_router, web_backends):
    alpha = web_backends("alpha")

    def script(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye")
        conn.settimeout(10)
        conn.recv(65536)                  # the proxy closes; the backend does not

    raw = RawBackend(script)
    port = proxy_port()
    proxy_router({"routes": [
        {"name": "a", "ports": [port], "domains": ["a.test"], "targets": [alpha.address]},
        {"name": "r", "ports": [port], "domains": ["r.test"], "targets": [raw.address]},
    ]})

    def client(host: str, extra: str) -> tuple:
        with connect(port) as s:
            s.sendall(req("GET", host, "/", extra))
            reader = Reader(s)
            return reader.response(), reader.closed()
    (status, _h, body), closed = yield deferToThread(client, "a.test", "Connection: close")
    assert status == 200 and json.loads(body)["tag"] == "alpha" and closed
    (status, _h, body), closed = yield deferToThread(client, "r.test", "")
    assert status == 200 and body == b"bye" and closed


@pytest_twisted.inlineCallbacks
def test_big_response_to_a_slow_client_then_a_route_switch_stays_bounded(proxy_router,
                                                                          web_backends):
    total = 30 * 1024 * 1024
    other = web_backends("other")

    def fast(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"\xcd" * (1024 * 1024)
        for _ in range(total // len(block)):
            conn.sendall(block)
        conn.recv(100)

    source = RawBackend(fast)
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "big", "ports": [port], "domains": ["big.test"], "targets": [source.address]},
        {"name": "other", "ports": [port], "domains": ["other.test"], "targets": [other.address]},
    ]})
    service = router.by_name["proxy"]
    peak = {"buffer": 0}

    def sample() -> None:
        for front in list(service.connections):
            relay = front.relay
            link = relay.link if relay is not None else None
            peak["buffer"] = max(peak["buffer"], buffered(front.transport)
                                 + buffered(link.transport if link else None))
    loop = task.LoopingCall(sample)
    loop.start(0.005)

    def client() -> tuple:
        with connect(port) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            s.sendall(req("GET", "big.test", "/big") + req("GET", "other.test", "/small"))
            time.sleep(1.0)
            reader = Reader(s)
            head = reader.until(b"\r\n\r\n")
            size = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            got = len(reader.buf)
            reader.buf = b""
            while got < size:
                chunk = s.recv(min(16384, size - got))
                if not chunk:
                    break
                got += len(chunk)
            reader.raw = b""
            return got, json.loads(reader.response()[2])["tag"]
    try:
        got, tag = yield deferToThread(client)
    finally:
        loop.stop()
    assert got == total and tag == "other"
    assert peak["buffer"] < 2 * 1024 * 1024, peak["buffer"]


@pytest_twisted.inlineCallbacks
def test_half_close_http10_expect_continue_and_idle_timeout(proxy_router, web_backends):
    alpha = web_backends("alpha")

    def continue_script(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = data.split(b"\r\n\r\n", 1)[1]
        while len(body) < 5:
            body += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\n" + body.upper())
        conn.recv(100)

    cont = RawBackend(continue_script)
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "a", "ports": [port], "domains": ["a.test"], "targets": [alpha.address],
         "connection_timeout": 0.8},
        {"name": "c", "ports": [port], "domains": ["c.test"], "targets": [cont.address]},
    ]})

    def half_close() -> tuple:
        with connect(port) as s:
            s.sendall(req("GET", "a.test", "/1") + req("GET", "a.test", "/2"))
            s.shutdown(socket.SHUT_WR)
            reader = Reader(s)
            return reader.response(), reader.response(), reader.closed()

    def http10() -> tuple:
        with connect(port) as s:
            s.sendall(b"GET /old HTTP/1.0\r\nHost: a.test\r\n\r\n")
            reader = Reader(s)
            return reader.response(), reader.closed()

    def expect_continue() -> tuple:
        with connect(port) as s:
            s.sendall(b"PUT /c HTTP/1.1\r\nHost: c.test\r\nContent-Length: 5\r\n"
                      b"Expect: 100-continue\r\n\r\n")
            reader = Reader(s)
            interim = reader.response()
            s.sendall(b"hello")
            return interim, reader.response()

    def idle() -> tuple:
        with connect(port) as s:
            reader = Reader(s)
            s.sendall(req("GET", "a.test", "/1"))
            first = reader.response()
            started = time.monotonic()
            return first, reader.closed(), time.monotonic() - started
    first, second, closed = yield deferToThread(half_close)
    assert json.loads(first[2])["uri"] == "/1" and json.loads(second[2])["uri"] == "/2"
    assert closed
    (status, _h, body), closed = yield deferToThread(http10)
    assert status == 200 and json.loads(body)["uri"] == "/old" and closed
    interim, final = yield deferToThread(expect_continue)
    assert interim[0] == 100 and final[0] == 201 and final[2] == b"HELLO"
    first, closed, waited = yield deferToThread(idle)
    assert first[0] == 200 and closed and waited < 10
    assert router.get_stats()["proxy"]["routes"]["a"]["errors"] == {"idle_timeout": 1}


RESPONSE_PIECES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\nuntil close",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", b"\x00\xff garbage",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"\r\n", b"",
]
REQUEST_PIECES = [
    b"GET / HTTP/1.1\r\nHost: f.test\r\n\r\n", b"HEAD / HTTP/1.1\r\nHost: g.test\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: f.test\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"3\r\nabc\r\n", b"0\r\n\r\n", b"POST / HTTP/1.1\r\nHost: g.test\r\nContent-Length: 4\r\n\r\n",
    b"data", b"GET / HTTP/1.1\r\nHost: f.test\r\nUpgrade: x\r\n\r\n", b"\x16\x03\x01 junk",
    b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n", b"GET /\r\n\r\n", b"\r\n",
]


@pytest_twisted.inlineCallbacks
def test_random_conversations_never_log_a_failure(proxy_router):
    import random
    from twisted.internet.protocol import Factory, Protocol

    rng = random.Random(5)

    class Chaos(Protocol):
        def dataReceived(self, data: bytes) -> None:
            for _ in range(rng.randint(0, 2)):
                self.transport.write(rng.choice(RESPONSE_PIECES))  # type: ignore[union-attr]
            if rng.random() < 0.1:
                self.transport.loseConnection()  # type: ignore[union-attr]

    factory = Factory.forProtocol(Chaos)
    factory.noisy = False
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    target = f"127.0.0.1:{listening.getHost().port}"
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "f", "ports": [port], "domains": ["f.test"], "targets": [target],
         "add_forwarded_headers": True, "connection_timeout": 0.5},
        {"name": "g", "ports": [port], "domains": ["g.test"], "targets": [target],
         "connection_timeout": 0.5},
    ]})
    failures: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)
    conversations = [[rng.choice(REQUEST_PIECES) for _ in range(rng.randint(1, 6))]
                     for _ in range(40)]

    def talk() -> None:
        for pieces in conversations:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    for piece in pieces:
                        s.sendall(piece)
                        time.sleep(0.002)
                    s.shutdown(socket.SHUT_WR)
                    s.settimeout(3)
                    while s.recv(65536):
                        pass
            except OSError:
                pass
    globalLogPublisher.addObserver(observer)
    try:
        yield deferToThread(talk)
        for _ in range(100):
            if not router.by_name["proxy"].connections:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
    finally:
        globalLogPublisher.removeObserver(observer)
        yield listening.stopListening()
    assert not failures, failures[:1]
    assert not router.by_name["proxy"].connections
    stats = router.get_stats()["proxy"]["routes"]
    assert stats["f"]["active_connections"] == 0 and stats["g"]["active_connections"] == 0
    assert router.by_name["proxy"].admission.active() == 0


@pytest_twisted.inlineCallbacks
def test_each_backend_connection_gets_its_proxy_header(proxy_router):
    seen: list[bytes] = []

    def script(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        seen.append(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.recv(100)

    one, two = RawBackend(script), RawBackend(script)
    port = proxy_port()
    proxy_router({"routes": [
        {"name": "one", "ports": [port], "domains": ["one.test"], "targets": [one.address],
         "send_proxy_protocol": "v1"},
        {"name": "two", "ports": [port], "domains": ["two.test"], "targets": [two.address],
         "send_proxy_protocol": "v1"},
    ]})

    def client() -> tuple:
        with connect(port) as s:
            reader = Reader(s)
            s.sendall(req("GET", "one.test", "/a"))
            first = reader.response()
            s.sendall(req("GET", "two.test", "/b"))
            return first, reader.response(), s.getsockname()[1]
    first, second, client_port = yield deferToThread(client)
    assert first[2] == b"ok" and second[2] == b"ok"
    yield deferToThread(one.thread.join, 10)          # never block the reactor on a join
    yield deferToThread(two.thread.join, 10)
    assert len(seen) == 2
    for data, path in zip(seen, ["/a", "/b"]):
        line, _, rest = data.partition(b"\r\n")
        assert line.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d" % (client_port, port))
        assert rest.startswith(b"GET %s HTTP/1.1\r\n" % path.encode())
