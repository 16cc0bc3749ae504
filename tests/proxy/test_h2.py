"""HTTP/2 on terminated routes (issue 15): curl --http2, nghttp and h2load against the proxy, and
scripted clients (the ``h2`` library over ``ssl``) for limits and floods: max concurrent streams,
rapid reset (CVE-2023-44487), CONTINUATION floods (CVE-2024-27316 class), HPACK bombs, SETTINGS
and PING floods, 421 for an :authority of another route, flow control with a slow reader."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from typing import Any, Optional

import h2.config
import h2.connection
import h2.events
import pytest
import pytest_twisted
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from tests.proxy.conftest import proxy_port
from tests.proxy.test_httpstream import RawBackend, web_backends  # noqa: F401


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: apt-get install nghttp2-client (make test installs it)" \
        if name in ("nghttp", "h2load") else f"{name} is missing"
    return path


def curl(port: int, name: str, path: str = "/", extra: Optional[list[str]] = None) -> dict:
    """curl --http2 over TLS (SNI ``name``); returns the status, the protocol and the body."""
    out = subprocess.run(
        [tool("curl"), "-sk", "--http2", "--connect-to", f"{name}:{port}:127.0.0.1:{port}",
         "-o", "-", "-w", "\n%{http_code} %{http_version}", *(extra or []),
         f"https://{name}:{port}{path}"], capture_output=True, timeout=30)
    body, _, tail = out.stdout.rpartition(b"\n")
    code, version = tail.decode().split()
    return {"status": int(code), "version": version, "body": body}


def h2_client(port: int, name: str, settings: Optional[dict] = None) -> tuple[Any, Any]:
    """A TLS socket with ALPN h2 and an h2 client connection on it (preface sent)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20),
                           server_hostname=name)
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                header_encoding="utf-8"))
    conn.initiate_connection()
    if settings:
        conn.update_settings(settings)
    sock.sendall(conn.data_to_send())
    return sock, conn


def read_events(sock: Any, conn: Any, until: Any, limit: float = 15.0) -> list:
    """Events until ``until(events)`` is true or the server closes."""
    events: list = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not until(events):
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, socket.timeout):
            break
        if not data:
            events.append("closed")
            break
        events.extend(conn.receive_data(data))
        pending = conn.data_to_send()
        if pending:
            try:
                sock.sendall(pending)
            except OSError:
                pass
    return events


def request(name: str, path: str = "/", method: str = "GET") -> list:
    return [(":method", method), (":scheme", "https"), (":authority", name), (":path", path)]


def tls_route(address: str, name: str = "h.test", **extra: Any) -> dict:
    return {"name": "h2", "ports": [proxy_port()], "domains": [name], "tls": "terminate",
            "targets": [address], "add_forwarded_headers": True, **extra}


@pytest_twisted.inlineCallbacks
def test_curl_http2_streams_reach_an_http11_backend(proxy_router, web_backends, tmp_path):
    site = web_backends("site")
    route = tls_route(site.address)
    port = route["ports"][0]
    router = proxy_router({"routes": [route]})
    got = yield deferToThread(curl, port, "h.test", "/x?y=1")
    assert got["version"] == "2" and got["status"] == 200
    seen = json.loads(got["body"])
    assert seen["tag"] == "site" and seen["uri"] == "/x?y=1" and seen["method"] == "GET"
    assert seen["headers"]["host"] == [f"h.test:{port}"]
    assert seen["headers"]["x-forwarded-proto"] == ["https"]
    assert seen["headers"]["x-forwarded-for"] == ["127.0.0.1"]
    body = tmp_path / "body"
    body.write_bytes(b"x" * 300000)
    posted = yield deferToThread(curl, port, "h.test", "/up", ["--data-binary", f"@{body}"])
    assert posted["status"] == 200 and json.loads(posted["body"])["body_len"] == 300000
    stats = router.get_stats()["proxy"]["routes"]["h2"]
    assert stats["requests"] == 2
    # nghttp: several streams on one connection, frames shown
    out = yield deferToThread(subprocess.run, [
        tool("nghttp"), "-nv", "-m", "4", f"https://127.0.0.1:{port}/a", "-H", ":authority: h.test"],
        capture_output=True, timeout=30)
    text = out.stdout.decode("latin-1")
    assert out.returncode == 0 and text.count(":status: 200") == 4
    assert "SETTINGS_MAX_CONCURRENT_STREAMS(0x03):100" in text
    # h2load: 400 requests, 4 connections x 10 streams, every one answered 2xx
    out = yield deferToThread(subprocess.run, [
        tool("h2load"), "-n", "400", "-c", "4", "-m", "10", f"https://h.test:{port}/load",
        "--connect-to", f"127.0.0.1:{port}"], capture_output=True, timeout=60)
    text = out.stdout.decode("latin-1")
    assert "400 succeeded" in text and "400 2xx" in text and "Application protocol: h2" in text


@pytest_twisted.inlineCallbacks
def test_authority_of_another_route_gets_421_and_http2_can_be_turned_off(proxy_router,
                                                                         web_backends):
    a, b = web_backends("a"), web_backends("b")
    port = proxy_port()
    off = proxy_port()
    proxy_router({"routes": [
        {"name": "a", "ports": [port], "domains": ["a.test"], "tls": "terminate",
         "targets": [a.address]},
        {"name": "b", "ports": [port], "domains": ["b.test"], "tls": "terminate",
         "targets": [b.address]},
        {"name": "old", "ports": [off], "domains": ["o.test"], "tls": "terminate",
         "targets": [a.address], "http2": False},
    ]})

    def client() -> list:
        sock, conn = h2_client(port, "a.test")
        with sock:
            statuses = []
            for stream_id, name in [(1, "a.test"), (3, "b.test"), (5, "A.TEST"), (7, "x.test")]:
                conn.send_headers(stream_id, request(name, f"/{name}"), end_stream=True)
                sock.sendall(conn.data_to_send())
                events = read_events(sock, conn, lambda ev, s=stream_id: any(
                    isinstance(e, h2.events.StreamEnded) and e.stream_id == s for e in ev))
                statuses += [dict(e.headers)[":status"] for e in events
                             if isinstance(e, h2.events.ResponseReceived)]
        # :authority and Host disagreeing (HTTP/1.1 would route by Host): a malformed request,
        # h2 ends the connection with PROTOCOL_ERROR
        sock, conn = h2_client(port, "a.test")
        with sock:
            conn.config.validate_outbound_headers = False
            conn.send_headers(1, request("a.test", "/") + [("host", "b.test")], end_stream=True)
            sock.sendall(conn.data_to_send())
            events = read_events(sock, conn, lambda ev: "closed" in ev or goaway(ev) is not None)
            statuses.append(str(goaway(events)))
        return statuses
    assert (yield deferToThread(client)) == ["200", "421", "200", "421", "1"]
    got = yield deferToThread(curl, off, "o.test", "/")
    assert got["status"] == 200 and got["version"] == "1.1"       # ALPN http/1.1 only


def holding_backend(accepted: list, stop: Any) -> Any:
    """A target that takes connections and never answers (streams stay open)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    conns: list = []

    def run() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not stop.is_set():
            try:
                conn, _ = server.accept()
            except (socket.timeout, OSError):
                continue
            accepted.append(1)
            conns.append(conn)
        for c in conns:
            c.close()
        server.close()
    import threading
    threading.Thread(target=run, daemon=True).start()
    return server


def goaway(events: list) -> Optional[int]:
    for e in events:
        if isinstance(e, h2.events.ConnectionTerminated):
            return int(e.error_code)
    return None


@pytest_twisted.inlineCallbacks
def test_concurrent_streams_and_rapid_reset_are_bounded(proxy_router):
    import threading
    accepted: list = []
    stop = threading.Event()
    server = holding_backend(accepted, stop)
    route = tls_route(f"127.0.0.1:{server.getsockname()[1]}", http2_max_concurrent_streams=10,
                      health_check_interval=0)
    port = route["ports"][0]
    router = proxy_router({"routes": [route]})

    def too_many() -> tuple:
        sock, conn = h2_client(port, "h.test")
        with sock:
            read_events(sock, conn, lambda ev: any(
                isinstance(e, h2.events.RemoteSettingsChanged) for e in ev))
            conn.update_settings({})            # (any frame: makes sure SETTINGS were seen)
            assert conn.remote_settings.max_concurrent_streams == 10
            # h2 would refuse to open the 11th itself: send it anyway, frames by hand
            for i in range(11):
                conn.send_headers(1 + 2 * i, request("h.test", f"/{i}"), end_stream=True) \
                    if i < 10 else None
            raw = conn.data_to_send()
            extra = HeadersFrame(21)
            extra.data = Encoder().encode(request("h.test", "/10"))
            extra.flags = {"END_HEADERS", "END_STREAM"}
            sock.sendall(raw + extra.serialize())
            events = read_events(sock, conn, lambda ev: "closed" in ev or any(
                isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated))
                for e in ev), limit=5)
            return events
    events = yield deferToThread(too_many)
    refused = [e for e in events if isinstance(e, h2.events.StreamReset) and e.stream_id == 21]
    assert refused or goaway(events) is not None
    for _ in range(50):
        if len(accepted) >= 10:
            break
        yield task.deferLater(reactor, 0.05, lambda: None)
    assert len(accepted) <= 10

    def rapid_reset() -> tuple:
        sock, conn = h2_client(port, "h.test")
        with sock:
            sent = 0
            try:
                for i in range(2000):
                    stream_id = conn.get_next_available_stream_id()
                    conn.send_headers(stream_id, request("h.test", "/r"), end_stream=True)
                    conn.reset_stream(stream_id)
                    sock.sendall(conn.data_to_send())
                    sent += 1
            except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
                pass
            events = read_events(sock, conn, lambda ev: "closed" in ev or goaway(ev) is not None)
            return sent, goaway(events)
    before = len(accepted)
    sent, code = yield deferToThread(rapid_reset)
    assert code == 0xb                                   # ENHANCE_YOUR_CALM
    yield task.deferLater(reactor, 0.3, lambda: None)
    assert len(accepted) - before < 60                   # not one target connection per reset
    assert router.get_stats()["proxy"]["routes"]["h2"]["errors"].get("h2_flood") == 1
    stop.set()


def flood(port: int, frames: bytes, settings: Optional[dict] = None) -> Optional[int]:
    sock, conn = h2_client(port, "h.test", settings)
    with sock:
        try:
            for i in range(0, len(frames), 16384):
                sock.sendall(frames[i:i + 16384])
        except (OSError, ssl.SSLError):
            pass
        events = read_events(sock, conn, lambda ev: "closed" in ev or goaway(ev) is not None)
        return goaway(events)


@pytest_twisted.inlineCallbacks
def test_continuation_hpack_ping_and_settings_floods_end_the_connection(proxy_router,
                                                                        web_backends):
    site = web_backends("site")
    accepted = []
    build = site.port.factory.buildProtocol
    site.port.factory.buildProtocol = lambda addr: (accepted.append(1), build(addr))[1]
    route = tls_route(site.address, http2_max_header_list_size=8192)
    port = route["ports"][0]
    router = proxy_router({"routes": [route]})
    # CONTINUATION flood: a header block that never ends
    first = HeadersFrame(1)
    first.data = Encoder().encode(request("h.test"))
    frames = first.serialize()
    for _ in range(200):
        more = ContinuationFrame(1)
        more.data = b"\x00" * 2000                      # junk that would only grow a buffer
        frames += more.serialize()
    code = yield deferToThread(flood, port, frames)
    assert code is not None and code != 0
    # HPACK bomb: one big entry in the dynamic table, then referenced over and over
    encoder = Encoder()
    bomb = HeadersFrame(1)
    bomb.data = encoder.encode(request("h.test") + [("x-bomb", "a" * 4000)]) + \
        b"".join(encoder.encode([("x-bomb", "a" * 4000)]) for _ in range(100))
    bomb.flags = {"END_HEADERS", "END_STREAM"}
    assert len(bomb.data) < 5000
    code = yield deferToThread(flood, port, bomb.serialize())
    assert code is not None and code != 0
    # PING and SETTINGS floods
    from hyperframe.frame import PingFrame, SettingsFrame
    pings = b"".join(PingFrame(0, opaque_data=b"%08d" % i).serialize() for i in range(2000))
    assert (yield deferToThread(flood, port, pings)) == 0xb
    settings = b"".join(SettingsFrame(0, settings={4: 65535}).serialize() for _ in range(2000))
    assert (yield deferToThread(flood, port, settings)) == 0xb
    assert accepted == []                               # no flood reached the target
    errors = router.get_stats()["proxy"]["routes"]["h2"]["errors"]
    assert errors.get("h2_flood") == 2 and errors.get("bad_http2") == 2


@pytest_twisted.inlineCallbacks
def test_a_client_that_does_not_open_its_window_holds_the_target_back(proxy_router):
    size = 48 << 20
    progress = [0]

    def script(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"z" * 65536
        for _ in range(size // len(block)):
            conn.sendall(block)
            progress[0] += len(block)
        conn.recv(1)

    backend = RawBackend(script)
    route = tls_route(backend.address, health_check_interval=0)
    port = route["ports"][0]
    proxy_router({"routes": [route]})

    def client() -> tuple:
        sock, conn = h2_client(port, "h.test")
        with sock:
            conn.send_headers(1, request("h.test", "/big"), end_stream=True)
            sock.sendall(conn.data_to_send())
            got = 0
            owed: list = []
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:           # read, never acknowledge
                sock.settimeout(0.2)
                try:
                    data = sock.recv(65536)
                except (socket.timeout, ssl.SSLError):
                    continue
                for e in conn.receive_data(data):
                    if isinstance(e, h2.events.DataReceived):
                        got += len(e.data)
                        owed.append(e.flow_controlled_length)
            held, sent_while_held = got, progress[0]
            for n in owed:
                conn.acknowledge_received_data(n, 1)
            sock.sendall(conn.data_to_send())
            sock.settimeout(20)
            done = False
            while not done:                               # now take it all
                data = sock.recv(1 << 20)
                assert data, "closed early"
                for e in conn.receive_data(data):
                    if isinstance(e, h2.events.DataReceived):
                        got += len(e.data)
                        conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    elif isinstance(e, h2.events.StreamEnded):
                        done = True
                sock.sendall(conn.data_to_send())
            return held, sent_while_held, got
    held, sent_while_held, got = yield deferToThread(client)
    assert held <= 65535                                 # the initial window, no more
    assert sent_while_held < 16 << 20                    # the target was paused, not drained
    assert got == size
