"""ApiService as a router service: listener, reconfiguration, stats, observer wiring."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import pytest_twisted

from dcrouter.api.metrics import ApiMetrics, DeliveryMetrics, EmailEventMetrics
from dcrouter.api.service import ApiService
from dcrouter.config import parse_config
from dcrouter.errors import ConfigError
from dcrouter.service import Extensions, ListenError, ManagedService, RouterContext
from tests.api.support import TOKEN, Client, assert_error, router_config, start_api_router
from tests.support.net import free_port
from tests.support.router import options_from, start_router, stop_router


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


@pytest_twisted.ensureDeferred
async def test_service_binds_reports_and_closes(tmp_path):
    router, port = start_api_router(str(tmp_path / "var"))
    api = router.by_name["api"]
    assert isinstance(api, ApiService) and isinstance(api, ManagedService) and api.name == "api"
    assert api.bound_addresses() == [("tcp", "127.0.0.1", port)]
    client = Client(port)
    assert (await client.get("/api/status")).status == 200
    assert_error(await client.get("/api/status", token="bad"), 401, "unauthorized")
    stats = api.get_stats()
    assert stats["requests"] == 2 and stats["auth_failures"] == 1
    assert router.get_stats()["api"]["requests"] == 2
    await stop_router(router)
    assert _refused(port)


@pytest_twisted.ensureDeferred
async def test_reconfigure_rebinds_a_new_port_and_takes_a_new_token(tmp_path):
    router, port = start_api_router(str(tmp_path / "var"))
    api = router.by_name["api"]
    try:
        new_port = free_port()
        new = dataclasses.replace(router.options, api=dataclasses.replace(
            router.options.api, port=new_port, token="second-token"))
        await api.reconfigure(new)
        assert api.bound_addresses() == [("tcp", "127.0.0.1", new_port)]
        assert _refused(port)
        client = Client(new_port, token="second-token")
        assert (await client.get("/api/status")).status == 200
        assert_error(await client.get("/api/status", token=TOKEN), 401, "unauthorized")
        # same listen and port: the listener is kept (no re-bind), only the token changes
        listening = api.listeners.ports[next(iter(api.listeners.ports))]
        again = dataclasses.replace(new, api=dataclasses.replace(new.api, token=TOKEN))
        await api.reconfigure(again)
        assert api.listeners.ports[next(iter(api.listeners.ports))] is listening
        assert (await client.get("/api/status", token=TOKEN)).status == 200
    finally:
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_two_routers_in_one_process_have_separate_metrics(tmp_path):
    first, port1 = start_api_router(str(tmp_path / "a"))
    second, port2 = start_api_router(str(tmp_path / "b"))
    try:
        for _ in range(3):
            assert (await Client(port1).get("/api/status")).status == 200
        metrics1 = (await Client(port1).get("/metrics")).text
        metrics2 = (await Client(port2).get("/metrics")).text
        assert 'dcrouter_api_requests_total{method="GET",status="200"} 3.0' in metrics1
        assert 'dcrouter_api_requests_total{method="GET",status="200"}' not in metrics2
        assert first.by_name["api"].metrics.registry is not second.by_name["api"].metrics.registry
    finally:
        await stop_router(first)
        await stop_router(second)


def test_port_in_use_is_a_listen_error_naming_the_key(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        data, _ports = router_config(str(tmp_path / "var"))
        data["api"]["port"] = busy.getsockname()[1]
        with pytest.raises(ListenError) as caught:
            start_router(options_from(data, str(tmp_path / "var")))
    assert caught.value.key_path == "api.port"


def test_non_loopback_listen_needs_a_token():
    with pytest.raises(ConfigError) as caught:
        parse_config({"api": {"listen": "0.0.0.0", "port": 8088}})
    assert caught.value.path == "api.token"
    parse_config({"api": {"listen": "0.0.0.0", "port": 8088, "token": "t"}})


class _Part:
    """A service part that offers add_observer (as the real server and delivery may)."""

    def __init__(self) -> None:
        self.observers: list = []

    def add_observer(self, observer) -> None:
        self.observers.append(observer)


class _Gateway:
    def __init__(self) -> None:
        self.server = _Part()
        self.delivery = _Part()


def test_observers_go_to_add_observer_when_offered(tmp_path):
    context = RouterContext(parse_config({"router": {"state_dir": str(tmp_path)}}), None,
                            Extensions())
    gateway = _Gateway()
    context.services["email"] = gateway  # type: ignore[assignment]
    metrics = ApiMetrics(context)
    assert gateway.server.observers == [metrics.email_events]
    assert gateway.delivery.observers == [metrics.delivery]
    assert context.extensions.email_observers == []
    assert context.extensions.delivery_observers == []
    metrics.wire_observers()  # a reload must not register twice
    assert len(gateway.server.observers) == 1 and len(gateway.delivery.observers) == 1


def test_observers_go_to_the_extension_lists_otherwise(tmp_path):
    context = RouterContext(parse_config({"router": {"state_dir": str(tmp_path)}}), None,
                            Extensions())
    gateway = _Gateway()
    gateway.server = object()  # type: ignore[assignment]  # parts without add_observer
    gateway.delivery = object()  # type: ignore[assignment]
    context.services["email"] = gateway  # type: ignore[assignment]
    metrics = ApiMetrics(context)
    assert context.extensions.email_observers == [metrics.email_events]
    assert context.extensions.delivery_observers == [metrics.delivery]
    metrics.wire_observers()
    assert len(context.extensions.email_observers) == 1


def _get_json(url: str, token: str) -> tuple[int, object]:
    """urllib GET (treq's URL handling refuses IPv6 literals)."""
    import json
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest_twisted.ensureDeferred
async def test_ipv6_loopback_listener(tmp_path):
    from twisted.internet import threads
    port = free_port(host="::1")
    router, _port = start_api_router(str(tmp_path / "var"), listen="::1", port=port)
    try:
        assert router.by_name["api"].bound_addresses() == [("tcp", "::1", port)]
        url = f"http://[::1]:{port}/api/status"
        code, body = await threads.deferToThread(_get_json, url, TOKEN)
        assert code == 200
        assert body["services"]["api"]["listeners"] == [  # type: ignore[index]
            {"protocol": "tcp", "host": "::1", "port": port}]
        code, body = await threads.deferToThread(_get_json, url, "wrong")
        assert code == 401 and body["error"]["code"] == "unauthorized"  # type: ignore[index]
    finally:
        await stop_router(router)
