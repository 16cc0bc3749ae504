"""The splice(2) relay: byte-exact both ways, half-close, flow control, timeouts, resets, load.

Each test runs a real client and a real backend (threads with blocking
sockets) through a proxy whose passthrough/tcp routes use
:class:`~dcrouter.proxy.splice.SpliceTunnel`; ``test_the_fallback_*`` prove
the Twisted relay takes over when splice is off or missing.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from dcrouter.proxy import splice
from dcrouter.proxy.splice import SpliceTunnel
from dcrouter.proxy.tunnel import Tunnel
from tests.proxy.conftest import proxy_port, recv_all


def pattern(n: int, seed: int) -> bytes:
    """``n`` bytes that differ from block to block (a shifted or lost block changes the hash)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(struct.pack("!QQ", seed, counter)).digest() * 64
        counter += 1
    return bytes(out[:n])


class EchoServer:
    """Echoes every byte back; ``shutdown(SHUT_WR)`` after the client's EOF; hashes what it saw."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.server.getsockname()[1]
        self.digests: list[str] = []
        self.resets = 0
        self.closed = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        digest = hashlib.sha256()
        with conn:
            try:
                while True:
                    chunk = conn.recv(262144)
                    if not chunk:
                        break
                    digest.update(chunk)
                    conn.sendall(chunk)
                conn.shutdown(socket.SHUT_WR)
            except ConnectionResetError:
                self.resets += 1
            except OSError:
                pass
        self.digests.append(digest.hexdigest())
        self.closed += 1

    def close(self) -> None:
        self.server.close()


def read_all(sock: socket.socket) -> bytes:
    """Read until EOF (into a bytearray: ``recv_all``'s concatenation is quadratic)."""
    out = bytearray()
    while True:
        chunk = sock.recv(262144)
        if not chunk:
            return bytes(out)
        out += chunk


def echo_roundtrip(port: int, data: bytes) -> bytes:
    """Send ``data`` while reading the echo in another thread; half-close; return the echo."""
    received: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        reader = threading.Thread(target=lambda: received.append(read_all(s)))
        reader.start()
        view = memoryview(data)
        for i in range(0, len(data), 1 << 20):
            s.sendall(view[i:i + (1 << 20)])
        s.shutdown(socket.SHUT_WR)
        reader.join(60)
    return received[0]


def tunnels(service) -> list:
    return [front.tunnel for front in service.connections if front.tunnel is not None]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest_twisted.inlineCallbacks
def test_bulk_is_byte_exact_both_ways_at_once(proxy_router):
    echo = EchoServer()
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "bulk", "ports": [port],
                                       "targets": [f"127.0.0.1:{echo.port}"]}]})
    data = pattern(64 * 1024 * 1024 + 12345, seed=1)
    seen: list = []

    def client() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        # the probe above also showed which relay serves the route
        return echo_roundtrip(port, data)

    def look() -> None:
        seen.extend(type(t) for t in tunnels(router.by_name["proxy"]))
    loop = task.LoopingCall(look)
    loop.start(0.01)
    try:
        echoed = yield deferToThread(client)
    finally:
        loop.stop()
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(data).hexdigest()
    assert len(echoed) == len(data)
    assert SpliceTunnel in seen and Tunnel not in seen
    for _ in range(100):
        if router.get_stats()["proxy"]["routes"]["bulk"]["active_connections"] == 0:
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    stats = router.get_stats()["proxy"]["routes"]["bulk"]
    assert stats["bytes_in"] == stats["bytes_out"] == len(data) + 1
    assert stats["active_connections"] == 0
    echo.close()


@pytest_twisted.inlineCallbacks
def test_a_target_given_by_name_is_spliced_through_its_twisted_transport(proxy_router):
    """``localhost:port`` goes through Twisted's name resolution and client transport; the
    tunnel then borrows that transport's socket (and hands it back to close it)."""
    echo = EchoServer()
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "named", "ports": [port],
                                       "targets": [f"localhost:{echo.port}"]}]})
    data = pattern(16 * 1024 * 1024 + 7, seed=11)
    seen: list = []
    loop = task.LoopingCall(lambda: seen.extend(
        type(t) for t in tunnels(router.by_name["proxy"])))
    loop.start(0.005)
    try:
        echoed = yield deferToThread(echo_roundtrip, port, data)
    finally:
        loop.stop()
    assert echoed == data
    assert SpliceTunnel in seen and Tunnel not in seen
    for _ in range(100):
        if not router.by_name["proxy"].connections and echo.closed == 1:
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    assert echo.closed == 1
    assert router.get_stats()["proxy"]["routes"]["named"]["bytes_out"] == len(data)
    echo.close()


@pytest_twisted.inlineCallbacks
def test_half_close_from_the_client_and_from_the_target(proxy_router):
    """Client EOF reaches the target, which still answers; target EOF reaches the client,
    which still sends."""
    server = socket.create_server(("127.0.0.1", 0))
    port = proxy_port()
    proxy_router({"routes": [{"name": "hc", "ports": [port],
                              "targets": [f"127.0.0.1:{server.getsockname()[1]}"]}]})
    log: list[str] = []

    def target() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                first = conn.recv(100)
                if first == b"client-first":
                    log.append("eof" if conn.recv(100) == b"" else "no eof")
                    conn.sendall(b"answer after eof")
                else:
                    conn.sendall(b"bye")
                    conn.shutdown(socket.SHUT_WR)
                    log.append(recv_all(conn).decode())

    def client() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"client-first")
            s.shutdown(socket.SHUT_WR)
            one = recv_all(s)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"target-first")
            two = recv_all(s)               # the target's EOF arrives ...
            s.sendall(b"still talking")     # ... and our direction is still open
            s.shutdown(socket.SHUT_WR)
            three = recv_all(s)
        return [one, two, three]
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    replies = yield deferToThread(client)
    yield deferToThread(thread.join, 10)
    assert replies == [b"answer after eof", b"bye", b""]
    assert log == ["eof", "still talking"]
    server.close()


@pytest_twisted.inlineCallbacks
def test_slow_reader_is_flow_controlled_with_pipes_bounded(proxy_router):
    """A target that sends 64 MiB to a client that reads slowly: the pipe never holds more
    than its size, the target is throttled (it cannot finish early), every byte arrives."""
    total = 64 * 1024 * 1024
    server = socket.create_server(("127.0.0.1", 0))
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "slow", "ports": [port],
                                       "targets": [f"127.0.0.1:{server.getsockname()[1]}"]}]})
    finished: list[float] = []

    def source() -> None:
        conn, _ = server.accept()
        block = b"\xcd" * (1 << 20)
        with conn:
            conn.recv(10)
            for _ in range(total // len(block)):
                conn.sendall(block)
            finished.append(time.monotonic())

    def slow_client() -> tuple[int, float]:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            s.sendall(b"go")
            time.sleep(1.0)                 # everything in between fills up
            stalled_at = time.monotonic()
            got = 0
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return got, stalled_at
                got += len(chunk)
    peak = [0]

    def sample() -> None:
        for t in tunnels(router.by_name["proxy"]):
            if isinstance(t, SpliceTunnel) and t.down is not None:
                peak[0] = max(peak[0], t.down.in_pipe + len(t.down.prefix))
                assert t.down.in_pipe <= t.down.size
    threading.Thread(target=source, daemon=True).start()
    loop = task.LoopingCall(sample)
    loop.start(0.002)
    try:
        got, stalled_at = yield deferToThread(slow_client)
    finally:
        loop.stop()
    assert got == total
    # the 64 MiB could not all be buffered: the source finished only after the client read
    assert finished and finished[0] > stalled_at
    assert 0 < peak[0] <= splice.PIPE_SIZE
    server.close()


@pytest_twisted.inlineCallbacks
def test_idle_timeout_closes_a_silent_spliced_tunnel(proxy_router):
    echo = EchoServer()
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "idle", "ports": [port],
                                       "targets": [f"127.0.0.1:{echo.port}"],
                                       "connection_timeout": 0.5}]})

    def client() -> tuple[bytes, bytes, float]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"a")
            first = s.recv(10)
            start = time.monotonic()
            try:
                rest = recv_all(s)
            except ConnectionResetError:
                rest = b""
            return first, rest, time.monotonic() - start
    first, rest, waited = yield deferToThread(client)
    assert (first, rest) == (b"a", b"")
    assert 0.3 < waited < 5.0
    assert router.get_stats()["proxy"]["routes"]["idle"]["errors"] == {"idle_timeout": 1}
    echo.close()


@pytest_twisted.inlineCallbacks
def test_a_reset_on_either_side_closes_the_other_and_releases(proxy_router):
    echo = EchoServer()
    server = socket.create_server(("127.0.0.1", 0))
    port, port2 = proxy_port(), proxy_port()
    router = proxy_router({"routes": [
        {"name": "rst-client", "ports": [port], "targets": [f"127.0.0.1:{echo.port}"]},
        {"name": "rst-target", "ports": [port2],
         "targets": [f"127.0.0.1:{server.getsockname()[1]}"]}]})

    def client_resets() -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"hello")
        assert s.recv(10) == b"hello"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()                           # RST

    def target_resets() -> bytes:
        def target() -> None:
            conn, _ = server.accept()
            conn.recv(10)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        threading.Thread(target=target, daemon=True).start()
        with socket.create_connection(("127.0.0.1", port2), timeout=10) as s:
            s.sendall(b"hi")
            try:
                return recv_all(s)
            except ConnectionResetError:
                return b"reset"
    yield deferToThread(client_resets)
    assert (yield deferToThread(target_resets)) in (b"", b"reset")
    for _ in range(200):
        if echo.closed == 1 and not router.by_name["proxy"].connections:
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    assert echo.closed == 1                  # the target side was closed, not left open
    assert not router.by_name["proxy"].connections
    for name in ("rst-client", "rst-target"):
        assert router.get_stats()["proxy"]["routes"][name]["active_connections"] == 0
    echo.close()
    server.close()


@pytest_twisted.inlineCallbacks
def test_many_concurrent_tunnels_and_no_descriptor_leak(proxy_router):
    echo = EchoServer()
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "many", "ports": [port],
                                       "targets": [f"127.0.0.1:{echo.port}"]}]})
    yield deferToThread(echo_roundtrip, port, b"warm-up")     # the pool holds a pipe pair
    for _ in range(100):
        if not router.by_name["proxy"].connections:
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    before = open_fds()
    n = 150
    results: list[bool] = []
    barrier = threading.Barrier(n, timeout=30)

    def one(i: int) -> None:
        data = pattern(200_000 + i, seed=i)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            barrier.wait()                  # all n tunnels open at the same time
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(recv_all(s)))
            reader.start()
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reader.join(60)
        results.append(bool(received) and received[0] == data)

    def run_all() -> None:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    peak = [0]
    loop = task.LoopingCall(lambda: peak.__setitem__(
        0, max(peak[0], sum(isinstance(t, SpliceTunnel) for t in tunnels(router.by_name["proxy"])))))
    loop.start(0.01)
    try:
        yield deferToThread(run_all)
    finally:
        loop.stop()
    assert results.count(True) == n
    assert peak[0] > n // 2
    for _ in range(200):
        if not router.by_name["proxy"].connections:
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    assert router.get_stats()["proxy"]["routes"]["many"]["active_connections"] == 0
    # sockets closed; pipes back in the bounded pool or closed
    assert open_fds() <= before + 2 * splice.POOL_SIZE
    assert len(splice._pool) <= splice.POOL_SIZE
    echo.close()


@pytest_twisted.inlineCallbacks
def test_a_proxy_header_is_sent_before_the_spliced_stream(proxy_router):
    echo = EchoServer()
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "pp", "ports": [port], "send_proxy_protocol": "v1",
                                       "targets": [f"127.0.0.1:{echo.port}"]}]})
    data = pattern(3 * 1024 * 1024, seed=7)
    echoed = yield deferToThread(echo_roundtrip, port, data)
    assert echoed.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    header, _, rest = echoed.partition(b"\r\n")
    assert rest == data
    stats = router.get_stats()["proxy"]["routes"]["pp"]
    assert stats["bytes_in"] == len(data)             # the header is ours, not the client's
    echo.close()


@pytest_twisted.inlineCallbacks
def test_the_fallback_relays_when_splice_is_off_or_missing(proxy_router, monkeypatch):
    echo = EchoServer()
    port, port2 = proxy_port(), proxy_port()
    off = proxy_router({"splice": False, "routes": [{"name": "off", "ports": [port],
                                                     "targets": [f"127.0.0.1:{echo.port}"]}]})
    assert off.by_name["proxy"].splice is False
    monkeypatch.setattr(splice, "_splice", None)       # a platform without os.splice
    missing = proxy_router({"routes": [{"name": "missing", "ports": [port2],
                                        "targets": [f"127.0.0.1:{echo.port}"]}]})
    assert missing.by_name["proxy"].splice is False
    seen: list = []

    def look() -> None:
        for router in (off, missing):
            seen.extend(type(t) for t in tunnels(router.by_name["proxy"]))
    loop = task.LoopingCall(look)
    loop.start(0.005)
    try:
        data = pattern(8 * 1024 * 1024, seed=3)
        assert (yield deferToThread(echo_roundtrip, port, data)) == data
        assert (yield deferToThread(echo_roundtrip, port2, data)) == data
    finally:
        loop.stop()
    assert Tunnel in seen and SpliceTunnel not in seen
    echo.close()


@pytest_twisted.inlineCallbacks
def test_a_reset_while_the_client_is_not_reading_logs_nothing_and_releases(proxy_router):
    """The client stops reading (the pipe towards it is full, the tunnel waits to write),
    then resets: the tunnel closes both sides without an error in the log."""
    from twisted.logger import globalLogPublisher
    failures: list = []

    def observe(event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)
    globalLogPublisher.addObserver(observe)
    server = socket.create_server(("127.0.0.1", 0))
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "r", "ports": [port],
                                       "targets": [f"127.0.0.1:{server.getsockname()[1]}"]}]})
    sent: list[int] = []

    def source() -> None:
        conn, _ = server.accept()
        conn.recv(10)
        total = 0
        try:
            while total < 256 * 1024 * 1024:
                conn.sendall(b"\xee" * 65536)
                total += 65536
        except OSError:
            pass
        sent.append(total)
        conn.close()

    def client() -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        s.sendall(b"go")
        time.sleep(0.5)                     # every buffer on the way fills up
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    threading.Thread(target=source, daemon=True).start()
    try:
        yield deferToThread(client)
        for _ in range(250):
            if sent and not router.by_name["proxy"].connections:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert sent and sent[0] < 256 * 1024 * 1024      # the target was cut off, not drained
    assert not router.by_name["proxy"].connections
    assert router.get_stats()["proxy"]["routes"]["r"]["active_connections"] == 0
    assert failures == []
    server.close()
