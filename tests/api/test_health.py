"""/healthz and /readyz on the API port, read with curl; the proxy health-checks them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest_twisted
from twisted.internet import defer, protocol, reactor, threads

from dcrouter.proxy.balancer import target_endpoint
from dcrouter.proxy.httpcheck import HealthCheckFailed, http_check
from tests.email.peers import start_redis
from tests.support.configs import default_config_with_free_ports, write_config
from tests.support.net import free_port, wait_for_tcp
from tests.support.proc import TwistdProcess, wait_until
from tests.support.router import options_from, start_router, stop_router

TOKEN = "health-test-token"


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    """(status, headers, body) of ``curl -i ARGS``."""
    assert shutil.which("curl"), "curl is missing (Debian package curl, in TEST_DEBS)"
    ran = subprocess.run(["curl", "-sS", "-i", "--max-time", "15", *args], capture_output=True,
                         text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    head, _, body = ran.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _stats(api: int) -> dict:
    _, _, body = curl("-H", f"Authorization: Bearer {TOKEN}", f"http://127.0.0.1:{api}/api/stats")
    return json.loads(body)


def test_health_endpoints_answer_without_token_and_the_proxy_checks_readyz(tmp_path):
    data, ports = default_config_with_free_ports(str(tmp_path / "var"))
    data["api"]["token"] = TOKEN
    # a proxy route in front of this dcrouter's own API, checking /readyz every 0.2 s
    lb = free_port()
    data["proxy"]["routes"].append({
        "name": "dcrouter-api", "ports": [lb], "targets": [f"127.0.0.1:{ports['api']}"],
        "health_check_path": "/readyz", "health_check_interval": 0.2})
    write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config="dcrouter.toml")
    api = ports["api"]
    try:
        wait_for_tcp(api, timeout=30)
        wait_until(lambda: "dcrouter ready" in proc.output(), timeout=30)
        status, headers, body = curl(f"http://127.0.0.1:{api}/healthz")
        assert (status, body) == (200, "ok\n") and headers["content-type"].startswith("text/plain")
        status, _, body = curl(f"http://127.0.0.1:{api}/readyz")
        assert (status, body) == (200, "ready\n")
        status, headers, body = curl("-I", f"http://127.0.0.1:{api}/readyz")
        assert status == 200 and body == "" and headers["content-length"] == "6"
        status, headers, _ = curl("-X", "POST", f"http://127.0.0.1:{api}/healthz")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert curl(f"http://127.0.0.1:{api}/api/status")[0] == 401  # the rest keeps its token
        # through the proxy, which found the target healthy
        assert curl(f"http://127.0.0.1:{lb}/readyz")[:3:2] == (200, "ready\n")

        def target_health() -> bool:
            return _stats(api)["proxy"]["routes"]["dcrouter-api"]["targets"][
                f"127.0.0.1:{api}"]["healthy"]
        # the disk queue cannot be written any more (its directory replaced by a file)
        queue = tmp_path / "var" / "queue"
        os.rename(queue, tmp_path / "var" / "queue.moved")
        queue.write_text("not a directory")
        status, _, body = curl(f"http://127.0.0.1:{api}/readyz")
        assert (status, body) == (503, "not ready: queue not writable\n")
        assert curl(f"http://127.0.0.1:{api}/healthz")[0] == 200  # alive all the same
        wait_until(lambda: target_health() is False, timeout=20)
        assert "failed its health check: HTTP status 503" in proc.output()
        queue.unlink()
        os.rename(tmp_path / "var" / "queue.moved", queue)
        assert curl(f"http://127.0.0.1:{api}/readyz")[0] == 200
        wait_until(target_health, timeout=20)
    finally:
        status = proc.stop()
    assert status == 0, proc.output()


def test_readyz_fails_while_redis_is_down(tmp_path):
    redis = start_redis(str(tmp_path))
    data, ports = default_config_with_free_ports(str(tmp_path / "var"))
    data["email"]["queue"] = {"storage_type": "redis",
                              "redis_url": f"redis://127.0.0.1:{redis.port}/0"}
    write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config="dcrouter.toml")
    api = ports["api"]
    try:
        wait_until(lambda: "dcrouter ready" in proc.output(), timeout=30)
        assert curl(f"http://127.0.0.1:{api}/readyz")[:3:2] == (200, "ready\n")
        redis.stop()
        status, _, body = curl(f"http://127.0.0.1:{api}/readyz")
        assert status == 503 and body in ("not ready: redis unreachable\n",
                                          "not ready: check timed out\n"), body
    finally:
        status = proc.stop()
        redis.stop()
    assert status == 0, proc.output()


@pytest_twisted.ensureDeferred
async def test_readyz_names_a_listener_that_is_gone(tmp_path):
    data, _ = default_config_with_free_ports(str(tmp_path / "var"))
    router = start_router(options_from(data, str(tmp_path / "var")))
    try:
        api = router.by_name["api"].listeners.port_for("api.port")
        status, _, body = await threads.deferToThread(curl, f"http://127.0.0.1:{api}/readyz")
        assert (status, body) == (200, "ready\n")
        dns = router.by_name["dns"]
        port = dns.listeners.port_for("dns.port")
        await dns.listeners.stop()
        status, _, body = await threads.deferToThread(curl, f"http://127.0.0.1:{api}/readyz")
        assert status == 503
        assert body == f"not ready: dns udp/{port} not listening\n" \
                       f"not ready: dns tcp/{port} not listening\n"
    finally:
        await stop_router(router)


class _Answer(protocol.Protocol):
    def connectionMade(self) -> None:
        if self.factory.answer:  # type: ignore[attr-defined]
            self.transport.write(self.factory.answer)  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_http_check_wants_a_2xx_or_3xx_status_line():
    results = {}
    for name, answer in [("ok", b"HTTP/1.1 204 No Content\r\n\r\n"),
                         ("redirect", b"HTTP/1.0 302 Found\r\nLocation: /\r\n\r\n"),
                         ("unready", b"HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready\n"),
                         ("garbage", b"SSH-2.0-OpenSSH_9.2\r\n"),
                         ("endless", b"x" * 5000),
                         ("silent", b"")]:
        factory = protocol.Factory.forProtocol(_Answer)
        factory.answer = answer  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        number = port.getHost().port
        try:
            endpoint = target_endpoint(reactor, "127.0.0.1", number, 2.0)
            results[name] = await http_check(reactor, endpoint, "/readyz", "127.0.0.1",
                                             number, 0.5)
        except HealthCheckFailed as e:
            results[name] = str(e)
        finally:
            await defer.maybeDeferred(port.stopListening)
    assert results == {"ok": 204, "redirect": 302, "unready": "HTTP status 503",
                       "garbage": "not an HTTP answer: b'SSH-2.0-OpenSSH_9.2'",
                       "endless": "no HTTP status line", "silent": "no HTTP status within 0.5s"}


def test_health_check_path_goes_into_a_request_line_so_it_is_checked():
    import pytest
    from dcrouter.config import parse_config
    from dcrouter.errors import ConfigError
    route = {"name": "r", "ports": [8080], "targets": ["127.0.0.1:9"]}
    ok = parse_config({"proxy": {"routes": [dict(route, health_check_path="/readyz?x=1")]}})
    assert ok.proxy.routes[0].health_check_path == "/readyz?x=1"
    for bad in ("readyz", "/a b", "/x\r\nHost: evil"):
        with pytest.raises(ConfigError) as e:
            parse_config({"proxy": {"routes": [dict(route, health_check_path=bad)]}})
        assert "proxy.routes[0].health_check_path" in str(e.value)
