"""Real peers for delivery tests: aiosmtpd sinks, a test CA, a twisted.names DNS server."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import os
import socket
import ssl
from typing import Any, Optional

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.names import common, dns, error, server

from tests.support.net import free_port


@dataclasses.dataclass
class Received:
    """One message a sink accepted."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    helo: str
    tls: bool
    auth_user: Optional[str]


class SinkHandler:
    """aiosmtpd handler with scripted replies.

    ``rcpt_replies``: address -> reply for RCPT; ``data_replies``: replies
    used (popped) before accepting DATA; ``delay``: seconds to sleep in DATA.
    """

    def __init__(self, pipelining: bool = False) -> None:
        self.messages: list[Received] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_replies: list[str] = []
        self.delay = 0.0
        self.pipelining = pipelining
        self.sessions = 0

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.sessions += 1
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.data_replies:
            reply = self.data_replies.pop(0)
            if not reply.startswith("250"):
                return reply
        login = session.auth_data if session.authenticated else None
        user = None
        if login is not None:
            user = login.login.decode() if isinstance(login, LoginPassword) else str(login)
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content or envelope.content,
                                      session.host_name or "", session.ssl is not None, user))
        return "250 2.0.0 OK queued"


class Sink:
    """A running aiosmtpd server (in its own thread) on a loopback port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, pipelining: bool = False,
                 tls: Optional["CertAuthority"] = None, require_tls: bool = False,
                 users: Optional[dict[str, str]] = None, size_limit: Optional[int] = None,
                 smtputf8: bool = False) -> None:
        self.handler = SinkHandler(pipelining)
        self.host = host
        self.port = port or free_port(host=host)
        kwargs: dict[str, Any] = {}
        if tls is not None:
            kwargs["tls_context"] = tls.server_context()
            kwargs["require_starttls"] = require_tls
        if users is not None:
            def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                              data: Any) -> AuthResult:
                ok = (isinstance(data, LoginPassword) and
                      users.get(data.login.decode()) == data.password.decode())
                return AuthResult(success=ok, handled=False, auth_data=data)
            kwargs["authenticator"] = authenticator
            kwargs["auth_required"] = True
            kwargs["auth_require_tls"] = tls is not None
        if size_limit is not None:
            kwargs["data_size_limit"] = size_limit
        kwargs["enable_SMTPUTF8"] = smtputf8
        self.controller = Controller(self.handler, hostname=host, port=self.port,
                                     server_hostname="sink.test", ready_timeout=10,
                                     auth_exclude_mechanism=None, **kwargs)

    @property
    def messages(self) -> list[Received]:
        """Messages accepted so far."""
        return self.handler.messages

    def start(self) -> "Sink":
        """Start serving."""
        self.controller.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self.controller.stop()


class CertAuthority:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost."""

    def __init__(self, directory: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dcrouter test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(days=1))
              .not_valid_after(now + datetime.timedelta(days=30))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(key, hashes.SHA256()))
        skey = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                .issuer_name(name).public_key(skey.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.DNSName("mx.example.test"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                .sign(key, hashes.SHA256()))
        self.ca_path = os.path.join(directory, "ca.pem")
        self.cert_path = os.path.join(directory, "cert.pem")
        self.key_path = os.path.join(directory, "key.pem")
        with open(self.ca_path, "wb") as f:
            f.write(ca.public_bytes(serialization.Encoding.PEM))
        with open(self.cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(self.key_path, "wb") as f:
            f.write(skey.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))

    def server_context(self) -> ssl.SSLContext:
        """An SSLContext serving the certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


class ZoneResolver(common.ResolverBase):
    """An in-memory authority: name -> list of record payloads."""

    def __init__(self, records: dict[str, list[Any]]) -> None:
        super().__init__()
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred:
        key = name.decode("ascii").lower().rstrip(".")
        if key not in self.records:
            return defer.fail(error.DNSNameError(key))
        answers = [dns.RRHeader(name, p.TYPE, dns.IN, 60, p, auth=True)
                   for p in self.records[key] if type in (p.TYPE, dns.ALL_RECORDS)]
        return defer.succeed((answers, [], []))


def start_dns(reactor: Any, records: dict[str, list[Any]]) -> tuple[Any, int]:
    """Serve ``records`` over UDP on 127.0.0.1; returns (listening port, port number)."""
    factory = server.DNSServerFactory(authorities=[ZoneResolver(records)])
    factory.noisy = False
    protocol = dns.DNSDatagramProtocol(factory)
    protocol.noisy = False
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    return port, port.getHost().port


def port_free_on(host: str, port: int) -> bool:
    """Can ``host:port`` be bound now?"""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
