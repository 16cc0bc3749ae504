"""The relay: bounded memory with a slow reader, half-close, idle timeout, long-lived tunnels."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from tests.proxy.conftest import proxy_port, recv_all

#: every test here that starts a proxy runs on the splice relay and on the Twisted fallback
BOTH_RELAYS = True

TOTAL = 200 * 1024 * 1024


def buffered(transport) -> int:
    """Bytes a Twisted TCP transport holds for writing (0 for anything else)."""
    if transport is None:
        return 0
    base = getattr(transport, "transport", None)
    if base is not None and not hasattr(transport, "dataBuffer"):
        transport = base
    data = getattr(transport, "dataBuffer", b"")
    return len(data) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class SlowSink:
    """A backend that waits, then reads in small pieces; answers with the byte count."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        with conn:
            time.sleep(1.0)                     # the sender is far ahead by now
            while True:
                chunk = conn.recv(16384)
                if not chunk:
                    break
                self.received += len(chunk)
            conn.sendall(str(self.received).encode())
        self.server.close()


class FastSource:
    """A backend that sends ``total`` bytes as fast as it can, then closes."""

    def __init__(self, total: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.total = total
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        block = b"\xcd" * (1024 * 1024)
        with conn:
            conn.recv(100)                      # the client's hello
            for _ in range(self.total // len(block)):
                conn.sendall(block)
        self.server.close()


def upload(port: int, total: int, tls_name: str = "") -> bytes:
    """Send ``total`` bytes (over TLS when ``tls_name``), half-close, return the answer."""
    block = b"\xab" * (1024 * 1024)
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock = raw
    if tls_name:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        sock = ctx.wrap_socket(raw, server_hostname=tls_name)
    with sock:
        for _ in range(total // len(block)):
            sock.sendall(block)
        if tls_name:
            # no half-close in TLS: FIN the TCP side and read until the proxy closes, so the
            # client never closes with unread bytes (which would make its kernel send a RST
            # and drop what the proxy had not read yet)
            sock.shutdown(socket.SHUT_WR)      # also drops the TLS layer: raw reads below
            try:
                return recv_all(sock)
            except ConnectionResetError:
                return b""
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def slow_download(port: int) -> int:
    """Ask, wait while the source fills every buffer, then read slowly; returns the byte count."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"go")
        time.sleep(1.0)
        received = 0
        while True:
            chunk = s.recv(16384)
            if not chunk:
                return received
            received += len(chunk)


class BufferWatch:
    """Samples, in the reactor, the largest write buffers the proxy's connections hold."""

    def __init__(self, service) -> None:
        self.service = service
        self.peak_buffer = 0
        self.peak_rss = 0
        self.rss_before = rss_kib()
        self.loop = task.LoopingCall(self.sample)

    def sample(self) -> None:
        for front in list(self.service.connections):
            tunnel = front.tunnel
            if tunnel is None and front.delegate is not None:      # terminated TLS
                inner = getattr(front.delegate, "wrappedProtocol", None)
                tunnel = getattr(inner, "tunnel", None)
            total = buffered(front.transport) + (buffered(tunnel.backend) if tunnel else 0)
            self.peak_buffer = max(self.peak_buffer, total)
        self.peak_rss = max(self.peak_rss, rss_kib() - self.rss_before)

    def __enter__(self) -> "BufferWatch":
        self.loop.start(0.005)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.stop()


@pytest_twisted.inlineCallbacks
def test_200_mb_to_a_slow_reader_keeps_proxy_buffers_bounded(proxy_router):
    sink = SlowSink()
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "bulk", "ports": [port],
                                       "targets": [f"127.0.0.1:{sink.port}"]}]})
    with BufferWatch(router.by_name["proxy"]) as watch:
        reply = yield deferToThread(upload, port, TOTAL)
    assert reply == str(TOTAL).encode()
    assert sink.received == TOTAL
    assert router.get_stats()["proxy"]["routes"]["bulk"]["bytes_in"] == TOTAL
    # without flow control the proxy would hold most of the 200 MB while the sink sleeps
    assert watch.peak_buffer < 2 * 1024 * 1024, watch.peak_buffer
    assert watch.peak_rss < 64 * 1024, watch.peak_rss


@pytest_twisted.inlineCallbacks
def test_200_mb_from_a_fast_target_to_a_slow_client_stays_bounded(proxy_router):
    source = FastSource(TOTAL)
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "down", "ports": [port],
                                       "targets": [f"127.0.0.1:{source.port}"]}]})
    with BufferWatch(router.by_name["proxy"]) as watch:
        received = yield deferToThread(slow_download, port)
    assert received == TOTAL
    assert router.get_stats()["proxy"]["routes"]["down"]["bytes_out"] == TOTAL
    assert watch.peak_buffer < 2 * 1024 * 1024, watch.peak_buffer
    assert watch.peak_rss < 64 * 1024, watch.peak_rss


@pytest_twisted.inlineCallbacks
def test_terminated_tls_to_a_slow_reader_stays_bounded(proxy_router):
    sink = SlowSink()
    total = 48 * 1024 * 1024
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "tls", "ports": [port], "domains": ["*"],
                                       "tls": "terminate", "http": False,
                                       "targets": [f"127.0.0.1:{sink.port}"]}]})
    with BufferWatch(router.by_name["proxy"]) as watch:
        yield deferToThread(upload, port, total, "bulk.test")
        for _ in range(200):
            if sink.received == total:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
    assert sink.received == total
    assert watch.peak_buffer < 2 * 1024 * 1024, watch.peak_buffer
    assert watch.peak_rss < 64 * 1024, watch.peak_rss


@pytest_twisted.inlineCallbacks
def test_half_close_passes_eof_and_keeps_the_reply(proxy_router, backends):
    backend = backends("hc")
    port = proxy_port()
    proxy_router({"routes": [{"name": "hc", "ports": [port], "targets": [backend.address]}]})

    def client() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"last words")
            s.shutdown(socket.SHUT_WR)
            return recv_all(s)
    assert (yield deferToThread(client)) == b"hc:last words"


@pytest_twisted.inlineCallbacks
def test_idle_timeout_closes_silent_tunnels_but_not_busy_ones(proxy_router, backends):
    backend = backends("idle")
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "i", "ports": [port], "targets": [backend.address],
                                       "connection_timeout": 0.6}]})

    def silent() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"a")
            first = s.recv(100)
            try:
                rest = recv_all(s)          # proxy closes after 0.6 s of silence
            except ConnectionResetError:
                rest = b""
            return first + rest

    def chatty() -> int:
        # a WebSocket-like tunnel alive 2 s (over three idle periods), traffic every 0.2 s
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            replies = 0
            for _ in range(10):
                s.sendall(b"p")
                if s.recv(100) == b"idle:p":
                    replies += 1
                time.sleep(0.2)
            return replies
    assert (yield deferToThread(silent)) == b"idle:a"
    assert (yield deferToThread(chatty)) == 10
    assert router.get_stats()["proxy"]["routes"]["i"]["errors"] == {"idle_timeout": 1}
    yield task.deferLater(reactor, 0, lambda: None)


@pytest_twisted.inlineCallbacks
def test_terminated_tunnel_ends_with_close_notify_when_the_target_closes(proxy_router):
    """A target that answers and closes (HTTP/1.0 style): the TLS client gets the answer and
    then close_notify at once (it used to wait for the idle timeout: TLS held its close
    while the target's transport was still registered as its producer)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = proxy_port()
    proxy_router({"routes": [{"name": "t", "ports": [port], "domains": ["*"],
                              "tls": "terminate", "http": False, "connection_timeout": 30,
                              "targets": [f"127.0.0.1:{server.getsockname()[1]}"]}]})

    def target() -> None:
        conn, _ = server.accept()
        conn.recv(100)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        conn.close()

    def client() -> tuple[bytes, float]:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="t.test") as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                start = time.monotonic()
                out = b""
                while True:
                    chunk = s.recv(1000)        # b"" only after close_notify
                    if not chunk:
                        return out, time.monotonic() - start
                    out += chunk
    threading.Thread(target=target, daemon=True).start()
    reply, waited = yield deferToThread(client)
    assert reply.endswith(b"\r\n\r\nok")
    assert waited < 5.0
    server.close()
