"""The proxy service: reload (atomic route swap, re-binding), draining, stats."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from dcrouter.config import load_config
from tests.proxy.conftest import proxy_port

#: every test here that starts a proxy runs on the splice relay and on the Twisted fallback
BOTH_RELAYS = True
from tests.support.configs import write_config
from tests.support.router import start_router, stop_router


def echo(port: int, payload: bytes = b"x") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        return s.recv(100)


def connect_fails(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def config(tmp_path, routes: list) -> dict:
    return {"router": {"state_dir": str(tmp_path / "state"), "shutdown_timeout": 3},
            "proxy": {"listen": "127.0.0.1", "routes": routes}}


@pytest_twisted.inlineCallbacks
def test_reload_swaps_routes_rebinds_ports_and_keeps_open_tunnels(tmp_path, backends):
    old, new = backends("old"), backends("new")
    p1, p2, p3 = proxy_port(), proxy_port(), proxy_port()
    path = write_config(str(tmp_path / "c.toml"), config(tmp_path, [
        {"name": "a", "ports": [p1], "targets": [old.address]},
        {"name": "gone", "ports": [p3], "targets": [old.address]},
    ]))
    router = start_router(load_config(path), config_path=path)
    held = None
    try:
        def open_held() -> socket.socket:
            s = socket.create_connection(("127.0.0.1", p1), timeout=10)
            s.sendall(b"1")
            assert s.recv(100) == b"old:1"
            return s
        held = yield deferToThread(open_held)
        service = router.by_name["proxy"]
        listener_p1 = [port for spec, port in service.listeners.ports.items() if spec.port == p1]
        write_config(path, config(tmp_path, [
            {"name": "b", "ports": [p2], "targets": [new.address]},
            {"name": "a", "ports": [p1], "targets": [new.address]},
        ]))
        assert (yield router.reload()) is True
        # p1 kept its listening socket although its route moved in the list
        assert [port for spec, port in service.listeners.ports.items()
                if spec.port == p1] == listener_p1
        assert (yield deferToThread(echo, p1)) == b"new:x"
        assert (yield deferToThread(echo, p2)) == b"new:x"
        assert (yield deferToThread(connect_fails, p3))

        def still_old() -> bytes:
            held.sendall(b"2")
            return held.recv(100)
        assert (yield deferToThread(still_old)) == b"old:2"
        stats = router.get_stats()["proxy"]
        assert stats["routes"]["a"]["total_connections"] == 2
        assert stats["routes"]["a"]["active_connections"] == 1
        assert set(stats["routes"]) == {"a", "b"}
        ports = sorted(p for _proto, _h, p in router.by_name["proxy"].bound_addresses())
        assert ports == sorted([p1, p2])
    finally:
        if held is not None:
            held.close()
        yield stop_router(router)


@pytest_twisted.inlineCallbacks
def test_drain_waits_for_tunnels_and_stop_accepting_closes_listeners(proxy_router, backends):
    backend = backends("d")
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "d", "ports": [port], "targets": [backend.address]}]})
    service = router.by_name["proxy"]
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        yield deferToThread(s.sendall, b"x")
        assert (yield deferToThread(s.recv, 100)) == b"d:x"
        yield service.stop_accepting()
        assert (yield deferToThread(connect_fails, port))
        drained = service.drain()
        yield task.deferLater(reactor, 0.1, lambda: None)
        assert not drained.called
        # the open tunnel still works while draining
        yield deferToThread(s.sendall, b"y")
        assert (yield deferToThread(s.recv, 100)) == b"d:y"
    finally:
        s.close()
    yield defer.DeferredList([drained]).addCallback(lambda _: None)
    assert drained.called
    assert service.get_stats()["active_connections"] == 0


@pytest_twisted.inlineCallbacks
def test_proxy_figures_reach_the_metrics_endpoint(proxy_router, backends):
    import urllib.request
    from tests.support.net import free_port
    backend = backends("m")
    port, api_port = proxy_port(), free_port()
    router = proxy_router({"routes": [{"name": "metered", "ports": [port],
                                       "targets": [backend.address]}]},
                          api={"listen": "127.0.0.1", "port": api_port})
    assert (yield deferToThread(echo, port, b"12345")) == b"m:12345"
    for _ in range(100):
        if router.get_stats()["proxy"]["routes"]["metered"]["active_connections"] == 0:
            break
        yield task.deferLater(reactor, 0.02, lambda: None)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as r:
            return r.read().decode()
    text = yield deferToThread(scrape)
    assert 'dcrouter_proxy_connections_total{route="metered"} 1.0' in text
    assert 'dcrouter_proxy_bytes_total{direction="in",route="metered"} 5.0' in text
    assert 'dcrouter_proxy_bytes_total{direction="out",route="metered"} 7.0' in text


@pytest_twisted.inlineCallbacks
def test_tunnels_left_at_the_shutdown_deadline_are_closed(tmp_path, backends):
    from tests.support.router import options_from
    backend = backends("late")
    port = proxy_port()
    options = options_from({"router": {"shutdown_timeout": 0.5}, "proxy": {
        "listen": "127.0.0.1", "routes": [{"name": "l", "ports": [port],
                                           "targets": [backend.address]}]}},
        str(tmp_path / "state"))
    router = start_router(options)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        yield deferToThread(s.sendall, b"x")
        assert (yield deferToThread(s.recv, 100)) == b"late:x"
        yield stop_router(router)         # waits 0.5 s for the tunnel, then closes it

        def closed() -> bool:
            try:
                return s.recv(100) == b""
            except ConnectionResetError:
                return True
        assert (yield deferToThread(closed))
        assert router.by_name["proxy"].connections == set()
    finally:
        s.close()
