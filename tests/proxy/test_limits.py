"""Allowed/blocked IPs and connection limits, for every proxy mode."""

from __future__ import annotations

import ipaddress
import socket
import ssl

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from dcrouter.proxy.limits import Admission, IpRules, LimitExceeded, normalize_ip
from tests.proxy.conftest import free_port, http_get, proxy_port

#: every test here that starts a proxy runs on the splice relay and on the Twisted fallback
BOTH_RELAYS = True


def test_normalisation_and_rules() -> None:
    assert normalize_ip("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert normalize_ip("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    rules = IpRules(["10.0.0.0/8", "2001:db8::/32"], ["10.1.0.0/16", "::ffff:10.2.0.0/112"])
    assert rules.permits(normalize_ip("10.9.9.9"))
    assert rules.permits(normalize_ip("::ffff:10.9.9.9"))
    assert not rules.permits(normalize_ip("::ffff:10.1.2.3"))      # block wins, mapped form
    assert not rules.permits(normalize_ip("10.2.0.5"))              # mapped network blocked
    assert rules.permits(normalize_ip("2001:db8::5"))
    assert not rules.permits(normalize_ip("192.0.2.1"))


def test_admission_counts_per_route_and_ip() -> None:
    admission = Admission()
    rules = IpRules(["0.0.0.0/0", "::/0"], [])
    a = admission.admit("r", "10.0.0.1", rules, 3, 2)
    admission.admit("r", "::ffff:10.0.0.1", rules, 3, 2)
    with pytest.raises(LimitExceeded) as e:
        admission.admit("r", "10.0.0.1", rules, 3, 2)
    assert e.value.kind == "max_per_ip"
    admission.admit("r", "10.0.0.2", rules, 3, 2)
    with pytest.raises(LimitExceeded) as e:
        admission.admit("r", "10.0.0.3", rules, 3, 2)
    assert e.value.kind == "max_connections"
    a.release()
    a.release()
    assert admission.active("r") == 2
    admission.admit("r", "10.0.0.3", rules, 3, 2)


def refused(port: int, host: str = "127.0.0.1", payload: bytes = b"x") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        try:
            s.connect((host, port))
            s.sendall(payload)
            return s.recv(100) == b""
        except (ConnectionResetError, BrokenPipeError):   # aborted by the proxy
            return True


@pytest_twisted.inlineCallbacks
def test_block_and_allow_ipv4(proxy_router, backends, test_ca):
    backend = backends("b")
    tcp_allowed, tcp_blocked, http_port, tls_port = (proxy_port() for _ in range(4))
    router = proxy_router({"routes": [
        {"name": "allowed", "ports": [tcp_allowed], "targets": [backend.address],
         "allowed_ips": ["127.0.0.0/8"]},
        {"name": "blocked", "ports": [tcp_blocked], "targets": [backend.address],
         "allowed_ips": ["127.0.0.0/8"], "blocked_ips": ["127.0.0.1/32"]},
        {"name": "http", "ports": [http_port], "domains": ["h.test"], "targets": [backend.address],
         "allowed_ips": ["10.0.0.0/8"]},
        {"name": "tls", "ports": [tls_port], "domains": ["*"], "tls": "terminate",
         "targets": [backend.address], "blocked_ips": ["127.0.0.0/8"]},
    ]})

    def echo(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"x")
            return s.recv(100)
    assert (yield deferToThread(echo, tcp_allowed)) == b"b:x"
    assert (yield deferToThread(refused, tcp_blocked))

    def http_refused() -> bool:
        try:
            http_get(http_port, "h.test")
        except (ConnectionError, ValueError, IndexError):
            return True
        return False
    assert (yield deferToThread(http_refused))

    def tls_refused() -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:
            try:
                ctx.wrap_socket(raw, server_hostname="t.test")
            except (ssl.SSLError, ConnectionError):
                return True
        return False
    assert (yield deferToThread(tls_refused))
    assert len(backend.connections) == 1
    stats = router.get_stats()["proxy"]["routes"]
    assert stats["blocked"]["errors"] == {"blocked": 1}
    assert stats["http"]["errors"] == {"blocked": 1}
    assert stats["tls"]["errors"] == {"blocked": 1}


@pytest_twisted.inlineCallbacks
def test_block_and_allow_ipv6_loopback(proxy_router, backends):
    backend = backends("v6", host="::1")
    open_port, closed_port = free_port(host="::1"), free_port(host="::1")
    proxy_router({"listen": "::1", "routes": [
        {"name": "open", "ports": [open_port], "targets": [backend.address],
         "allowed_ips": ["::1/128"]},
        {"name": "shut", "ports": [closed_port], "targets": [backend.address],
         "blocked_ips": ["::1"]},
    ]})

    def echo() -> bytes:
        with socket.create_connection(("::1", open_port), timeout=10) as s:
            s.sendall(b"six")
            return s.recv(100)
    assert (yield deferToThread(echo)) == b"v6:six"
    assert (yield deferToThread(refused, closed_port, "::1"))


@pytest_twisted.inlineCallbacks
def test_max_connections_and_per_ip(proxy_router, backends):
    backend = backends("m")
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "m", "ports": [port], "targets": [backend.address],
                                       "max_connections": 3, "max_connections_per_ip": 2}]})
    held = []

    def hold() -> bytes:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(s)
        s.sendall(b"h")
        return s.recv(100)
    try:
        assert (yield deferToThread(hold)) == b"m:h"
        assert (yield deferToThread(hold)) == b"m:h"
        assert (yield deferToThread(refused, port))       # a third from the same IP
        # another loopback address is another client: allowed until max_connections
        def from_other(source: str) -> bytes:
            s = socket.socket()
            s.settimeout(10)
            s.bind((source, 0))
            held.append(s)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(b"o")
                return s.recv(100)
            except (ConnectionResetError, BrokenPipeError):
                return b""
        assert (yield deferToThread(from_other, "127.0.0.2")) == b"m:o"
        assert (yield deferToThread(from_other, "127.0.0.3")) == b""
        errors = router.get_stats()["proxy"]["routes"]["m"]["errors"]
        assert errors == {"max_per_ip": 1, "max_connections": 1}
    finally:
        for s in held:
            s.close()
    for _ in range(100):
        if router.get_stats()["proxy"]["routes"]["m"]["active_connections"] == 0:
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    assert (yield deferToThread(refused, port)) is False
