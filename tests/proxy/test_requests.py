"""Request checks of the HTTP relay (issue 13), with raw sockets and curl: absolute-form targets,
Host against SNI on terminated routes (421), the certificate a client without SNI sees, and the
per-request timeouts (http_request_timeout, http_keep_alive_timeout)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from typing import Any, Optional

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from dcrouter.proxy import http as httpmod
from dcrouter.proxy import httprelay
from tests.proxy.conftest import proxy_port, recv_all
from tests.proxy.test_httpstream import Reader, connect, req, web_backends  # noqa: F401


def exchange(port: int, data: bytes, tls_name: Optional[str] = None) -> bytes:
    """Send ``data`` (optionally over TLS with SNI ``tls_name``; "" for no SNI); read to close."""
    sock: Any = socket.create_connection(("127.0.0.1", port), timeout=20)
    if tls_name is not None:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            sock = ctx.wrap_socket(sock, server_hostname=tls_name or None)
        except (ConnectionResetError, ssl.SSLError):
            sock.close()
            return b""                              # refused during the handshake
    with sock:
        sock.sendall(data)
        try:
            return recv_all(sock)
        except (ConnectionResetError, ssl.SSLError):
            return b""


def status(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1."), raw[:200]
    return int(raw.split(b" ", 2)[1])


def count_connections(backend: Any) -> list[int]:
    """A list whose length grows with every connection ``backend`` accepts."""
    accepted: list[int] = []
    factory = backend.port.factory
    build = factory.buildProtocol

    def counting(addr: Any) -> Any:
        accepted.append(1)
        return build(addr)
    factory.buildProtocol = counting
    return accepted


def seen(raw: bytes) -> dict:
    """What the WebBackend echoed: tag, method, uri, headers."""
    return json.loads(raw.partition(b"\r\n\r\n")[2])


# -- absolute-form targets (RFC 9112 3.2.2) ------------------------------------------------

def test_absolute_form_normalization_units() -> None:
    head = httpmod.parse_head(b"GET http://A.test:8080/x?y=1 HTTP/1.1\r\nHost: a.test:8080")
    assert head.target == "/x?y=1" and head.header("host") == "A.test:8080"
    assert head.host == "a.test"
    head = httpmod.parse_head(b"GET https://a.test?q HTTP/1.0")
    assert head.target == "/?q" and head.header("host") == "a.test"
    assert httpmod.parse_head(b"GET http://a.test:80/ HTTP/1.1\r\nHost: a.test").target == "/"
    assert httpmod.parse_head(b"OPTIONS * HTTP/1.1\r\nHost: a").target == "*"
    assert httpmod.parse_head(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443").host == "a.test"
    assert httpmod.parse_head(b"GET / HTTP/1.1\r\nHost: [::1]:8080").host == "::1"
    for bad in [b"GET http://internal.test/secret HTTP/1.1\r\nHost: a.test",
                b"GET http://a.test:81/ HTTP/1.1\r\nHost: a.test",
                b"GET http://user@a.test/ HTTP/1.1\r\nHost: a.test",
                b"GET ftp://a.test/ HTTP/1.1\r\nHost: a.test",
                b"GET http:///x HTTP/1.1\r\nHost: a.test",
                b"GET a.test:80 HTTP/1.1\r\nHost: a.test",
                b"GET x HTTP/1.1\r\nHost: a.test",
                b"GET * HTTP/1.1\r\nHost: a.test",
                b"CONNECT a.test HTTP/1.1\r\nHost: a.test",
                b"CONNECT a.test:443 HTTP/1.1\r\nHost: b.test:443",
                b"GET / HTTP/1.1",
                b"GET / HTTP/1.1\r\nHost: a.test/x",
                b"GET / HTTP/1.1\r\nHost: a.test:99999",
                b"GET / HTTP/1.1\r\nHost: a b"]:
        with pytest.raises(ValueError):
            httpmod.parse_head(bad)


@pytest_twisted.inlineCallbacks
def test_absolute_form_is_routed_by_its_authority_not_around_allowed_ips(proxy_router,
                                                                         web_backends):
    public = web_backends("public")
    internal = web_backends("internal")
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "a", "ports": [port], "domains": ["a.test"], "targets": [public.address], "health_check_interval": 0},
        {"name": "internal", "ports": [port], "domains": ["internal.test"],
         "targets": [internal.address], "allowed_ips": ["10.0.0.0/8"],
         "health_check_interval": 0},
    ]})
    public_hits, internal_hits = count_connections(public), count_connections(internal)
    # the request: absolute target of the internal name, Host of the public one
    raw = yield deferToThread(exchange, port, b"GET http://internal.test/secret HTTP/1.1\r\n"
                              b"Host: a.test\r\n\r\n")
    assert status(raw) == 400
    # agreeing Host: routed by the authority, so internal's allowed_ips refuses 127.0.0.1
    raw = yield deferToThread(exchange, port, b"GET http://internal.test/secret HTTP/1.1\r\n"
                              b"Host: internal.test\r\n\r\n")
    assert raw == b""
    # HTTP/1.0 without Host: the authority decides as well
    raw = yield deferToThread(exchange, port, b"GET http://internal.test/secret HTTP/1.0\r\n\r\n")
    assert raw == b""
    assert not public_hits and not internal_hits
    # a public absolute-form request reaches a.test in origin-form with the Host regenerated
    raw = yield deferToThread(exchange, port, b"GET http://A.test/x?y=1 HTTP/1.0\r\n\r\n")
    echoed = seen(raw)
    assert status(raw) == 200 and echoed["tag"] == "public" and echoed["uri"] == "/x?y=1"
    assert echoed["headers"]["host"] == ["A.test"]
    # curl as a proxy client (absolute-form) and with a forged request target
    def curl(*args: str) -> str:
        return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", *args],
                              capture_output=True, text=True, timeout=30).stdout
    assert (yield deferToThread(curl, "-x", f"http://127.0.0.1:{port}",
                                "http://a.test/via-proxy")) == "200"
    assert (yield deferToThread(curl, "--request-target", "http://internal.test/secret",
                                "-H", "Host: a.test", f"http://127.0.0.1:{port}/")) == "400"
    for garbage in [b"GET http://user@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
                    b"GET a.test:80 HTTP/1.1\r\nHost: a.test\r\n\r\n",
                    b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"]:
        assert status((yield deferToThread(exchange, port, garbage))) == 400
    assert not internal_hits


# -- Host against SNI on terminated routes ---------------------------------------------------

@pytest_twisted.inlineCallbacks
def wait_for_no_connections(router: Any) -> Any:
    """Until the proxy tracks no client connection (20 s at most, far below any timeout that
    would otherwise end one: the grace after our close is raised to 60 s by the fixture)."""
    service = router.by_name["proxy"]
    for _ in range(400):
        if not service.connections:
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"still open: {[c.client_addr for c in service.connections]}")


@pytest.fixture(autouse=True)
def long_close_grace(monkeypatch: Any) -> None:
    """Connections must go away because the client left, not because the grace ran out."""
    monkeypatch.setattr(httprelay, "CLOSE_GRACE", 60.0)


@pytest_twisted.inlineCallbacks
def test_a_client_that_stays_after_our_answer_is_closed_after_the_grace(proxy_router,
                                                                        web_backends,
                                                                        monkeypatch):
    monkeypatch.setattr(httprelay, "CLOSE_GRACE", 0.5)
    backend = web_backends("site")
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "a", "ports": [port], "domains": ["a.test"],
                              "tls": "terminate", "targets": [backend.address],
                              "health_check_interval": 0}]})

    answered, release = threading.Event(), threading.Event()

    def silent() -> tuple[int, int]:
        with connect(port, "a.test") as s:
            reader = Reader(s)
            s.sendall(req("GET", "a.test", "/1") + req("GET", "b.test", "/2"))
            codes = reader.response()[0], reader.response()[0]
            answered.set()
            release.wait(30)           # never answers the close_notify, never closes
            return codes
    done = deferToThread(silent)
    yield deferToThread(answered.wait, 30)
    try:
        yield wait_for_no_connections(router)   # aborted by the proxy after the grace
    finally:
        release.set()
    assert (yield done) == (200, 421)


def peer_names(port: int, server_name: Optional[str]) -> list[str]:
    """The DNS names in the certificate the proxy presents for ``server_name`` (None: no SNI)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as s:
            der = s.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


@pytest_twisted.inlineCallbacks
def test_a_host_of_another_route_on_a_terminated_connection_gets_421(proxy_router, web_backends):
    public = web_backends("public")
    internal = web_backends("internal")
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "a", "ports": [port], "domains": ["a.test"], "tls": "terminate",
         "targets": [public.address], "health_check_interval": 0},
        {"name": "internal", "ports": [port], "domains": ["internal.test"], "tls": "terminate",
         "targets": [internal.address], "allowed_ips": ["10.0.0.0/8"],
         "health_check_interval": 0},
    ]})
    public_hits, internal_hits = count_connections(public), count_connections(internal)
    raw = yield deferToThread(exchange, port, req("GET", "internal.test", "/secret"), "a.test")
    assert status(raw) == 421
    raw = yield deferToThread(exchange, port, req("GET", "unknown.test"), "a.test")
    assert status(raw) == 421                       # a name no route serves: misdirected too
    raw = yield deferToThread(exchange, port, b"GET http://internal.test/ HTTP/1.1\r\n"
                              b"Host: internal.test\r\n\r\n", "a.test")
    assert status(raw) == 421                       # the absolute form changes nothing
    stats = router.get_stats()["proxy"]["routes"]
    assert stats["a"]["errors"].get("misdirected") == 3
    assert not public_hits and not internal_hits      # no backend saw those requests
    # the SNI's own name works, also on a kept-alive connection until it switches names
    def keep_alive() -> tuple[int, int]:
        with connect(port, "a.test") as s:
            reader = Reader(s)
            s.sendall(req("GET", "a.test", "/1") + req("GET", "internal.test", "/2"))
            return reader.response()[0], reader.response()[0]
    assert (yield deferToThread(keep_alive)) == (200, 421)
    yield wait_for_no_connections(router)      # the paused connection noticed the close
    # without SNI there is no route here: the handshake gets no certificate at all
    assert (yield deferToThread(exchange, port, req("GET", "a.test"), "")) == b""
    # curl, checking the certificate name as a browser would
    def curl(host_header: str) -> str:
        return subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                               "--resolve", f"a.test:{port}:127.0.0.1", "-H",
                               f"Host: {host_header}", f"https://a.test:{port}/"],
                              capture_output=True, text=True, timeout=30).stdout
    assert (yield deferToThread(curl, "internal.test")) == "421"
    assert (yield deferToThread(curl, "a.test")) == "200"


@pytest_twisted.inlineCallbacks
def test_certificates_name_only_what_the_client_asked_for(proxy_router, web_backends):
    backend = web_backends("site")
    port = proxy_port()
    proxy_router({"routes": [
        {"name": "a", "ports": [port], "domains": ["a.test", "www.a.test"], "tls": "terminate",
         "targets": [backend.address]},
        {"name": "internal", "ports": [port], "domains": ["internal.test"], "tls": "terminate",
         "targets": [backend.address]},
        {"name": "default", "ports": [port], "domains": ["*"], "tls": "terminate",
         "targets": [backend.address]},
    ]})
    assert (yield deferToThread(peer_names, port, "a.test")) == ["a.test"]
    assert (yield deferToThread(peer_names, port, "internal.test")) == ["internal.test"]
    for name in (None, "other.test"):                # no SNI, or a name nobody serves
        assert (yield deferToThread(peer_names, port, name)) == ["dcrouter-default.invalid"]
    # no SNI lands on the '*' route; a Host of a named route is misdirected there
    raw = yield deferToThread(exchange, port, req("GET", "internal.test"), "")
    assert status(raw) == 421
    raw = yield deferToThread(exchange, port, b"GET /x HTTP/1.0\r\n\r\n", "")
    assert status(raw) == 200 and seen(raw)["tag"] == "site"


# -- per-request timeouts -----------------------------------------------------------------------

def trickle(port: int, first: bytes, piece: bytes, tls_name: Optional[str] = None,
            pieces: int = 100, delay: float = 0.2) -> bytes:
    """Send ``first``, then ``piece`` every ``delay`` s until the proxy closes; all it sent."""
    sock: Any = connect(port, tls_name or "")
    answer: list[bytes] = []

    def read() -> None:
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (ConnectionResetError, ssl.SSLError, OSError):
            pass
        answer.append(out)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(first)
        for _ in range(pieces):
            if not reader.is_alive():
                break
            time.sleep(delay)
            sock.sendall(piece)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
        pass
    reader.join(20)
    alive = reader.is_alive()
    sock.close()
    assert not alive, "the proxy kept the connection open"
    return answer[0]


@pytest_twisted.inlineCallbacks
def test_a_trickled_head_after_a_first_request_gets_408(proxy_router, web_backends):
    backend = web_backends("site")
    port, tls_port = proxy_port(), proxy_port()
    router = proxy_router({"routes": [
        {"name": "web", "ports": [port], "domains": ["a.test"], "targets": [backend.address],
         "http_request_timeout": 1, "http_keep_alive_timeout": 30},
        {"name": "tls", "ports": [tls_port], "domains": ["a.test"], "tls": "terminate",
         "targets": [backend.address], "http_request_timeout": 1,
         "http_keep_alive_timeout": 30},
    ]})
    # the case: a first request, then the next head one byte at a time
    raw = yield deferToThread(trickle, port, req("GET", "a.test", "/1") + b"G", b"E")
    assert raw.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 Request Timeout" in raw
    # the first head as well, header line by header line
    raw = yield deferToThread(trickle, port, b"GET / HTTP/1.1\r\nHost: a.test\r\n", b"X-A: b\r\n")
    assert status(raw) == 408
    # and on a terminated connection
    raw = yield deferToThread(trickle, tls_port, req("GET", "a.test", "/1") + b"GET / HTTP/1.1",
                              b"\r\nX-A: b", "a.test")
    assert raw.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in raw, raw
    # a head pipelined behind a slow response waits its turn: its timeout starts when the
    # response is relayed, so the slow answer (1.5 s > the 1 s timeout) is not cut short
    raw = yield deferToThread(trickle, port, req("GET", "a.test", "/slow") + b"GET / HTTP/1.1",
                              b"\r\nX-A: b")
    assert raw.startswith(b"HTTP/1.1 200 ") and b"slow" in raw, raw
    assert b"HTTP/1.1 408 " in raw, raw
    stats = router.get_stats()["proxy"]["routes"]
    assert stats["web"]["errors"].get("request_timeout") == 2
    assert stats["tls"]["errors"].get("request_timeout") == 1


@pytest_twisted.inlineCallbacks
def test_an_idle_kept_alive_connection_is_closed_after_http_keep_alive_timeout(proxy_router,
                                                                                web_backends):
    backend = web_backends("site")
    port = proxy_port()
    proxy_router({"routes": [
        {"name": "web", "ports": [port], "domains": ["a.test"], "targets": [backend.address],
         "http_keep_alive_timeout": 1},
    ]})

    def idle() -> tuple[int, bool]:
        with connect(port) as s:
            reader = Reader(s)
            s.sendall(req("GET", "a.test", "/1"))
            code = reader.response()[0]
            return code, reader.closed()     # nothing more sent: the proxy closes
    assert (yield deferToThread(idle)) == (200, True)

    def slow_response_is_not_idle() -> int:
        # a request whose body is still being sent is not idle either: it completes
        with connect(port) as s:
            reader = Reader(s)
            s.sendall(b"POST /p HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\nab")
            time.sleep(1.5)
            s.sendall(b"cd")
            return reader.response()[0]
    assert (yield deferToThread(slow_response_is_not_idle)) == 200
