"""A running router with real traffic for the console tests (API JSON and headless Chromium).

The router runs the default configuration on free ports plus:

* mail rules that deliver locally (``*@localhost``), to an aiosmtpd sink that
  accepts (``*@sink.test``) or refuses one recipient with 550 (``*@reject.test``:
  a bounce, a DSN back to the sender and a suppression), and to a port where
  nothing listens (``*@hold.test``: deferred items that stay in the queue);
* DKIM keys for a domain this router's DNS serves and one it does not;
* proxy routes: ``web`` (passthrough to a dead target: health checks fail),
  ``http`` (TCP to a small HTTP backend), ``secure`` (terminating with a
  certificate that expires in 5 days) and ``shop`` (terminating, certificate
  ordered from an ACME server that cannot be reached);
* a DNS zone with transfers allowed to 127.0.0.1 and NOTIFY sent to a small
  UDP secondary that acknowledges;
* ``api.history_interval = 1`` so the figures history samples every second.

:func:`make_traffic` sends SMTP messages, proxy connections and DNS queries over
real sockets and waits until the router has handled them.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import smtplib
import socket
import ssl
import struct
import time
from email.message import EmailMessage
from typing import Any

import dns.message
import dns.query
import dns.rcode
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor, threads

from tests.api.support import TOKEN, Client
from tests.delivery.peers import Sink
from tests.support.configs import default_config_with_free_ports
from tests.support.net import free_port
from tests.support.router import options_from, start_router, stop_router

REJECTED = "gone@reject.test"
#: A refusal whose text carries markup, as a hostile next hop may send: shown as text only.
REJECT_REPLY = "550 5.1.1 <gone@reject.test>: no such user <img src=x onerror=alert(1)>"
UNREACHABLE = 9


class _Backend(protocol.Protocol):
    """Answers one HTTP request (or any bytes) with a small HTTP response, then closes."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhello world\n")
        self.transport.loseConnection()


class _Secondary(protocol.DatagramProtocol):
    """A DNS secondary that acknowledges every NOTIFY (RFC 1996 section 4.7)."""

    def __init__(self) -> None:
        self.notifies = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if len(data) < 12 or (data[2] >> 3) & 0xF != 4:
            return
        self.notifies += 1
        end = data.index(b"\x00", 12) + 5             # the question: name, type, class
        header = data[:2] + bytes([0x80 | (4 << 3) | 0x04, 0]) + struct.pack("!HHHH", 1, 0, 0, 0)
        assert self.transport is not None
        self.transport.write(header + data[12:end], addr)


def expiring_certificate(directory: str, name: str, days: float) -> tuple[str, str]:
    """A self-signed certificate for ``name`` valid for ``days`` more days."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Console Test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=80))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, f"{name}.crt")
    key_path = os.path.join(directory, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


@dataclasses.dataclass
class ConsoleEnv:
    """The router, its API client, the peers and the ports of one console test run."""

    router: Any
    client: Client
    ports: dict[str, int]
    sink: Sink
    secondary: _Secondary
    listeners: list[Any]
    state_dir: str
    sent: dict[str, Any] = dataclasses.field(default_factory=dict)


async def start_console_env(directory: str) -> ConsoleEnv:
    """Start the peers and the router (see the module docstring)."""
    os.makedirs(directory, exist_ok=True)
    state_dir = os.path.join(directory, "var")
    sink = Sink().start()
    sink.handler.rcpt_replies[REJECTED] = REJECT_REPLY
    backend = reactor.listenTCP(0, protocol.Factory.forProtocol(_Backend), interface="127.0.0.1")
    secondary = _Secondary()
    secondary_port = reactor.listenUDP(0, secondary, interface="127.0.0.1")
    data, ports = default_config_with_free_ports(state_dir)
    ports["secure"] = free_port()
    ports["backend"] = backend.getHost().port
    ports["secondary"] = secondary_port.getHost().port
    cert_path, key_path = expiring_certificate(directory, "expiring.console.test", days=5)
    backend_target = f"127.0.0.1:{ports['backend']}"
    data["api"].update(token=TOKEN, history_interval=1)
    email = data["email"]
    email["dkim"] = {"domains": ["console.test", "elsewhere.test"]}
    email["domain_rules"] += [
        {"pattern": "*@sink.test", "mode": "forward",
         "target": {"server": "127.0.0.1", "port": sink.port}},
        {"pattern": "*@reject.test", "mode": "forward",
         "target": {"server": "127.0.0.1", "port": sink.port}},
        {"pattern": "*@hold.test", "mode": "forward",
         "target": {"server": "127.0.0.1", "port": UNREACHABLE}},
    ]
    data["proxy"]["routes"] = [
        {"name": "web", "ports": [ports["https"]], "domains": ["*"], "tls": "passthrough",
         "targets": [f"127.0.0.1:{UNREACHABLE}"], "health_check_interval": 1.0},
        {"name": "http", "ports": [ports["http"]], "domains": ["*"],
         "targets": [backend_target]},
        {"name": "secure", "ports": [ports["secure"]], "domains": ["expiring.console.test"],
         "tls": "terminate", "cert_path": cert_path, "key_path": key_path,
         "targets": [backend_target], "acme": False},
        {"name": "shop", "ports": [ports["secure"]], "domains": ["shop.console.test"],
         "tls": "terminate", "targets": [backend_target]},
    ]
    data["proxy"]["acme"] = {"enabled": True, "directory_url": f"https://127.0.0.1:{UNREACHABLE}/dir",
                             "http_port": ports["http"], "retry_backoff": 3600.0,
                             "check_interval": 3600.0}
    data["dns"]["zones"] = [{"origin": "console.test", "records": [
        {"name": "@", "type": "A", "value": "127.0.0.1"},
        {"name": "www", "type": "A", "value": "127.0.0.1"},
        {"name": "mail", "type": "A", "value": "127.0.0.1"},
        {"name": "@", "type": "MX", "value": "10 mail.console.test."}]}]
    data["dns"]["allow_transfer"] = ["127.0.0.1/32"]
    data["dns"]["notify"] = [f"127.0.0.1:{ports['secondary']}"]
    router = start_router(options_from(data, state_dir))
    return ConsoleEnv(router, Client(ports["api"]), ports, sink, secondary,
                      [backend, secondary_port], state_dir)


async def stop_console_env(env: ConsoleEnv) -> None:
    """Stop the router and every peer."""
    await stop_router(env.router)
    for port in env.listeners:
        await defer.maybeDeferred(port.stopListening)
    await threads.deferToThread(env.sink.stop)


def _send_mail(port: int, recipients: list[str], subject: str) -> None:
    message = EmailMessage()
    message["From"] = "ops@localhost"
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message.set_content("console test\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.send_message(message, from_addr="ops@localhost", to_addrs=recipients)


def _proxy_traffic(ports: dict[str, int], connections: int) -> list[bytes]:
    answers = []
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", ports["http"]), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: console.test\r\n\r\n")
            chunks = []
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
            answers.append(b"".join(chunks))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:   # the passthrough route's only target is down: the proxy closes the connection
        with socket.create_connection(("127.0.0.1", ports["https"]), timeout=10) as s:
            with context.wrap_socket(s, server_hostname="web.console.test"):
                pass
    except (OSError, ssl.SSLError):
        pass
    return answers


def _dns_traffic(port: int, names: list[str]) -> list[str]:
    rcodes = []
    for name in names:
        answer = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port,
                               timeout=5)
        rcodes.append(dns.rcode.to_text(answer.rcode()))
    return rcodes


async def wait_until(predicate: Any, timeout: float = 30.0, what: str = "") -> None:
    """Poll ``predicate()`` (in the reactor) every 0.1 s until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        d: defer.Deferred = defer.Deferred()
        reactor.callLater(0.1, d.callback, None)
        await d


async def sleep(seconds: float) -> None:
    """Let the reactor run for ``seconds``."""
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


async def make_traffic(env: ConsoleEnv) -> dict[str, Any]:
    """Mail, proxy connections and DNS queries; returns what was sent (also in env.sent)."""
    ports = env.ports
    mails = [(["alice@localhost"], "local 1"), (["bob@localhost"], "local 2"),
             (["one@sink.test", "two@sink.test"], "to the sink"),
             (["ok@reject.test", REJECTED], "half refused"),
             (["a@hold.test"], "held 1"), (["b@hold.test"], "held 2")]
    for recipients, subject in mails:
        await threads.deferToThread(_send_mail, ports["smtp"], recipients, subject)
    answers = await threads.deferToThread(_proxy_traffic, ports, 3)
    names = ["www.console.test", "console.test", "mail.console.test", "nope.console.test",
             "other.console.test"]
    rcodes = await threads.deferToThread(_dns_traffic, ports["dns"], names)
    delivery = env.router.email.delivery

    def handled() -> bool:
        counters = delivery.counters
        return (counters.get("delivered", 0) >= 6 and counters.get("failed", 0) >= 1
                and counters.get("deferred", 0) >= 2 and not delivery.in_flight)
    await wait_until(handled, what="deliveries, the bounce and the deferrals")
    proxy = env.router.by_name["proxy"]
    await wait_until(lambda: not any(t["healthy"] for t in proxy.get_stats()["routes"]["web"]
                                     ["targets"].values()),
                     what="the dead target to fail its health check")
    await wait_until(lambda: env.secondary.notifies > 0 and not env.router.by_name[
        "dns"].notifier.pending, what="NOTIFY acknowledged")
    env.sent = {"mails": mails, "recipients": sum(len(r) for r, _ in mails),
                "proxy_answers": answers, "dns": dict(zip(names, rcodes))}
    return env.sent


async def settled_history(env: ConsoleEnv) -> None:
    """Wait until the figures history holds a sample taken after the traffic."""
    history = env.router.history
    after = env.router.reactor.seconds()
    await wait_until(lambda: history.latest() is not None and history.latest()[0] > after + 0.5,
                     what="a history sample after the traffic")
