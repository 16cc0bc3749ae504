"""The SMTP server with real clients (smtplib, raw sockets, swaks) over loopback."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl
import subprocess
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from dcrouter.errors import PolicyRejection
from dcrouter.service import Extensions
from tests.email.conftest import PASSWORD
from tests.email.handlers import BrokenObserver, RecordingObserver

MSG = b"From: a@local.test\r\nTo: b@local.test\r\nSubject: hi\r\n\r\nhello\r\n"


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def sessions_gone(server: Any, timeout: float = 10.0) -> Any:
    """Wait until the server has seen every client go (the machine may be loaded)."""
    for _ in range(int(timeout / 0.05)):
        if not server.sessions:
            return
        yield sleep(0.05)
    raise AssertionError(f"sessions still open: {server.get_stats()}")


class Raw:
    """A line-oriented raw SMTP client over a blocking socket (run it in a thread)."""

    def __init__(self, port: int, timeout: float = 15, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        """One (possibly multi-line) reply, lines joined by newlines."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed: " + "\n".join(lines))
            text = line.decode().rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def spool_leftovers(server: Any) -> set[str]:
    """Spool files with content (prepared files are empty until a message is written)."""
    return {name for name in os.listdir(server.spool_dir)
            if os.path.getsize(os.path.join(server.spool_dir, name)) > 0}


def received_header(data: bytes) -> str:
    end = data.index(b"\r\n", data.index(b";"))
    return data[:end].decode()


# -- sending over each kind of port ------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_plain_then_starttls_with_certificate_check(start_server: Any) -> None:
    run = start_server()

    def client() -> tuple:
        with run.smtp() as s:
            code, _ = s.ehlo("client.test")
            plain_features = dict(s.esmtp_features)
            s.sendmail("a@local.test", ["b@local.test"], MSG)
            s.starttls(context=run.client_context())
            s.ehlo("client.test")
            tls_features = dict(s.esmtp_features)
            cipher = s.sock.cipher()
            s.sendmail("a@local.test", ["c@local.test"], MSG)
            return plain_features, tls_features, cipher

    plain, tls, cipher = yield deferToThread(client)
    for ext in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "starttls", "smtputf8"):
        assert ext in plain
    assert plain["size"] == str(52428800)
    assert "auth" not in plain  # AUTH only over TLS
    assert tls["auth"].split() == ["PLAIN", "LOGIN"] and "starttls" not in tls
    messages = run.handler.messages
    assert len(messages) == 2
    first, second = messages[0]["message"], messages[1]["message"]
    assert first.recipients == ["b@local.test"] and second.recipients == ["c@local.test"]
    h1, h2 = received_header(messages[0]["data"]), received_header(messages[1]["data"])
    assert "with ESMTP id " + first.queue_id in h1 and "using" not in h1
    assert f"with ESMTPS id {second.queue_id}" in h2
    assert f"(using {cipher[1]} with cipher {cipher[0]})" in h2
    assert "for <c@local.test>" in h2 and "from client.test ([127.0.0.1])" in h2
    assert run.handler.body(0) == MSG
    assert second.session.tls and second.session.tls_version == cipher[1]
    assert first.session.correlation_id == second.session.correlation_id
    assert not spool_leftovers(run.server)


@pytest_twisted.inlineCallbacks
def test_implicit_tls_with_auth_plain(start_server: Any) -> None:
    run = start_server()

    def client() -> Any:
        with run.smtps() as s:
            s.ehlo("client.test")
            s.login("alice", PASSWORD)  # smtplib prefers PLAIN among PLAIN/LOGIN
            s.sendmail("alice@local.test", ["bob@remote.example"], MSG)
            return s.sock.version()

    version = yield deferToThread(client)
    message = run.handler.messages[0]["message"]
    assert message.session.auth_user == "alice"
    assert message.session.protocol == "ESMTPSA"
    assert f"with ESMTPSA id {message.queue_id}" in received_header(run.handler.messages[0]["data"])
    assert version == message.session.tls_version == "TLSv1.3"


@pytest_twisted.inlineCallbacks
def test_submission_requires_auth_plain_and_login(start_server: Any) -> None:
    run = start_server()

    def client(mechanism: str) -> tuple:
        with run.smtp("submission") as s:
            s.ehlo("client.test")
            refused = s.docmd("MAIL FROM:<alice@local.test>")
            s.docmd("RSET")
            s.starttls(context=run.client_context())
            s.ehlo("client.test")
            s.user, s.password = "alice", PASSWORD
            method = s.auth_plain if mechanism == "PLAIN" else s.auth_login
            auth = s.auth(mechanism, method)
            s.sendmail("alice@local.test", ["x@remote.example"], MSG)
            return refused, auth

    for mechanism in ("PLAIN", "LOGIN"):
        refused, auth = yield deferToThread(client, mechanism)
        assert refused == (530, b"5.7.0 Authentication required")
        assert auth == (235, b"2.7.0 Authentication successful")
    assert [m["message"].session.auth_user for m in run.handler.messages] == ["alice", "alice"]
    assert all(m["message"].session.submission for m in run.handler.messages)
    assert run.server.get_stats()["rejected_by_reason"]["auth_required"] == 2


@pytest_twisted.inlineCallbacks
def test_swaks_starttls_auth_with_ca_verification(start_server: Any) -> None:
    run = start_server()
    cmd = ["swaks", "--server", f"127.0.0.1:{run.ports['submission']}", "--tls",
           "--tls-verify", "--tls-ca-path", run.certs["ca.pem"],
           "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", PASSWORD,
           "--from", "alice@local.test", "--to", "z@remote.example",
           "--h-Subject", "swaks", "--body", "hello from swaks", "--timeout", "15"]
    result = yield deferToThread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"<~  250 2\.0\.0 Ok: queued as [0-9A-Z]{20}", result.stdout)
    assert b"hello from swaks" in run.handler.messages[0]["data"]
    assert run.handler.messages[0]["message"].session.protocol == "ESMTPSA"


# -- policy ----------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_relay_denied_unless_authenticated(start_server: Any) -> None:
    run = start_server(relay_networks=["10.0.0.0/8"])

    def client() -> tuple:
        with run.smtp() as s:
            s.ehlo("client.test")
            s.docmd("MAIL FROM:<x@outside.example>")
            remote = s.docmd("RCPT TO:<victim@remote.example>")
            local = s.docmd("RCPT TO:<b@local.test>")
            data = s.data(MSG)
            s.starttls(context=run.client_context())
            s.ehlo("client.test")
            s.login("alice", PASSWORD)
            s.docmd("MAIL FROM:<alice@local.test>")
            after_auth = s.docmd("RCPT TO:<victim@remote.example>")
            s.docmd("RSET")
            return remote, local, data[0], after_auth

    remote, local, data, after_auth = yield deferToThread(client)
    assert remote == (554, b"5.7.1 Relay access denied")
    assert local == (250, b"2.1.5 Ok") and data == 250
    assert after_auth == (250, b"2.1.5 Ok")
    assert run.handler.messages[0]["message"].recipients == ["b@local.test"]
    assert run.handler.messages[0]["message"].session.relay_permitted is False
    assert run.server.get_stats()["rejected_by_reason"]["relay"] == 1


@pytest_twisted.inlineCallbacks
def test_relay_networks_fill_relay_permitted(start_server: Any) -> None:
    run = start_server()

    def client() -> Any:
        with run.smtp() as s:
            return s.sendmail("a@x.example", ["b@remote.example"], MSG)

    assert (yield deferToThread(client)) == {}
    assert run.handler.messages[0]["message"].session.relay_permitted is True


@pytest_twisted.inlineCallbacks
def test_auth_without_tls_is_refused(start_server: Any) -> None:
    run = start_server()

    def client() -> tuple:
        with run.smtp("submission") as s:
            s.ehlo("client.test")
            plain = s.docmd("AUTH PLAIN AGFsaWNlAHMzY3JldC1wYXNz")
            login = s.docmd("AUTH LOGIN")
            return plain, login, s.docmd("NOOP")

    plain, login, noop = yield deferToThread(client)
    expected = (538, b"5.7.11 Encryption required for requested authentication mechanism")
    assert plain == expected and login == expected
    assert noop[0] == 250


@pytest_twisted.inlineCallbacks
def test_policy_rejection_and_handler_failure_replies(start_server: Any) -> None:
    run = start_server()
    observer = RecordingObserver()
    run.server.add_observer(observer)
    run.handler.reject_sender = PolicyRejection(550, "5.7.1", "Sender blocked", "blocklist")

    def client() -> tuple:
        with run.smtp() as s:
            s.ehlo("client.test")
            blocked = s.docmd("MAIL FROM:<spam@bad.example>")
            run.handler.reject_sender = None
            run.handler.fail_next = RuntimeError("disk on fire /secret/path")
            s.docmd("MAIL FROM:<a@local.test>")
            s.docmd("RCPT TO:<b@local.test>")
            failed = s.data(MSG)
            again = s.sendmail("a@local.test", ["b@local.test"], MSG)
            return blocked, failed, again

    blocked, failed, again = yield deferToThread(client)
    assert blocked == (550, b"5.7.1 Sender blocked")
    assert failed == (451, b"4.3.0 Temporary local problem, try again later")
    assert again == {} and len(run.handler.messages) == 1
    assert not spool_leftovers(run.server)  # the failed message's spool file is gone
    stats = run.server.get_stats()
    assert stats["rejected_by_reason"]["blocklist"] == 1
    assert stats["rejected_by_reason"]["handler_error"] == 1
    assert stats["messages_accepted"] == 1
    assert ("message_rejected" in observer.names()
            and ("blocklist", 550) in [e[1][1:] for e in observer.events
                                       if e[0] == "message_rejected"])


@pytest_twisted.inlineCallbacks
def test_max_recipients(start_server: Any) -> None:
    run = start_server(max_recipients=3)

    def client() -> list:
        with run.smtp() as s:
            s.ehlo("client.test")
            s.docmd("MAIL FROM:<a@local.test>")
            replies = [s.docmd(f"RCPT TO:<r{i}@local.test>") for i in range(4)]
            replies.append(s.data(MSG))
            return replies

    replies = yield deferToThread(client)
    assert [r[0] for r in replies[:3]] == [250, 250, 250]
    assert replies[3] == (452, b"4.5.3 Error: too many recipients")
    assert replies[4][0] == 250
    assert len(run.handler.messages[0]["message"].recipients) == 3


# -- DATA ----------------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_oversize_streamed_then_next_message_on_same_session(start_server: Any) -> None:
    run = start_server()  # the default limit: 50 MB
    limit = run.server.options.max_message_size
    line = b"x" * 998 + b"\r\n"
    total = 60 * 1024 * 1024

    def client() -> tuple:
        raw = Raw(run.ports["smtp"], timeout=60)
        raw.reply()
        raw.cmd("EHLO client.test")
        raw.cmd("MAIL FROM:<a@local.test>")
        raw.cmd("RCPT TO:<b@local.test>")
        assert raw.cmd("DATA").startswith("354")
        chunk = line * 64
        sent = 0
        while sent < total:  # streamed in 64 KB pieces, never built whole
            raw.send(chunk)
            sent += len(chunk)
        oversize = raw.cmd(".")
        raw.cmd("MAIL FROM:<a@local.test>")
        raw.cmd("RCPT TO:<b@local.test>")
        raw.cmd("DATA")
        raw.send(MSG)
        normal = raw.cmd(".")
        raw.cmd("QUIT")
        raw.close()
        return oversize, normal, sent

    oversize, normal, sent = yield deferToThread(client)
    assert sent > limit
    assert oversize == "552 5.3.4 Error: message file too big"
    assert normal.startswith("250 2.0.0 Ok: queued as ")
    assert len(run.handler.messages) == 1 and run.handler.body() == MSG
    assert not spool_leftovers(run.server)
    assert run.server.get_stats()["rejected_by_reason"]["size"] == 1


@pytest_twisted.inlineCallbacks
def test_size_parameter_over_limit_refused(start_server: Any) -> None:
    run = start_server(max_message_size=1000)

    def client() -> tuple:
        with run.smtp() as s:
            s.ehlo("client.test")
            return s.docmd("MAIL FROM:<a@local.test> SIZE=1001"), \
                s.docmd("MAIL FROM:<a@local.test> SIZE=1000")

    big, ok = yield deferToThread(client)
    assert big == (552, b"5.3.4 Message size exceeds fixed limit") and ok[0] == 250


@pytest_twisted.inlineCallbacks
def test_dot_stuffing_round_trip_byte_exact(start_server: Any) -> None:
    run = start_server()
    body = (b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\n...three\r\n"
            b" . not at start\r\nend.\r\n.\r\n\r\n.")
    expected = body + b"\r\n"  # smtplib ends the message with CRLF

    def client() -> Any:
        with run.smtp() as s:
            return s.sendmail("a@local.test", ["b@local.test"], body)

    yield deferToThread(client)
    assert run.handler.body() == expected


@pytest_twisted.inlineCallbacks
def test_bare_lf_nul_and_8bit_accepted_as_postfix_does(start_server: Any) -> None:
    """Postfix 3.9's defaults: bare LF/CR normalized to CRLF (smtpd_forbid_bare_newline =
    normalize), NUL and 8-bit kept without BODY=8BITMIME - but ".\n" does not end DATA."""
    run = start_server()

    def client() -> str:
        raw = Raw(run.ports["smtp"])
        raw.reply()
        raw.cmd("EHLO client.test")
        raw.cmd("MAIL FROM:<a@local.test>")  # no BODY=8BITMIME
        raw.cmd("RCPT TO:<b@local.test>")
        raw.cmd("DATA")
        raw.send(b"Subject: bare\n\nline one\nnul\x00here\r\ncaf\xc3\xa9\n..dot\nbare\rcr\n"
                 b".\n")
        raw.send(b"still data\r\n.\r\n")
        reply = raw.reply()
        raw.close()
        return reply

    reply = yield deferToThread(client)
    assert reply.startswith("250 ")
    assert run.handler.body() == (b"Subject: bare\r\n\r\nline one\r\nnul\x00here\r\n"
                                  b"caf\xc3\xa9\r\n.dot\r\nbare\r\ncr\r\n.\r\nstill data\r\n")
    assert run.handler.messages[0]["message"].body_8bit is True


@pytest_twisted.inlineCallbacks
def test_smtputf8_address(start_server: Any) -> None:
    run = start_server()

    def client() -> tuple:
        raw = Raw(run.ports["smtp"])
        raw.reply()
        raw.cmd("EHLO client.test")
        undeclared = raw.cmd("MAIL FROM:<jörg@local.test>")
        raw.cmd("MAIL FROM:<jörg@local.test> SMTPUTF8 BODY=8BITMIME")
        raw.cmd("RCPT TO:<zoë@local.test>")
        raw.cmd("DATA")
        raw.send("Subject: ü\r\n\r\nhallo\r\n.\r\n".encode())
        reply = raw.reply()
        raw.close()
        return undeclared, reply

    undeclared, reply = yield deferToThread(client)
    assert undeclared.startswith("553 5.6.7")
    assert reply.startswith("250 ")
    message = run.handler.messages[0]["message"]
    assert message.smtputf8 and message.mail_from == "jörg@local.test"
    assert message.recipients == ["zoë@local.test"]


# -- pipelining ----------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_pipelined_transactions_in_one_write(start_server: Any) -> None:
    run = start_server()
    run.handler.delay = 0.05  # handle_message answers later: replies must stay in order

    def client() -> list:
        raw = Raw(run.ports["smtp"])
        raw.reply()
        raw.cmd("EHLO client.test")
        raw.send(b"MAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\n"
                 b"RCPT TO:<c@remote.example>\r\nRCPT TO:<d@local.test>\r\nDATA\r\n")
        replies = [raw.reply() for _ in range(5)]
        raw.send(b"Subject: one\r\n\r\nfirst\r\n.\r\nMAIL FROM:<a@local.test>\r\n"
                 b"RCPT TO:<e@local.test>\r\nDATA\r\n")
        replies += [raw.reply() for _ in range(4)]
        raw.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        replies += [raw.reply() for _ in range(4)]
        replies.append("closed" if raw.closed() else "open")
        raw.close()
        return replies

    replies = yield deferToThread(client)
    codes = [r[:3] for r in replies[:-1]]
    assert codes == ["250", "250", "250", "250", "354", "250", "250", "250", "354",
                     "250", "250", "250", "221"]
    assert replies[-1] == "closed"
    assert [m["message"].recipients for m in run.handler.messages] == \
        [["b@local.test", "c@remote.example", "d@local.test"], ["e@local.test"]]
    assert run.handler.body(0) == b"Subject: one\r\n\r\nfirst\r\n"
    assert run.handler.body(1) == b"Subject: two\r\n\r\nsecond\r\n"


# -- limits -----------------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_idle_timeout(start_server: Any) -> None:
    run = start_server(connection_timeout=1)
    observer = RecordingObserver()
    run.server.add_observer(observer)

    def client() -> tuple:
        raw = Raw(run.ports["smtp"])
        raw.reply()
        raw.cmd("EHLO client.test")
        started = time.monotonic()
        reply = raw.reply()
        waited = time.monotonic() - started
        closed = raw.closed()
        raw.close()
        return reply, waited, closed

    reply, waited, closed = yield deferToThread(client)
    assert reply == "421 4.4.2 mail.dcrouter.test Error: timeout exceeded"
    assert closed and waited > 0.5
    yield sessions_gone(run.server)
    assert observer.names()[-1] == "connection_lost"
    assert run.server.get_stats()["connections_current"] == 0


@pytest_twisted.inlineCallbacks
def test_connection_cap_per_ip(start_server: Any) -> None:
    run = start_server(max_connections_per_ip=2, max_connections=100)

    def client() -> tuple:
        first, second = Raw(run.ports["smtp"]), Raw(run.ports["smtp"])
        first.reply(), second.reply()
        third = Raw(run.ports["smtp"])
        refused = third.reply()
        closed = third.closed()
        other_ip = Raw(run.ports["smtp"], source="127.0.0.2")  # a different client IP
        other = other_ip.reply()
        first.cmd("QUIT")
        first.close()
        deadline = time.monotonic() + 10
        while True:  # until the server has seen the first client go
            fourth = Raw(run.ports["smtp"])
            after = fourth.reply()
            if after.startswith("220 ") or time.monotonic() > deadline:
                break
            fourth.close()
            time.sleep(0.05)
        for r in (second, third, other_ip, fourth):
            r.close()
        return refused, closed, other, after

    refused, closed, other, after = yield deferToThread(client)
    assert refused.startswith("421 4.7.0 ") and closed
    assert other.startswith("220 ") and after.startswith("220 ")
    assert run.server.get_stats()["rejected_by_reason"]["connection_limit"] >= 1


@pytest_twisted.inlineCallbacks
def test_connection_cap_global(start_server: Any) -> None:
    run = start_server(max_connections=2, max_connections_per_ip=100)

    def client() -> str:
        a = Raw(run.ports["smtp"])
        b = Raw(run.ports["submission"], source="127.0.0.3")
        a.reply(), b.reply()
        c = Raw(run.ports["smtp"], source="127.0.0.4")
        refused = c.reply()
        for r in (a, b, c):
            r.close()
        return refused

    refused = yield deferToThread(client)
    assert refused == ("421 4.7.0 mail.dcrouter.test Error: too many connections, "
                       "try again later")


@pytest_twisted.inlineCallbacks
def test_unknown_command_limit(start_server: Any) -> None:
    run = start_server(max_errors=3)

    def client() -> list:
        raw = Raw(run.ports["smtp"])
        raw.reply()
        replies = [raw.cmd("FOO"), raw.cmd("BAR baz"), raw.cmd("QUUX")]
        replies.append("closed" if raw.closed() else "open")
        raw.close()
        return replies

    replies = yield deferToThread(client)
    assert replies[0] == replies[1] == "500 5.5.2 Error: command not recognized"
    assert replies[2] == "421 4.7.0 mail.dcrouter.test Error: too many errors"
    assert replies[3] == "closed"


@pytest_twisted.inlineCallbacks
def test_line_too_long(start_server: Any) -> None:
    run = start_server()

    def client() -> list:
        raw = Raw(run.ports["smtp"])
        raw.reply()
        replies = [raw.cmd("NOOP " + "x" * 2041)]  # 2048 octets with CRLF: allowed
        replies.append(raw.cmd("NOOP " + "x" * 2042))  # 2049 octets
        raw.send(b"NOOP " + b"y" * 5000)  # no newline yet: refused while still arriving
        replies.append(raw.reply())
        raw.send(b"yyyy\r\n")
        replies.append(raw.cmd("NOOP"))
        raw.close()
        return replies

    replies = yield deferToThread(client)
    assert replies == ["250 2.0.0 Ok", "500 5.5.2 Error: line too long",
                       "500 5.5.2 Error: line too long", "250 2.0.0 Ok"]


# -- events, shutdown, reload -------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_observers_see_events_and_a_broken_one_breaks_nothing(start_server: Any) -> None:
    observer = RecordingObserver()
    run = start_server(extensions=Extensions(email_observers=[BrokenObserver(), observer]))

    def client() -> None:
        with run.smtps() as s:
            s.ehlo("client.test")
            s.user, s.password = "alice", "wrong"
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.auth("PLAIN", s.auth_plain)
            s.login("alice", PASSWORD)
            s.sendmail("a@local.test", ["b@local.test"], MSG)

    yield deferToThread(client)
    yield sessions_gone(run.server)
    assert observer.names() == ["connection_made", "auth_failed", "auth_succeeded",
                                "message_received", "connection_lost"]
    ids = {e[1][0].correlation_id for e in observer.events}
    assert len(ids) == 1
    assert observer.events[3][1][2] == [run.handler.messages[0]["message"].queue_id]


@pytest_twisted.inlineCallbacks
def test_drain_waits_for_transaction_then_closes_idle_sessions(start_server: Any) -> None:
    run = start_server()
    run.handler.delay = 0.5

    def client() -> tuple:
        busy, idle = Raw(run.ports["smtp"]), Raw(run.ports["smtp"])
        busy.reply(), idle.reply()
        idle.cmd("EHLO idle.test")
        busy.cmd("EHLO busy.test")
        busy.cmd("MAIL FROM:<a@local.test>")
        busy.cmd("RCPT TO:<b@local.test>")
        busy.cmd("DATA")
        busy.send(MSG + b".\r\n")
        time.sleep(0.1)
        reactor.callFromThread(drains.append, run.server.drain())
        reply = busy.reply()
        busy_after = busy.reply()
        idle_reply = idle.reply()
        busy.close(), idle.close()
        return reply, busy_after, idle_reply

    drains: list = []
    yield run.server.stop_accepting()
    # listeners closed: a new connection is refused
    with pytest.raises(OSError):
        yield deferToThread(socket.create_connection, ("127.0.0.1", run.ports["smtp"]), 2)
    yield run.server.listeners.update(run.server._specs())  # listen again for this test
    reply, busy_after, idle_reply = yield deferToThread(client)
    assert reply.startswith("250 2.0.0 Ok: queued as")
    assert busy_after == idle_reply == "421 4.3.2 mail.dcrouter.test Service shutting down"
    yield drains[0]


@pytest_twisted.inlineCallbacks
def test_reconfigure_applies_limits_and_rebinds(start_server: Any) -> None:
    from tests.support.net import free_port
    run = start_server()
    options = run.server.options
    new_port = free_port()
    import dataclasses
    new = dataclasses.replace(options, max_recipients=1,
                              ports=(options.ports[0], options.ports[1], new_port),
                              implicit_tls_ports=(new_port,))
    yield run.server.reconfigure(new)
    ports = sorted(p for _, _, p in run.server.bound_addresses())
    assert ports == sorted(new.ports)

    def client() -> tuple:
        with smtplib.SMTP_SSL("127.0.0.1", new_port, context=run.client_context()) as s:
            s.ehlo("x")
            s.docmd("MAIL FROM:<a@local.test>")
            return s.docmd("RCPT TO:<a@local.test>"), s.docmd("RCPT TO:<b@local.test>")

    first, second = yield deferToThread(client)
    assert first[0] == 250 and second[0] == 452


@pytest_twisted.inlineCallbacks
def test_starttls_drops_pipelined_plaintext(start_server: Any) -> None:
    """RFC 3207 5: commands pipelined after STARTTLS must not run inside the TLS session."""
    run = start_server()

    def client() -> tuple:
        raw = Raw(run.ports["smtp"])
        raw.reply()
        raw.cmd("EHLO client.test")
        raw.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<injected@evil.example>\r\n")
        ready = raw.reply()
        tls = run.client_context().wrap_socket(raw.sock, server_hostname="127.0.0.1")
        f = tls.makefile("rb")
        tls.sendall(b"EHLO client.test\r\n")
        first = f.readline()
        tls.sendall(b"RCPT TO:<b@local.test>\r\n")
        while f.readline()[3:4] == b"-":
            pass
        rcpt = f.readline()
        tls.close()
        return ready, first, rcpt

    ready, first, rcpt = yield deferToThread(client)
    assert ready == "220 2.0.0 Ready to start TLS"
    assert first == b"250-mail.dcrouter.test\r\n"
    assert rcpt.startswith(b"503 5.5.1")  # the injected MAIL FROM never happened


@pytest_twisted.inlineCallbacks
def test_tls_min_version_enforced(start_server: Any) -> None:
    run = start_server(tls={"min_version": "TLSv1.3"})

    def client(maximum: ssl.TLSVersion) -> str:
        ctx = run.client_context()
        ctx.maximum_version = maximum
        try:
            with smtplib.SMTP_SSL("127.0.0.1", run.ports["smtps"], context=ctx, timeout=10) as s:
                return s.sock.version()
        except (ssl.SSLError, ConnectionError) as e:
            return "refused: " + type(e).__name__

    assert (yield deferToThread(client, ssl.TLSVersion.TLSv1_2)).startswith("refused")
    assert (yield deferToThread(client, ssl.TLSVersion.TLSv1_3)) == "TLSv1.3"


@pytest_twisted.inlineCallbacks
def test_reconfigure_users_and_self_signed_certificate(start_server: Any) -> None:
    import dataclasses
    from dcrouter.config.email import EmailAuthOptions, EmailTlsOptions, UserOptions
    run = start_server()
    options = run.server.options
    new = dataclasses.replace(
        options, tls=EmailTlsOptions(),  # no paths: a self-signed certificate
        auth=EmailAuthOptions(users=(UserOptions(username="dave", password="pw2"),)))
    yield run.server.reconfigure(new)

    def client(user: str, password: str) -> tuple:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with smtplib.SMTP_SSL("127.0.0.1", run.ports["smtps"], context=ctx, timeout=10) as s:
            s.ehlo("x")
            s.user, s.password = user, password
            try:
                code = s.auth("PLAIN", s.auth_plain)[0]
            except smtplib.SMTPAuthenticationError as e:
                code = e.smtp_code
            issuer = s.sock.getpeercert(binary_form=True)
            return code, issuer

    code_new, cert = yield deferToThread(client, "dave", "pw2")
    code_old, _ = yield deferToThread(client, "alice", PASSWORD)
    assert (code_new, code_old) == (235, 535)
    with open(run.certs["ca.pem"], "rb") as f:
        assert ssl.DER_cert_to_PEM_cert(cert).encode() != f.read()  # a different certificate
    assert os.path.exists(os.path.join(run.server.context.state_dir, "certs"))


@pytest_twisted.inlineCallbacks
def test_auth_required_everywhere_and_ipv6_listener(start_server: Any) -> None:
    from tests.support.net import free_port
    port = free_port(host="::1")
    run = start_server(listen="::1", ports=[port], submission_ports=[], implicit_tls_ports=[],
                       auth={"required": True})

    def client() -> tuple:
        with smtplib.SMTP("::1", port, timeout=10) as s:
            s.ehlo("v6.test")
            refused = s.docmd("MAIL FROM:<a@local.test>")
            s.docmd("RSET")
            s.starttls(context=ssl._create_unverified_context())
            s.ehlo("v6.test")
            s.login("alice", PASSWORD)
            return refused, s.sendmail("alice@local.test", ["b@remote.example"], MSG)

    refused, sent = yield deferToThread(client)
    assert refused == (530, b"5.7.0 Authentication required") and sent == {}
    message = run.handler.messages[0]["message"]
    assert message.session.client_ip == "::1" and message.session.relay_permitted
    assert "from v6.test ([IPv6:::1])" in received_header(run.handler.messages[0]["data"])
    assert run.server.bound_addresses() == [("tcp", "::1", port)]


@pytest_twisted.inlineCallbacks
def test_every_log_event_carries_the_correlation_id(start_server: Any) -> None:
    from twisted.logger import globalLogPublisher
    run = start_server()
    shared = RecordingObserver()
    run.server.context.observers["email"] = [shared]  # where the metrics registry subscribes
    events: list = []

    def watch(event: dict) -> None:
        if event.get("log_namespace", "").startswith("dcrouter.email"):
            events.append(event)

    globalLogPublisher.addObserver(watch)

    def client() -> None:
        with run.smtps() as s:
            s.ehlo("client.test")
            s.login("alice", PASSWORD)
            s.sendmail("a@local.test", ["b@local.test"], MSG)
            s.docmd("MAIL FROM:<a@local.test>")
            s.docmd("RCPT TO:<x@remote.example>")  # relayed (authenticated): accepted
            s.docmd("RSET")

    try:
        yield deferToThread(client)
        yield sessions_gone(run.server)
    finally:
        globalLogPublisher.removeObserver(watch)
    correlation = run.handler.messages[0]["message"].session.correlation_id
    session_events = [e for e in events if "correlation_id" in e]
    assert len(session_events) >= 4  # connect, AUTH, accepted, disconnect
    assert {e["correlation_id"] for e in session_events} == {correlation}
    assert shared.names()[0] == "connection_made" and "message_received" in shared.names()


class _BareHandler:
    """A handler with no methods at all: every call fails."""


@pytest_twisted.inlineCallbacks
def test_broken_handler_and_disk_failure_never_leak_internals(start_server: Any,
                                                              monkeypatch: Any) -> None:
    from dcrouter.email.spool import SpoolWriter
    run = start_server(handler=_BareHandler())
    run.handler = _BareHandler()

    def client() -> tuple:
        with run.smtp() as s:
            s.ehlo("client.test")
            mail = s.docmd("MAIL FROM:<a@local.test>")
        return mail

    mail = yield deferToThread(client)
    assert mail == (451, b"4.3.0 Temporary local problem, try again later")

    run2 = start_server()

    def failing_write(self: Any, data: bytes) -> None:
        raise OSError(28, "No space left on device /secret/spool")

    monkeypatch.setattr(SpoolWriter, "write", failing_write)

    def client2() -> tuple:
        raw = Raw(run2.ports["smtp"])
        raw.reply()
        raw.cmd("EHLO client.test")
        raw.cmd("MAIL FROM:<a@local.test>")
        raw.cmd("RCPT TO:<b@local.test>")
        raw.cmd("DATA")
        raw.send(MSG + b".\r\n")
        reply = raw.reply()
        closed = raw.closed()
        raw.close()
        return reply, closed

    reply, closed = yield deferToThread(client2)
    assert reply == ("421 4.3.0 mail.dcrouter.test Error: temporary local problem, "
                     "closing connection") and closed
    monkeypatch.undo()

    def client3() -> Any:
        with run2.smtp() as s:
            return s.sendmail("a@local.test", ["b@local.test"], MSG)

    assert (yield deferToThread(client3)) == {}
    assert not spool_leftovers(run2.server)


@pytest_twisted.inlineCallbacks
def test_client_certificates_asked_for_and_recorded(start_server: Any,
                                                    certs: dict[str, str]) -> None:
    run = start_server(tls={"ca_path": certs["ca.pem"]})

    def send(cert: str) -> None:
        ctx = run.client_context()
        if cert:
            ctx.load_cert_chain(run.certs[f"{cert}.pem"], run.certs[f"{cert}.key"])
        with smtplib.SMTP_SSL("127.0.0.1", run.ports["smtps"], context=ctx, timeout=10) as s:
            s.sendmail("a@local.test", ["b@local.test"], MSG)
        with smtplib.SMTP("127.0.0.1", run.ports["smtp"], timeout=10) as s:  # STARTTLS too
            s.starttls(context=ctx)
            s.sendmail("a@local.test", ["b@local.test"], MSG)

    for cert in ("client", "rogue", ""):
        yield deferToThread(send, cert)
    headers = [received_header(m["data"]) for m in run.handler.messages]
    assert len(headers) == 6
    for header in headers[:2]:
        assert '(Client CN "client.test", Issuer "dcrouter test CA" (verified OK))' in header
    for header in headers[2:4]:
        assert '(Client CN "rogue.test", Issuer "rogue CA" (not verified))' in header
    for header in headers[4:]:
        assert "Client CN" not in header and "(using TLSv1.3" in header


def test_client_ca_path_errors(tmp_path: Any) -> None:
    from dcrouter.email.clientcert import ClientCertPolicy
    from dcrouter.errors import ConfigError
    with pytest.raises(ConfigError, match="email.tls.ca_path: cannot read CA bundle"):
        ClientCertPolicy(str(tmp_path / "missing.pem"))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="email.tls.ca_path: invalid CA bundle"):
        ClientCertPolicy(str(bad))
