"""Load balancing: round-robin spread, least-connections, failover and health checks."""

from __future__ import annotations

import socket
from collections import Counter

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from dcrouter.proxy.balancer import Balancer
from tests.proxy.conftest import proxy_port


def echo_once(port: int, payload: bytes = b"x") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        return s.recv(1024)


def test_order_round_robin_and_least_connections() -> None:
    b = Balancer([("a", 1), ("b", 2), ("c", 3)])
    firsts = [b.order()[0].host for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    b.targets[1].healthy = False
    order = [t.host for t in b.order()]
    assert order[-1] == "b"
    firsts = [b.order()[0].host for _ in range(4)]
    assert "b" not in firsts and Counter(firsts) == Counter({"a": 2, "c": 2})
    lc = Balancer([("a", 1), ("b", 2)], "least-connections")
    lc.targets[0].active = 5
    assert [lc.order()[0].host for _ in range(3)] == ["b", "b", "b"]


@pytest_twisted.inlineCallbacks
def test_round_robin_spread_and_failover_when_a_target_dies(proxy_router, backends):
    one, two, three = backends("one"), backends("two"), backends("three")
    port = proxy_port()
    router = proxy_router({"routes": [{
        "name": "lb", "ports": [port], "targets": [one.address, two.address, three.address],
        "health_check_interval": 0.2}]})
    replies = []
    for _ in range(9):
        replies.append((yield deferToThread(echo_once, port)).split(b":")[0])
    assert Counter(replies) == Counter({b"one": 3, b"two": 3, b"three": 3})
    # target two dies: every connection still succeeds (failover), none goes to two
    address_two = two.address
    yield two.stop()
    replies = []
    for _ in range(6):
        replies.append((yield deferToThread(echo_once, port)).split(b":")[0])
    assert b"two" not in replies and len(replies) == 6
    health = router.get_stats()["proxy"]["routes"]["lb"]["targets"]
    assert health[address_two]["healthy"] is False
    # it comes back on the same port: the health check returns it to the rotation
    port_two = int(address_two.rsplit(":", 1)[1])
    backends("two", port=port_two)
    for _ in range(50):
        if router.get_stats()["proxy"]["routes"]["lb"]["targets"][address_two]["healthy"]:
            break
        yield task.deferLater(reactor, 0.1, lambda: None)
    replies = []
    for _ in range(6):
        replies.append((yield deferToThread(echo_once, port)).split(b":")[0])
    assert b"two" in replies


@pytest_twisted.inlineCallbacks
def test_least_connections_prefers_the_idle_target(proxy_router, backends):
    busy, idle = backends("busy"), backends("idle")
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "lc", "ports": [port], "targets": [busy.address, idle.address],
                              "load_balancing": "least-connections"}]})
    # hold two connections open; they spread over both, then a third goes to the idle one
    socks = []

    def open_held() -> bytes:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
        s.sendall(b"h")
        return s.recv(100)
    first = yield deferToThread(open_held)
    assert first in (b"busy:h", b"idle:h")
    held_on = first.split(b":")[0]
    replies = []
    try:
        for _ in range(3):
            replies.append((yield deferToThread(echo_once, port)).split(b":")[0])
            # wait until the proxy has seen the short connection close
            for _ in range(100):
                if router.get_stats()["proxy"]["routes"]["lc"]["active_connections"] == 1:
                    break
                yield task.deferLater(reactor, 0.02, lambda: None)
        assert held_on not in replies
    finally:
        for s in socks:
            s.close()
