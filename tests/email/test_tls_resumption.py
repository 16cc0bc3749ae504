"""TLS session resumption on inbound STARTTLS and implicit TLS (issue 14 item 6).

Python's ``ssl`` client keeps the session of a first connection and offers it on the
second (``wrap_socket(session=...)``): the server resumes it - TLS 1.3 and TLS 1.2,
STARTTLS and the implicit-TLS port - unless ``tls.session_tickets = false``; after a
ticket key rotation the old session no longer resumes and a new one does.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread


def _reply(f: Any) -> bytes:
    while True:
        line = f.readline()
        if not line or line[3:4] != b"-":
            return line


def client(ca: str, version: ssl.TLSVersion) -> ssl.SSLContext:
    """The client's context (a session resumes only with the context that made it)."""
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = context.maximum_version = version
    return context


def session_over(port: int, context: ssl.SSLContext, implicit: bool,
                 session: Optional[ssl.SSLSession] = None) -> tuple[ssl.SSLSession, bool]:
    """One SMTP session with TLS (STARTTLS, or TLS from the first byte); EHLO inside TLS, so
    a TLS 1.3 ticket has arrived; returns (its session, whether it was resumed)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    if implicit:
        tls = context.wrap_socket(raw, server_hostname="127.0.0.1", session=session)
        f = tls.makefile("rb")
        assert _reply(f).startswith(b"220 ")
    else:
        f = raw.makefile("rb")
        assert _reply(f).startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\n")
        _reply(f)
        raw.sendall(b"STARTTLS\r\n")
        assert _reply(f).startswith(b"220 ")
        tls = context.wrap_socket(raw, server_hostname="127.0.0.1", session=session)
        f = tls.makefile("rb")
    tls.sendall(b"EHLO client.test\r\n")
    assert _reply(f).startswith(b"250 ")
    tls.sendall(b"QUIT\r\n")
    _reply(f)
    reused = tls.session_reused
    out = tls.session
    tls.close()
    assert out is not None
    return out, reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2],
                         ids=["tls1.3", "tls1.2"])
@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
@pytest_twisted.inlineCallbacks
def test_second_connection_resumes(start_server: Any, version: ssl.TLSVersion,
                                   implicit: bool) -> None:
    run = start_server()
    port = run.ports["smtps" if implicit else "smtp"]
    ctx = client(run.certs["ca.pem"], version)
    first, reused_first = yield deferToThread(session_over, port, ctx, implicit)
    second, reused_second = yield deferToThread(session_over, port, ctx, implicit, first)
    assert not reused_first and reused_second


@pytest_twisted.inlineCallbacks
def test_tickets_off_no_resumption(start_server: Any) -> None:
    run = start_server(tls={"session_tickets": False})
    ctx, port = client(run.certs["ca.pem"], ssl.TLSVersion.TLSv1_3), run.ports["smtp"]
    first, _ = yield deferToThread(session_over, port, ctx, False)
    _, reused = yield deferToThread(session_over, port, ctx, False, first)
    assert not reused


@pytest_twisted.inlineCallbacks
def test_rotated_ticket_key_ends_old_sessions(start_server: Any) -> None:
    run = start_server()
    ctx, port = client(run.certs["ca.pem"], ssl.TLSVersion.TLSv1_3), run.ports["smtp"]
    old, _ = yield deferToThread(session_over, port, ctx, False)
    assert run.server.rotate_ticket_key()
    again, reused_old = yield deferToThread(session_over, port, ctx, False, old)
    _, reused_new = yield deferToThread(session_over, port, ctx, False, again)
    assert not reused_old and reused_new
    assert run.server._rotation is not None and run.server._rotation.running
