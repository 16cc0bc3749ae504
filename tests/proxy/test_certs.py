"""TLS termination: the certificate per name, ALPN, minimum version, re-encryption."""

from __future__ import annotations

import socket
import ssl

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.proxy.conftest import proxy_port, tls_exchange


@pytest_twisted.inlineCallbacks
def test_terminate_serves_the_certificate_of_each_name(proxy_router, backends, test_ca):
    a_cert = test_ca.issue(["a.example.test"])
    wild_cert = test_ca.issue(["*.wild.test"], "wild")
    plain_a = backends("A")
    plain_b = backends("B")
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "a", "ports": [port], "domains": ["a.example.test"], "tls": "terminate", "http": False,
         "targets": [plain_a.address], "cert_path": a_cert[0], "key_path": a_cert[1]},
        {"name": "w", "ports": [port], "domains": ["*.wild.test"], "tls": "terminate", "http": False,
         "targets": [plain_b.address], "cert_path": wild_cert[0], "key_path": wild_cert[1]},
        {"name": "self", "ports": [port], "domains": ["self.test"], "tls": "terminate", "http": False,
         "targets": [plain_b.address]},
    ]})
    ctx = test_ca.client_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    r = yield deferToThread(tls_exchange, port, "a.example.test", b"hi", ctx)
    assert r["reply"] == b"A:hi"
    assert r["names"] == ["a.example.test"]
    assert r["alpn"] == "http/1.1"
    assert r["version"] in ("TLSv1.2", "TLSv1.3")
    r = yield deferToThread(tls_exchange, port, "x.wild.test", b"yo", ctx)
    assert r["reply"] == b"B:yo" and r["names"] == ["*.wild.test"]
    # no configured file: a self-signed certificate for that name alone
    r = yield deferToThread(tls_exchange, port, "self.test", b"s")
    assert r["reply"] == b"B:s" and "self.test" in r["names"]
    assert "a.example.test" not in r["issuer"]
    # the backend saw plain bytes
    assert plain_a.connections[0].received == b"hi"
    stats = router.get_stats()["proxy"]["routes"]
    assert stats["a"]["total_connections"] == 1 and stats["a"]["bytes_in"] == 2
    assert stats["a"]["bytes_out"] == 4


@pytest_twisted.inlineCallbacks
def test_terminate_refuses_tls_1_1(proxy_router, backends, test_ca):
    backend = backends("A")
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "t", "ports": [port], "domains": ["*"],
                                       "tls": "terminate", "targets": [backend.address]}]})

    def old_client() -> str:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        try:
            ctx.set_ciphers("ALL:@SECLEVEL=0")
        except ssl.SSLError:
            pass
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname="x.test") as s:
                    return s.version() or ""
            except (ssl.SSLError, ConnectionError) as e:
                return f"refused: {e}"
    result = yield deferToThread(old_client)
    assert result.startswith("refused")
    assert backend.connections == []
    assert router.get_stats()["proxy"]["routes"]["t"]["errors"].get("tls_handshake") == 1


@pytest.mark.parametrize("verify_ok", [True, False])
@pytest_twisted.inlineCallbacks
def test_reencrypt_verifies_the_backend(proxy_router, backends, test_ca, tmp_path, verify_ok):
    backend = backends("secure", tls=test_ca.issue(["backend.internal"]))
    port = proxy_port()
    if verify_ok:
        ca_path = test_ca.path
    else:   # a CA the backend's certificate does not chain to
        from tests.proxy.conftest import CertAuthority
        ca_path = CertAuthority(str(tmp_path), "another CA").path
    router = proxy_router({"routes": [
        {"name": "re", "ports": [port], "domains": ["front.test"],
         "tls": "terminate-and-reencrypt", "http": False, "targets": [backend.address],
         "backend_ca_path": ca_path, "backend_server_name": "backend.internal"}]})

    def client() -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="front.test") as s:
                s.sendall(b"secret")
                try:
                    return s.recv(1024)
                except (ssl.SSLError, ConnectionError):
                    return b""
    reply = yield deferToThread(client)
    if verify_ok:
        assert reply == b"secure:secret"
        assert backend.connections[0].received == b"secret"
    else:
        assert reply == b""
        assert all(c.received == b"" for c in backend.connections)
        errors = router.get_stats()["proxy"]["routes"]["re"]["errors"]
        assert errors.get("backend_tls") == 1


@pytest_twisted.inlineCallbacks
def test_a_stalled_handshake_is_cut_after_initial_data_timeout(proxy_router, backends):
    from tests.proxy.test_sni import capture_client_hello
    backend = backends("A")
    port = proxy_port()
    router = proxy_router({"routes": [{"name": "t", "ports": [port], "domains": ["*"],
                                       "tls": "terminate", "targets": [backend.address],
                                       "initial_data_timeout": 0.5}]})

    def stall() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(capture_client_hello("stall.test"))   # then never answer the ServerHello
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            return True
    assert (yield deferToThread(stall))
    stats = router.get_stats()["proxy"]["routes"]["t"]
    assert stats["errors"] == {"handshake_timeout": 1}
    assert stats["active_connections"] == 0 and backend.connections == []


def test_unreadable_certificate_is_a_config_error_naming_the_route(tmp_path):
    from dcrouter.errors import ConfigError
    from dcrouter.router import make_router
    from tests.support.router import options_from
    options = options_from({"proxy": {"listen": "127.0.0.1", "routes": [
        {"ports": [proxy_port()], "domains": ["a.test"], "tls": "terminate", "targets": ["127.0.0.1:1"],
         "cert_path": str(tmp_path / "missing.crt"), "key_path": str(tmp_path / "missing.key")}]}},
        str(tmp_path / "state"))
    with pytest.raises(ConfigError) as e:
        make_router(options)
    assert e.value.path == "proxy.routes[0].cert_path" and "missing.crt" in str(e.value)


@pytest_twisted.inlineCallbacks
def test_reencrypt_without_verification_accepts_any_backend_certificate(proxy_router, backends,
                                                                        tmp_path):
    from dcrouter.tlsutil import make_self_signed
    cert, key = make_self_signed(["self-signed.internal"])
    (tmp_path / "b.crt").write_bytes(cert)
    (tmp_path / "b.key").write_bytes(key)
    backend = backends("loose", tls=(str(tmp_path / "b.crt"), str(tmp_path / "b.key")))
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "re", "ports": [port], "domains": ["*"], "tls": "terminate-and-reencrypt", "http": False,
         "targets": [backend.address], "backend_verify": False}]})
    result = yield deferToThread(tls_exchange, port, "front.test", b"data")
    assert result["reply"] == b"loose:data"
    assert backend.connections[0].received == b"data"
    assert router.get_stats()["proxy"]["routes"]["re"]["errors"] == {}
