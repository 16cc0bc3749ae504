"""The relay: bounded memory with a slow reader, half-close, idle timeout, long-lived tunnels."""

from __future__ import annotations

import socket
import threading
import time

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from tests.proxy.conftest import proxy_port, recv_all

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
    """A backend that waits, then reads in small pieces; counts what it got."""

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


@pytest_twisted.inlineCallbacks
def test_200_mb_to_a_slow_reader_keeps_proxy_buffers_bounded(proxy_router):
    sink = SlowSink()
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "bulk", "ports": [port],
                                       "targets": [f"127.0.0.1:{sink.port}"]}]})
    service = router.by_name["proxy"]
    peak = {"buffer": 0, "rss": 0}
    rss_before = rss_kib()

    def sample() -> None:
        for front in list(service.connections):
            tunnel = front.tunnel
            total = buffered(front.transport) + (buffered(tunnel.backend) if tunnel else 0)
            peak["buffer"] = max(peak["buffer"], total)
        peak["rss"] = max(peak["rss"], rss_kib() - rss_before)
    sampler = task.LoopingCall(sample)
    sampler.start(0.005)

    def send() -> bytes:
        block = b"\xab" * (1024 * 1024)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            for _ in range(TOTAL // len(block)):
                s.sendall(block)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s)
    try:
        reply = yield deferToThread(send)
    finally:
        sampler.stop()
    assert reply == str(TOTAL).encode()
    assert sink.received == TOTAL
    stats = router.get_stats()["proxy"]["routes"]["bulk"]
    assert stats["bytes_in"] == TOTAL
    # without flow control the proxy would hold most of the 200 MB while the sink sleeps
    assert peak["buffer"] < 2 * 1024 * 1024, peak
    assert peak["rss"] < 64 * 1024, peak


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
