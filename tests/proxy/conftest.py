"""Fixtures of the proxy tests: a test CA, backend servers on loopback, a proxy in the reactor."""

from __future__ import annotations

import datetime
import json
import os
import socket
import ssl
from typing import Any, Optional

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from tests.support.net import free_port  # noqa: F401 (re-exported)
from tests.support.router import options_from, start_router, stop_router


class CertAuthority:
    """A CA made with ``cryptography`` that issues leaf certificates for names."""

    def __init__(self, directory: str, name: str = "dcrouter test CA") -> None:
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(True, False, False, False, False, True, True,
                                                  False, False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = os.path.join(directory, "ca.pem")
        with open(self.path, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, names: list[str], stem: Optional[str] = None) -> tuple[str, str]:
        """A leaf certificate and key for ``names``; returns (cert_path, key_path)."""
        import ipaddress
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=10))
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        stem = stem or names[0].replace("*", "star")
        cert_path = os.path.join(self.dir, f"{stem}.crt")
        key_path = os.path.join(self.dir, f"{stem}.key")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return cert_path, key_path

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this CA."""
        return ssl.create_default_context(cafile=self.path)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: Any) -> CertAuthority:
    return CertAuthority(str(tmp_path_factory.mktemp("ca")))


# -- backends ----------------------------------------------------------------------

@implementer(IHalfCloseableProtocol)
class _EchoProtocol(Protocol):
    """Replies ``<tag>:<data>`` to each chunk; records everything received; closes on EOF."""

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionMade(self) -> None:
        self.received = b""
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.factory.active += 1  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.write(self.factory.tag + b":" + data)  # type: ignore

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.active -= 1  # type: ignore[attr-defined]


class _HttpProtocol(Protocol):
    """Answers the first request head with a JSON body: tag, request line, headers."""

    def connectionMade(self) -> None:
        self.buffer = b""
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.factory.active += 1  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head = self.buffer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        body = json.dumps({"tag": self.factory.tag.decode(),  # type: ignore[attr-defined]
                           "request": head[0],
                           "headers": dict(line.split(": ", 1) for line in head[1:])}).encode()
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"  # type: ignore
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.active -= 1  # type: ignore[attr-defined]


class Backend:
    """A server on 127.0.0.1 (or ::1): ``echo`` or ``http``, optionally TLS."""

    def __init__(self, tag: str, kind: str = "echo", tls: Optional[tuple[str, str]] = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.factory = Factory.forProtocol(_EchoProtocol if kind == "echo" else _HttpProtocol)
        self.factory.noisy = False
        self.factory.tag = tag.encode()  # type: ignore[attr-defined]
        self.factory.connections = []  # type: ignore[attr-defined]
        self.factory.active = 0  # type: ignore[attr-defined]
        if tls:
            with open(tls[0], "rb") as f:
                cert = f.read()
            with open(tls[1], "rb") as f:
                key = f.read()
            options = tssl.PrivateCertificate.loadPEM(cert + key).options()
            self.port = reactor.listenSSL(port, self.factory, options, interface=host)
        else:
            self.port = reactor.listenTCP(port, self.factory, interface=host)
        self.host = host

    @property
    def address(self) -> str:
        port = self.port.getHost().port
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    @property
    def connections(self) -> list:
        return self.factory.connections  # type: ignore[attr-defined]

    def stop(self) -> defer.Deferred:
        return defer.maybeDeferred(self.port.stopListening)


@pytest.fixture
def backends() -> Any:
    made: list[Backend] = []

    def make(tag: str, kind: str = "echo", tls: Optional[tuple[str, str]] = None,
             host: str = "127.0.0.1", port: int = 0) -> Backend:
        backend = Backend(tag, kind, tls, host, port)
        made.append(backend)
        return backend
    yield make
    for b in made:
        if b.port.connected:
            pytest_twisted.blockon(b.stop())


def pytest_generate_tests(metafunc: Any) -> None:
    """A module with ``BOTH_RELAYS = True`` runs each test that uses ``proxy_router`` twice:
    on the splice relay (the default) and on the Twisted fallback (``[proxy] splice = false``)."""
    if getattr(metafunc.module, "BOTH_RELAYS", False) and "relay" in metafunc.fixturenames:
        metafunc.parametrize("relay", ["splice", "twisted"], indirect=True)


@pytest.fixture
def relay(request: Any) -> str:
    """Which relay the proxy of a test uses (see :func:`pytest_generate_tests`)."""
    from dcrouter.proxy import splice
    path = getattr(request, "param", "splice")
    if path == "splice" and not splice.available():
        raise RuntimeError("os.splice is missing: the splice relay needs Linux and Python >= 3.10")
    return path


@pytest.fixture
def proxy_router(tmp_path: Any, relay: str) -> Any:
    """``start(proxy_section_dict)`` -> a running router; stopped after the test."""
    routers: list[Any] = []
    path = relay

    def start(proxy: dict, **sections: Any) -> Any:
        if path == "twisted":
            proxy = {"splice": False, **proxy}
        data = {"proxy": {"listen": "127.0.0.1", **proxy},
                "router": {"shutdown_timeout": 3}, **sections}
        router = start_router(options_from(data, str(tmp_path / "state")))
        routers.append(router)
        return router
    yield start
    for r in routers:
        if r.running:
            pytest_twisted.blockon(stop_router(r))


# -- blocking clients (run them in deferToThread) ---------------------------------------

def tls_exchange(port: int, server_name: Optional[str], payload: bytes = b"ping",
                 context: Optional[ssl.SSLContext] = None, host: str = "127.0.0.1") -> dict:
    """TLS to the proxy; returns the reply, the peer certificate's names and the ALPN."""
    if context is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as s:
            s.sendall(payload)
            reply = s.recv(65536)
            der = s.getpeercert(binary_form=True)
            cert = x509.load_der_x509_certificate(der)
            try:
                names = cert.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
            except x509.ExtensionNotFound:
                names = []
            return {"reply": reply, "names": names, "alpn": s.selected_alpn_protocol(),
                    "version": s.version(), "issuer": cert.issuer.rfc4514_string()}


def recv_all(sock: socket.socket) -> bytes:
    """Read until the peer closes."""
    out = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk


def http_get(port: int, host_header: Optional[str], path: str = "/", extra: str = "",
             address: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """A raw HTTP/1.1 GET; returns (status, headers, body)."""
    with socket.create_connection((address, port), timeout=10) as s:
        lines = [f"GET {path} HTTP/1.1"]
        if host_header is not None:
            lines.append(f"Host: {host_header}")
        lines.append("Connection: close")
        if extra:
            lines.append(extra)
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = recv_all(s)
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in header_lines)}
    return int(status_line.split(" ")[1]), headers, body


def closed_without_reply(port: int, payload: bytes, host: str = "127.0.0.1") -> bool:
    """Send ``payload``; True if the proxy closed without sending a byte."""
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(payload)
            return s.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def proxy_port() -> int:
    """A free loopback port for a proxy listener."""
    return free_port()

