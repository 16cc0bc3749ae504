"""Fixtures of the email server tests: a UnifiedEmailServer in the test reactor."""

from __future__ import annotations

import smtplib
import ssl
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from dcrouter.config import parse_config
from dcrouter.email.server import UnifiedEmailServer
from dcrouter.service import Extensions, RouterContext
from tests.email.certs import make_ca_and_server
from tests.email.handlers import RecordingHandler
from tests.support.net import free_port

PASSWORD = "s3cret-pass"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: Any) -> dict[str, str]:
    """A test CA and a server certificate for mail.dcrouter.test and 127.0.0.1."""
    return make_ca_and_server(str(tmp_path_factory.mktemp("certs")))


class Running:
    """A started server with its handler, ports and client helpers."""

    def __init__(self, server: UnifiedEmailServer, handler: RecordingHandler,
                 ports: dict[str, int], certs: dict[str, str]) -> None:
        self.server = server
        self.handler = handler
        self.ports = ports
        self.certs = certs

    def client_context(self) -> ssl.SSLContext:
        """Verifies the server against the test CA (hostname 127.0.0.1)."""
        return ssl.create_default_context(cafile=self.certs["ca.pem"])

    def smtp(self, port: str = "smtp", timeout: float = 15) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.ports[port], timeout=timeout)

    def smtps(self, timeout: float = 15) -> smtplib.SMTP_SSL:
        return smtplib.SMTP_SSL("127.0.0.1", self.ports["smtps"], timeout=timeout,
                                context=self.client_context())


@pytest.fixture
def start_server(tmp_path: Any, certs: dict[str, str]) -> Any:
    """``start_server(**email_overrides)`` -> Running; stopped after the test."""
    started: list[UnifiedEmailServer] = []

    def start(handler: Any = None, extensions: Any = None, **email: Any) -> Running:
        ports = {"smtp": free_port(), "submission": free_port(), "smtps": free_port()}
        section: dict[str, Any] = {
            "hostname": "mail.dcrouter.test",
            "listen": "127.0.0.1",
            "ports": [ports["smtp"], ports["submission"], ports["smtps"]],
            "submission_ports": [ports["submission"]],
            "implicit_tls_ports": [ports["smtps"]],
            "tls": {"cert_path": certs["server.pem"], "key_path": certs["server.key"]},
            "auth": {"users": [{"username": "alice", "password": PASSWORD}]},
        }
        for key, value in email.items():
            if isinstance(value, dict) and isinstance(section.get(key), dict):
                section[key] = {**section[key], **value}
            else:
                section[key] = value
        options = parse_config({"router": {"state_dir": str(tmp_path / "state")},
                                "email": section})
        context = RouterContext(options, reactor, extensions or Extensions())
        if handler is None:
            handler = RecordingHandler()
            handler.reactor = reactor
        assert options.email is not None
        server = UnifiedEmailServer(options.email, handler, context)
        server.startService()
        started.append(server)
        return Running(server, handler, ports, certs)

    yield start
    for server in started:
        pytest_twisted.blockon(server.stopService())
