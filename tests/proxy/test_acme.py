"""ACME: a full http-01 issuance against pebble that the proxy then serves; backoff."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import ssl
import subprocess
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from dcrouter.config.proxy import AcmeOptions
from dcrouter.proxy.acme import AcmeManager
from dcrouter.proxy.certs import acme_paths
from tests.proxy.conftest import http_get, tls_exchange
from tests.support.configs import write_config
from tests.support.proc import run_cli
from tests.support.router import options_from
from tests.support.net import free_port, free_tcp_udp_port, wait_for_tcp

NAME = "acme.example.test"


@contextlib.contextmanager
def running_pebble(tmp_path, test_ca, own_dns: bool = False):
    """pebble on ephemeral loopback ports; its DNS is pebble-challtestsrv, or (``own_dns``)
    the port in the result's "dns" where the test starts dcrouter's DNS server."""
    cert, key = test_ca.issue(["localhost", "127.0.0.1"], "pebble")
    ports = {"acme": free_port(), "mgmt": free_port(), "http": free_port(), "tls": free_port(),
             "dns": free_tcp_udp_port(), "chall_mgmt": free_port()}
    cfg = {"pebble": {"listenAddress": f"127.0.0.1:{ports['acme']}",
                      "managementListenAddress": f"127.0.0.1:{ports['mgmt']}",
                      "certificate": cert, "privateKey": key, "httpPort": ports["http"],
                      "tlsPort": ports["tls"], "ocspResponderURL": "",
                      "externalAccountBindingRequired": False}}
    cfg_path = tmp_path / "pebble.json"
    cfg_path.write_text(json.dumps(cfg))
    log = open(tmp_path / "pebble.log", "wb")
    procs = []
    if not own_dns:
        procs.append(subprocess.Popen(
            ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
             "-dns01", f"127.0.0.1:{ports['dns']}", "-http01", "", "-https01", "",
             "-tlsalpn01", "", "-management", f"127.0.0.1:{ports['chall_mgmt']}"],
            stdout=log, stderr=subprocess.STDOUT))
    env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
    procs.append(subprocess.Popen(["pebble", "-config", str(cfg_path), "-dnsserver",
                                   f"127.0.0.1:{ports['dns']}", "-strict=false"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=str(tmp_path)))
    try:
        wait_for_tcp(ports["acme"])
        if not own_dns:
            wait_for_tcp(ports["chall_mgmt"])
        yield {**ports, "directory": f"https://127.0.0.1:{ports['acme']}/dir",
               "log": str(tmp_path / "pebble.log")}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        log.close()


@pytest.fixture
def pebble(tmp_path, test_ca):
    """pebble + pebble-challtestsrv on ephemeral loopback ports; yields their addresses."""
    with running_pebble(tmp_path, test_ca) as addresses:
        yield addresses


@pytest.fixture
def pebble_on_our_dns(tmp_path, test_ca):
    """pebble resolving (and validating dns-01) through dcrouter's DNS on ``["dns"]``."""
    with running_pebble(tmp_path, test_ca, own_dns=True) as addresses:
        yield addresses


def pebble_root(mgmt_port: int, ca_path: str) -> bytes:
    ctx = ssl.create_default_context(cafile=ca_path)
    with urllib.request.urlopen(f"https://127.0.0.1:{mgmt_port}/roots/0", context=ctx,
                                timeout=10) as resp:
        return resp.read()


@pytest_twisted.inlineCallbacks
def test_full_issuance_against_pebble_is_served(proxy_router, backends, pebble, test_ca, tmp_path):
    backend = backends("issued")
    https_port = free_port()
    proxy = {
        "acme": {"enabled": True, "directory_url": pebble["directory"],
                 "directory_ca_path": test_ca.path, "account_email": "ops@example.test",
                 "http_port": pebble["http"]},
        "routes": [
            {"name": "http", "ports": [pebble["http"]], "domains": ["*"],
             "redirect_to_https": True},
            {"name": "site", "ports": [https_port], "domains": [NAME], "tls": "terminate", "http": False,
             "targets": [backend.address]},
        ]}
    router = proxy_router(proxy)
    service = router.by_name["proxy"]
    for _ in range(300):
        if service.get_stats()["acme"][NAME]["expires"]:
            break
        yield task.deferLater(reactor, 0.1, lambda: None)
    status = service.get_stats()["acme"][NAME]
    assert status["expires"], (status, open(pebble["log"]).read()[-3000:])
    assert service.challenges == {}
    # the account key and certificate are stored under state_dir
    state_dir = router.options.router.state_dir
    assert os.path.exists(os.path.join(state_dir, "acme", "account.key"))
    cert_path, key_path = acme_paths(state_dir, NAME)
    assert oct(os.stat(key_path).st_mode & 0o777) == "0o600"
    # a client that trusts only pebble's root accepts the served certificate for the name
    root = yield deferToThread(pebble_root, pebble["mgmt"], test_ca.path)
    root_path = tmp_path / "pebble-root.pem"
    root_path.write_bytes(root)
    ctx = ssl.create_default_context(cafile=str(root_path))
    result = yield deferToThread(tls_exchange, https_port, NAME, b"hello", ctx)
    assert result["reply"] == b"issued:hello"
    assert result["names"] == [NAME]
    assert "Pebble" in result["issuer"]
    # nothing is due any more: a second check orders nothing
    assert service.acme.due() == []
    # inside the renewal threshold the certificate is renewed (a new one is served)
    first_serial = open(cert_path).read()
    service.acme.options = dataclasses.replace(service.acme.options,
                                               renew_threshold_days=365 * 50)
    assert service.acme.due() == [NAME]
    yield service.acme.check()
    assert open(cert_path).read() != first_serial
    result = yield deferToThread(tls_exchange, https_port, NAME, b"again", ctx)
    assert result["reply"] == b"issued:again"
    # a reload that adds a name orders its certificate too
    proxy["routes"][1]["domains"] = [NAME, "second.example.test"]
    new_options = options_from({"proxy": {"listen": "127.0.0.1", **proxy}},
                               router.options.router.state_dir)
    yield router._apply(new_options)
    for _ in range(300):
        if service.get_stats()["acme"].get("second.example.test", {}).get("expires"):
            break
        yield task.deferLater(reactor, 0.1, lambda: None)
    result = yield deferToThread(tls_exchange, https_port, "second.example.test", b"2", ctx)
    assert result["names"] == ["second.example.test"] and result["reply"] == b"issued:2"


@pytest_twisted.inlineCallbacks
def test_failed_order_backs_off_per_domain(tmp_path):
    closed = free_port()      # no ACME server there
    options = AcmeOptions(enabled=True, directory_url=f"https://127.0.0.1:{closed}/dir",
                          retry_backoff=120.0)
    issued = []
    manager = AcmeManager(reactor, options, str(tmp_path), {}, issued.append)
    manager.update(options, ["a.test", "b.test"])
    assert manager.due() == ["a.test", "b.test"]
    yield manager.check()
    assert issued == []
    status = manager.status()
    assert status["a.test"]["failures"] == 1 and status["b.test"]["failures"] == 1
    assert status["a.test"]["last_error"]
    assert status["a.test"]["retry_at"] >= reactor.seconds() + 100
    assert manager.due() == []          # backing off
    manager.backoff["a.test"].until = 0
    yield manager.check()
    assert manager.status()["a.test"]["failures"] == 2
    assert manager.backoff["a.test"].until - reactor.seconds() > 200   # doubled


@pytest_twisted.inlineCallbacks
def test_wildcard_and_dns01_names_validated_through_our_dns(proxy_router, backends,
                                                           pebble_on_our_dns, test_ca, tmp_path):
    """dns-01: dcrouter's own DNS server publishes _acme-challenge TXT records that pebble
    checks; a wildcard certificate is issued and served for any name under it."""
    pebble = pebble_on_our_dns
    backend = backends("wild")
    https_port = free_port()
    dns_section = {"listen": "127.0.0.1", "port": pebble["dns"], "rate_limit": 0,
                   "zones": [{"origin": "example.test",
                              "records": [{"name": "@", "type": "A", "value": "127.0.0.1"}]}]}
    proxy = {
        "acme": {"enabled": True, "directory_url": pebble["directory"], "challenge": "dns-01",
                 "directory_ca_path": test_ca.path, "account_email": "ops@example.test"},
        "routes": [
            {"name": "site", "ports": [https_port], "tls": "terminate", "http": False,
             "domains": ["*.wild.example.test", "dns.example.test", "*.elsewhere.test"],
             "targets": [backend.address]},
        ]}
    router = proxy_router(proxy, dns=dns_section)
    service = router.by_name["proxy"]
    wanted = ("*.wild.example.test", "dns.example.test")
    for _ in range(300):
        if all(service.get_stats()["acme"][n]["expires"] for n in wanted):
            break
        yield task.deferLater(reactor, 0.1, lambda: None)
    stats = service.get_stats()["acme"]
    assert all(stats[n]["expires"] for n in wanted), (stats, open(pebble["log"]).read()[-3000:])
    # a wildcard outside every served zone is not ordered, and says why
    assert stats["*.elsewhere.test"]["expires"] is None
    assert "dns-01" in stats["*.elsewhere.test"]["last_error"]
    assert "*.elsewhere.test" not in service.acme.due()
    # pebble asked our DNS for the TXT records (one per name: wildcard and plain name)
    assert router.by_name["dns"].get_stats()["queries_by_type"].get("TXT", 0) >= 2
    # the challenge records were withdrawn; http-01 was never used
    assert router.by_name["dns"].challenge_records == {} and service.challenges == {}
    root = yield deferToThread(pebble_root, pebble["mgmt"], test_ca.path)
    root_path = tmp_path / "pebble-root.pem"
    root_path.write_bytes(root)
    ctx = ssl.create_default_context(cafile=str(root_path))
    for name in ("a.wild.example.test", "other.wild.example.test"):
        result = yield deferToThread(tls_exchange, https_port, name, b"hi", ctx)
        assert result["reply"] == b"wild:hi" and result["names"] == ["*.wild.example.test"]
    result = yield deferToThread(tls_exchange, https_port, "dns.example.test", b"x", ctx)
    assert result["names"] == ["dns.example.test"] and "Pebble" in result["issuer"]


@pytest_twisted.inlineCallbacks
def test_http01_is_answered_before_a_catch_all_tcp_route_on_the_http_port(proxy_router, backends,
                                                                          pebble, test_ca):
    """The common setup of issue 13: a catch-all plain route on the HTTP port (domains = ["*"],
    no path, so not HTTP by itself) relays everything else to its backend, but pebble's
    validation requests are answered by the proxy before the route."""
    site = backends("site", kind="http")
    catch_all = backends("catch-all", kind="http")
    https_port = free_port()
    router = proxy_router({
        "acme": {"enabled": True, "directory_url": pebble["directory"],
                 "directory_ca_path": test_ca.path, "http_port": pebble["http"]},
        "routes": [
            {"name": "http", "ports": [pebble["http"]], "domains": ["*"],
             "targets": [catch_all.address], "health_check_interval": 0},
            {"name": "site", "ports": [https_port], "domains": [NAME], "tls": "terminate",
             "targets": [site.address]},
        ]})
    service = router.by_name["proxy"]
    for _ in range(300):
        if service.get_stats()["acme"][NAME]["expires"]:
            break
        yield task.deferLater(reactor, 0.1, lambda: None)
    status = service.get_stats()["acme"][NAME]
    assert status["expires"], (status, open(pebble["log"]).read()[-3000:])
    assert catch_all.connections == []          # no validation request reached the backend
    # every other request on the port still goes to the catch-all backend
    got = yield deferToThread(http_get, pebble["http"], "anything.test", "/page")
    assert got[0] == 200 and json.loads(got[2])["tag"] == "catch-all"
    # and the certificate is served
    root = yield deferToThread(pebble_root, pebble["mgmt"], test_ca.path)
    root_path = os.path.join(router.options.router.state_dir, "pebble-root.pem")
    with open(root_path, "wb") as f:
        f.write(root)
    ctx = ssl.create_default_context(cafile=root_path)
    result = yield deferToThread(tls_exchange, https_port, NAME,
                                 b"GET / HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\n\r\n", ctx)
    assert result["names"] == [NAME] and result["reply"].startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("routes, acme, key, reason", [
    ([{"ports": [8080], "domains": ["*"], "targets": ["127.0.0.1:1"], "http": False},
      {"ports": [8443], "domains": [NAME], "tls": "terminate", "targets": ["127.0.0.1:1"]}],
     {"http_port": 8080}, "proxy.routes[0].http", "http = false cannot hold there"),
    ([{"ports": [8080], "domains": [NAME], "tls": "terminate", "targets": ["127.0.0.1:1"]}],
     {"http_port": 8080}, "proxy.routes[0].ports", "a TLS route cannot listen there"),
    ([{"ports": [8443], "domains": [NAME], "tls": "terminate", "targets": ["127.0.0.1:1"]}],
     {}, "proxy.acme.http_port", "no route listens on port 80"),
])
def test_check_config_names_what_keeps_http01_from_being_answered(tmp_path, routes, acme, key,
                                                                  reason):
    path = tmp_path / "dcrouter.toml"
    write_config(str(path), {"router": {"state_dir": str(tmp_path / "state")},
                             "proxy": {"listen": "127.0.0.1", "routes": routes,
                                       "acme": {"enabled": True, **acme}}})
    result = run_cli("check-config", str(path))
    assert result.returncode != 0
    assert key in result.stdout + result.stderr and reason in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
