"""HTTP routing on plain ports: Host and path routing, redirects, forwarded headers."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from dcrouter.proxy import http as httpmod
from dcrouter.proxy.httpstream import HEAD, FramingError, RequestFramer
from tests.proxy.conftest import http_get, proxy_port, recv_all


def test_head_parsing_and_rendering() -> None:
    framer = RequestFramer()
    framer.feed(b"GET /a?b=1 HTTP/1.1\r\nHost: Example.Test:8080\r\n")
    assert framer.next_event() is None
    framer.feed(b"X-Forwarded-For: 10.0.0.1\r\n\r\nbody")
    kind, head = framer.next_event()
    assert kind == HEAD
    assert head.host == "example.test" and head.path == "/a?b=1" and framer.buffer == b"body"
    rendered = httpmod.render_head(head, "192.0.2.7", "http").decode()
    assert "X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\n" in rendered
    assert "X-Forwarded-Proto: http\r\n" in rendered
    for bad in [b"NOT HTTP\r\n\r\n", b"GET / HTTP/1.1\r\n bad\r\n\r\n",
                b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 6000]:
        framer = RequestFramer()
        framer.feed(bad)
        with pytest.raises(FramingError):
            framer.next_event()
    assert httpmod.acme_token("/.well-known/acme-challenge/abc") == "abc"
    assert httpmod.acme_token("/.well-known/acme-challenge/a/b") is None
    assert httpmod.parse_head(b"GET http://h.test:81/x HTTP/1.1").host == "h.test"


@pytest_twisted.inlineCallbacks
def test_host_and_path_routing_redirect_and_forwarded_headers(proxy_router, backends):
    site = backends("site", kind="http")
    api = backends("api", kind="http")
    default = backends("default", kind="http")
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "api", "ports": [port], "domains": ["www.example.test"], "path_prefix": "/api/",
         "targets": [api.address], "add_forwarded_headers": True},
        {"name": "site", "ports": [port], "domains": ["www.example.test"],
         "targets": [site.address]},
        {"name": "secure", "ports": [port], "domains": ["secure.example.test"],
         "redirect_to_https": True},
        {"name": "default", "ports": [port], "domains": ["*"], "targets": [default.address]},
    ]})
    status, _h, body = yield deferToThread(http_get, port, "www.example.test", "/index.html")
    assert status == 200 and json.loads(body)["tag"] == "site"
    assert "x-forwarded-for" not in {k.lower() for k in json.loads(body)["headers"]}
    status, _h, body = yield deferToThread(http_get, port, "WWW.example.test:8080", "/api/v1",
                                           "X-Forwarded-For: 203.0.113.9")
    seen = json.loads(body)
    assert seen["tag"] == "api" and seen["request"] == "GET /api/v1 HTTP/1.1"
    assert seen["headers"]["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert seen["headers"]["X-Forwarded-Proto"] == "http"
    status, headers, _b = yield deferToThread(http_get, port, "secure.example.test", "/p?q=1")
    assert status == 301 and headers["location"] == "https://secure.example.test/p?q=1"
    status, _h, body = yield deferToThread(http_get, port, "unknown.test", "/")
    assert json.loads(body)["tag"] == "default"
    # a real HTTP client library
    def with_urllib() -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/x",
                                     headers={"Host": "www.example.test"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    assert (yield deferToThread(with_urllib))["tag"] == "site"
    stats = router.get_stats()["proxy"]["routes"]
    assert stats["secure"]["total_connections"] == 1
    assert stats["site"]["total_connections"] == 2


@pytest_twisted.inlineCallbacks
def test_no_route_bad_request_and_dead_target(proxy_router, backends):
    port = proxy_port()
    dead = proxy_port()          # nothing listens there
    proxy_router({"routes": [
        {"name": "only", "ports": [port], "domains": ["only.test"], "targets": [f"127.0.0.1:{dead}"],
         "health_check_interval": 0},
    ]})
    status, _h, _b = yield deferToThread(http_get, port, "other.test")
    assert status == 404
    status, _h, _b = yield deferToThread(http_get, port, "only.test")
    assert status == 502

    def garbage() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"\x00\x01 nonsense\r\n\r\n")
            return recv_all(s)
    assert (yield deferToThread(garbage)).startswith(b"HTTP/1.1 400 ")


@pytest_twisted.inlineCallbacks
def test_acme_challenge_is_answered_before_routes(proxy_router, backends):
    site = backends("site", kind="http")
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "all", "ports": [port], "domains": ["*"],
                                       "targets": [site.address], "redirect_to_https": True}]})
    router.by_name["proxy"].challenges["tok123"] = "tok123.thumbprint"
    status, _h, body = yield deferToThread(http_get, port, "any.test",
                                           "/.well-known/acme-challenge/tok123")
    assert status == 200 and body == b"tok123.thumbprint"
    status, _h, _b = yield deferToThread(http_get, port, "any.test",
                                         "/.well-known/acme-challenge/unknown")
    assert status == 301


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_head_framing_never_raises_anything_else(data):
    framer = RequestFramer()
    framer.feed(data + b"\r\n\r\n")
    try:
        event = framer.next_event()
    except FramingError:
        return
    if event is None:           # only stray CRLFs
        return
    kind, head = event
    assert kind == HEAD
    head.host, head.path, httpmod.render_head(head, "192.0.2.1", "http")
    httpmod.redirect_to_https(head)


@pytest_twisted.inlineCallbacks
def test_terminated_https_gets_forwarded_headers(proxy_router, backends):
    import ssl
    site = backends("tls-site", kind="http")
    port = proxy_port()
    proxy_router({"routes": [{"name": "https", "ports": [port], "domains": ["w.test"],
                              "tls": "terminate", "targets": [site.address],
                              "add_forwarded_headers": True}]})

    def get() -> dict:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="w.test") as s:
                s.sendall(b"GET /secure HTTP/1.1\r\nHost: w.test\r\nConnection: close\r\n\r\n")
                data = b""
                while b"}" not in data:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])
    seen = yield deferToThread(get)
    assert seen["request"] == "GET /secure HTTP/1.1"
    assert seen["headers"]["X-Forwarded-Proto"] == "https"
    assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"
