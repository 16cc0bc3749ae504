"""TLS termination: sessions resume (tickets, TLS 1.2 and 1.3, across SNI certificates),
ticket keys rotate, self-signed certificates are ECDSA P-256 unless configured otherwise."""

from __future__ import annotations

import socket
import ssl
import subprocess
from typing import Optional

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from tests.proxy.conftest import proxy_port


_contexts: dict = {}


def client_context(version: ssl.TLSVersion, cafile: Optional[str]) -> ssl.SSLContext:
    """One client context per (version, CA): Python resumes a session only on its context."""
    key = (version, cafile)
    if key not in _contexts:
        ctx = ssl.create_default_context(cafile=cafile) if cafile \
            else ssl.create_default_context()
        if not cafile:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = version
        _contexts[key] = ctx
    return _contexts[key]


def exchange(port: int, name: Optional[str], version: ssl.TLSVersion,
             session: Optional[ssl.SSLSession] = None,
             cafile: Optional[str] = None) -> tuple[bytes, bool, ssl.SSLSession, bytes]:
    """One TLS connection: send, read the echo; (reply, resumed, session, peer cert DER)."""
    ctx = client_context(version, cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name, session=session) as s:
            s.sendall(b"hi")
            reply = s.recv(100)                 # TLS 1.3: tickets arrive with the data
            der = s.getpeercert(binary_form=True)
            return reply, s.session_reused, s.session, der


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest_twisted.inlineCallbacks
def test_sessions_resume_for_default_and_sni_certificates(proxy_router, backends, test_ca,
                                                          version):
    backend = backends("R")
    cert, key = test_ca.issue(["named.test"])
    port = proxy_port()
    router = proxy_router({"routes": [
        {"name": "named", "ports": [port], "domains": ["named.test"], "tls": "terminate",
         "http": False, "targets": [backend.address], "cert_path": cert, "key_path": key},
        {"name": "any", "ports": [port], "domains": ["*"], "tls": "terminate", "http": False,
         "targets": [backend.address]}]})
    sessions = {}
    for name, cafile in ((None, None), ("named.test", test_ca.path)):
        reply, resumed, session, der = yield deferToThread(exchange, port, name, version,
                                                           None, cafile)
        assert reply == b"R:hi" and not resumed
        for _ in range(2):
            reply, resumed, session2, der2 = yield deferToThread(exchange, port, name, version,
                                                                 session, cafile)
            assert reply == b"R:hi" and resumed, (name, version)
            assert der2 == der                  # the same certificate on resumption
            session = session2 if version == ssl.TLSVersion.TLSv1_3 else session
        sessions[name] = session
    # new ticket keys: an old session no longer resumes (one full handshake), a new one does
    router.by_name["proxy"].certs.rotate_tickets()
    reply, resumed, session, _ = yield deferToThread(exchange, port, "named.test", version,
                                                     session, test_ca.path)
    assert reply == b"R:hi" and not resumed
    reply, resumed, _, _ = yield deferToThread(exchange, port, "named.test", version, session,
                                               test_ca.path)
    assert resumed


@pytest_twisted.inlineCallbacks
def test_ticket_keys_rotate_on_schedule_and_survive_a_reload(proxy_router, backends):
    from tests.support.router import options_from
    backend = backends("T")
    port = proxy_port()
    proxy = {"tls_ticket_rotation": 0.5, "routes": [
        {"name": "t", "ports": [port], "domains": ["*"], "tls": "terminate", "http": False,
         "targets": [backend.address]}]}
    router = proxy_router(proxy)
    service = router.by_name["proxy"]
    v13 = ssl.TLSVersion.TLSv1_3
    _, _, session, _ = yield deferToThread(exchange, port, None, v13)
    first = service.certs.getContext()
    yield task.deferLater(reactor, 1.2, lambda: None)
    assert service.certs.getContext() is not first       # rotated at least once
    _, resumed, session, _ = yield deferToThread(exchange, port, None, v13, session)
    assert not resumed
    # a reload that keeps the default certificate keeps the ticket keys
    proxy["tls_ticket_rotation"] = 0
    yield router._apply(options_from({"proxy": {"listen": "127.0.0.1", **proxy}},
                                     router.options.router.state_dir))
    _, resumed, session, _ = yield deferToThread(exchange, port, None, v13, session)
    assert resumed
    assert service._rotation is None


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
@pytest_twisted.inlineCallbacks
def test_self_signed_certificates_are_ecdsa_unless_configured(proxy_router, backends, kind):
    backend = backends("S")
    port = proxy_port()
    proxy = {"routes": [{"name": "s", "ports": [port], "domains": ["self.test"],
                         "tls": "terminate", "http": False, "targets": [backend.address]},
                        {"name": "rest", "ports": [port], "domains": ["*"],
                         "tls": "terminate", "http": False, "targets": [backend.address]}]}
    if kind == "rsa":
        proxy["self_signed_key"] = "rsa"
    proxy_router(proxy)
    for name in ("self.test", None):            # the name's own, and the default certificate
        reply, _, _, der = yield deferToThread(exchange, port, name, ssl.TLSVersion.TLSv1_3)
        assert reply == b"S:hi"
        key = x509.load_der_x509_certificate(der).public_key()
        if kind == "ecdsa":
            assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        else:
            assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048


@pytest_twisted.inlineCallbacks
def test_openssl_s_time_resumes_sessions(proxy_router, backends):
    """The C client of the benchmark (openssl s_time -reuse) sees resumed sessions."""
    backend = backends("O")
    port = proxy_port()
    proxy_router({"routes": [{"name": "o", "ports": [port], "domains": ["*"],
                              "tls": "terminate", "http": False,
                              "targets": [backend.address]}]})

    def s_time(version: str) -> str:
        return subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-reuse",
                               version, "-time", "1"], capture_output=True, text=True,
                              timeout=30).stdout
    # TLS 1.2 only: s_time never reads after a handshake, so it never sees the tickets of
    # TLS 1.3 (sent after the handshake); TLS 1.3 resumption is proven above with Python
    for version in ("-tls1_2",):
        out = yield deferToThread(s_time, version)
        # s_time prints '*' for a new session, 'r' for a reused one
        progress = "".join(line for line in out.splitlines() if set(line) <= set("*r"))
        assert progress.count("r") >= 5 and progress.count("*") <= 1, (version, out[-500:])
