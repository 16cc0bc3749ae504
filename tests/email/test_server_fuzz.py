"""Fuzzing the SMTP server: random and malformed command lines, garbage TLS handshakes.

The server must never crash, never send a traceback or internal detail, answer
every line with a well-formed reply, and keep serving new sessions.  The lines
include envelope addresses built from the pieces of the RFC 5321 grammar
(quoted strings with every special, quoted pairs, source routes, address
literals, UTF-8, percent hacks and bang paths) and DATA sections holding every
SMTP smuggling shape.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
from typing import Any

import pytest_twisted
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from tests.email.test_server import MSG

VERBS = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "EXPN", "HELP", "AUTH",
         "BDAT", "ehlo", "mail from:", "rcpt to:", "MAIL FROM:", "RCPT TO:", "Auth Plain",
         "AUTH LOGIN", "AUTH XOAUTH2", ".", "..", "", "\x00", "X-FOO"]
REPLY = re.compile(rb"^[2345]\d\d[ -][^\r\n]*$")
FORBIDDEN = (b"Traceback", b"File \"", b"Error(", b"Exception", b".py", b"twisted", b"dcrouter/")

_printable = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                            blacklist_characters="\r\n"), max_size=60)
#: Pieces of envelope addresses: what the grammar allows, and what it must refuse.
_PIECES = ["a", "b.c", '"', "\\", '\\"', "@", "%", "!", " ", "<", ">", ".", "..", "[", "]",
           "IPv6:", "::1", "1.2.3.4", "999.1.1.1", "@x.test:", "@a,@b:", "local.test", "ü", "用",
           "\u2028", "\x85", ";", "(", ")", ",", "postmaster", "no/such", "-", "xn--", "=",
           "\r", "\t", "\x7f", "a" * 70]
_address = st.lists(st.sampled_from(_PIECES), max_size=12).map("".join)
_envelope = st.builds(
    lambda verb, addr, params: f"{verb}<{addr}>{params}".encode("utf-8", "surrogatepass"),
    st.sampled_from(["MAIL FROM:", "RCPT TO:", "MAIL FROM: ", "RCPT TO:", "rcpt to:"]),
    st.one_of(_address, st.builds(lambda a, b: f"{a}@{b}", _address, _address),
              st.builds(lambda a, b: f'"{a}"@{b}', _address, _address)),
    st.sampled_from(["", " SMTPUTF8", " BODY=8BITMIME SMTPUTF8", " SIZE=10", " X=", " =",
                     " SMTPUTF8=x", "junk", " NOTIFY=SUCCESS,DELAY", " NOTIFY=NEVER,FAILURE",
                     " ORCPT=rfc822;a+2Bb@c", " ORCPT=utf-8;\\x{D800}", " ORCPT=rfc822;a+0D+0A",
                     " RET=FULL", " RET=HDRS RET=FULL", " ENVID=x+0D+0Ay", " ENVID=" + "e" * 120,
                     " SMTPUTF8 ORCPT=utf-8;j\u00f6rg@x", " NOTIFY"]))
#: DATA content that tries to end early (SMTP smuggling), then commands.
_smuggle = st.builds(
    lambda shape: b"DATA\r\nSubject: s\r\n\r\nbody" + shape
    + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<b@local.test>\r\nDATA\r\nsmuggled",
    st.sampled_from([b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r",
                     b"\r\n\r.\r\n", b"\r\n.\r\r\n", b"\r\n.\r\n"]))

_line = st.one_of(
    _envelope,
    _envelope,
    _smuggle,
    st.builds(lambda v, a: (v + " " + a).encode("utf-8"), st.sampled_from(VERBS), _printable),
    st.builds(lambda v, a: v.encode() + a, st.sampled_from(VERBS),
              st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))),
    st.builds(lambda a: b"MAIL FROM:<" + a.encode("utf-8", "surrogatepass") + b">" , _printable),
    st.builds(lambda a: b"RCPT TO:<" + a.encode("utf-8") + b"@local.test>", _printable),
    st.builds(lambda n, c: b"NOOP " + c * n, st.integers(400, 3000), st.sampled_from([b"x", b"\xff"])),
    st.sampled_from([b"EHLO fuzz.test", b"MAIL FROM:<a@local.test>", b"RCPT TO:<b@local.test>",
                     b"DATA", b".", b"RSET", b"AUTH PLAIN", b"*", b"MAIL FROM:<> SIZE=99999999999",
                     b"MAIL FROM:<a@local.test> BODY=BINARYMIME", b"RCPT TO:<postmaster>"]),
)
_ending = st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b"\r"])
_batch = st.lists(st.tuples(_line, _ending), min_size=200, max_size=260)


def _session(port: int, batch: list[tuple[bytes, bytes]],
             tls: "ssl.SSLContext | None" = None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as plain:
        sock = tls.wrap_socket(plain, server_hostname="127.0.0.1") if tls else plain
        payload = b"".join(line + end for line, end in batch)
        payload += b"\r\n.\r\n*\r\nQUIT\r\n"
        sock.sendall(payload)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def _check_output(output: bytes) -> None:
    lines = output.split(b"\r\n")
    assert lines[-1] == b""
    assert lines[0].startswith(b"220 ")
    for line in lines[:-1]:
        assert REPLY.match(line), line
        for word in FORBIDDEN:
            assert word not in line, line
    assert lines[-2].startswith((b"221 ", b"421 "))


@defer.inlineCallbacks
def _sessions_gone(server: Any) -> Any:
    """Wait (up to 5 s) until the server has seen every client go."""
    for _ in range(100):
        if server.get_stats()["connections_current"] == 0:
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"sessions still open: {server.get_stats()}")


def _still_serving(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        assert s.sendmail("a@local.test", ["b@local.test"], MSG) == {}


@pytest_twisted.inlineCallbacks
def test_random_command_lines_never_break_the_server(start_server: Any) -> None:
    run = start_server(max_errors=100000, connection_timeout=30)
    failures: list = []

    def watch(event: dict) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(watch)
    sent = [0]

    @settings(max_examples=50, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=_batch)
    def fuzz(batch: list) -> None:
        sent[0] += len(batch)
        _check_output(_session(run.ports["smtp"], batch))

    try:
        yield deferToThread(fuzz)
        yield deferToThread(_still_serving, run.ports["smtp"])
    finally:
        globalLogPublisher.removeObserver(watch)
    assert sent[0] >= 10000
    assert failures == []
    yield _sessions_gone(run.server)


@pytest_twisted.inlineCallbacks
def test_error_limit_closes_fuzzing_sessions(start_server: Any) -> None:
    run = start_server()  # max_errors = 10: random junk ends in 421

    @settings(max_examples=20, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=_batch)
    def fuzz(batch: list) -> None:
        _check_output(_session(run.ports["smtp"], batch))

    yield deferToThread(fuzz)
    yield deferToThread(_still_serving, run.ports["smtp"])


_CLIENT_HELLO_START = bytes.fromhex("160301")


@pytest_twisted.inlineCallbacks
def test_garbage_tls_handshakes(start_server: Any) -> None:
    run = start_server()
    failures: list = []

    def watch(event: dict) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(watch)

    def garbage(port: int, payload: bytes, starttls: bool) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            if starttls:
                f = sock.makefile("rb")
                f.readline()
                sock.sendall(b"EHLO x\r\n")
                while not f.readline().startswith(b"250 "):
                    pass
                sock.sendall(b"STARTTLS\r\n")
                f.readline()
            sock.sendall(payload)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            out = b""
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    out += data
            except (ConnectionResetError, socket.timeout):
                pass
            return out

    @settings(max_examples=80, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(payload=st.one_of(st.binary(min_size=1, max_size=2000),
                             st.binary(max_size=600).map(lambda b: _CLIENT_HELLO_START + b),
                             st.just(b"EHLO plain-text-on-tls-port\r\n")),
           starttls=st.booleans())
    def fuzz(payload: bytes, starttls: bool) -> None:
        port = run.ports["smtp"] if starttls else run.ports["smtps"]
        out = garbage(port, payload, starttls)
        for word in FORBIDDEN:
            assert word not in out

    def good_tls() -> None:
        ctx = ssl.create_default_context(cafile=run.certs["ca.pem"])
        with smtplib.SMTP_SSL("127.0.0.1", run.ports["smtps"], context=ctx, timeout=15) as s:
            assert s.sendmail("a@local.test", ["b@local.test"], MSG) == {}

    try:
        yield deferToThread(fuzz)
        yield deferToThread(good_tls)
    finally:
        globalLogPublisher.removeObserver(watch)
    assert failures == []
    yield _sessions_gone(run.server)


@pytest_twisted.inlineCallbacks
def test_random_command_lines_against_the_real_processor(start_server: Any, tmp_path: Any) -> None:
    """The same fuzzing with MultiModeProcessor (routing, relay policy) as the handler."""
    from dcrouter.config import parse_config
    from dcrouter.email.processor import MultiModeProcessor
    from dcrouter.email.routing import DomainRouter
    from dcrouter.service import Extensions, RouterContext
    from tests.email.support import RecordingQueue
    rules = [{"pattern": "*@local.test", "mode": "mta",
              "mta_options": {"allow_local_delivery": True}}]
    options = parse_config({"router": {"state_dir": str(tmp_path / "p")},
                            "email": {"domain_rules": rules, "relay_networks": ["10.0.0.0/8"]}})
    assert options.email is not None
    queue = RecordingQueue(str(tmp_path / "queue"))
    processor = MultiModeProcessor(options.email, DomainRouter.from_options(options.email), queue,
                                   RouterContext(options, reactor, Extensions()))
    run = start_server(handler=processor, max_errors=100000, domain_rules=rules,
                       relay_networks=["10.0.0.0/8"])
    failures: list = []

    def watch(event: dict) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(watch)

    @settings(max_examples=15, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=_batch)
    def fuzz(batch: list) -> None:
        _check_output(_session(run.ports["smtp"], batch))

    try:
        yield deferToThread(fuzz)
        yield deferToThread(_still_serving, run.ports["smtp"])
    finally:
        globalLogPublisher.removeObserver(watch)
    assert failures == []
    assert queue.requests  # the final well-formed message reached the queue
    yield _sessions_gone(run.server)


@pytest_twisted.inlineCallbacks
def test_random_command_lines_over_implicit_tls(start_server: Any) -> None:
    """The TLS transport's write path (no direct send) under the same fuzzing, with AUTH offered."""
    run = start_server(max_errors=100000)
    context = run.client_context()

    @settings(max_examples=10, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=_batch)
    def fuzz(batch: list) -> None:
        _check_output(_session(run.ports["smtps"], batch, tls=context))

    yield deferToThread(fuzz)
    yield _sessions_gone(run.server)


@pytest_twisted.inlineCallbacks
def test_random_command_lines_with_bare_newlines_refused(start_server: Any) -> None:
    """bare_newline = "reject": a session ends with 550 5.5.2 at its first bare LF, or as usual."""
    run = start_server(max_errors=100000, bare_newline="reject", relay_networks=["192.0.2.0/24"])
    ends: list[bytes] = []

    @settings(max_examples=15, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=_batch)
    def fuzz(batch: list) -> None:
        output = _session(run.ports["smtp"], batch)
        lines = output.split(b"\r\n")
        assert lines[-1] == b"" and lines[0].startswith(b"220 ")
        for line in lines[:-1]:
            assert REPLY.match(line), line
            for word in FORBIDDEN:
                assert word not in line, line
        assert lines[-2] in (b"550 5.5.2 Error: bare <LF> received",) or \
            lines[-2].startswith((b"221 ", b"421 ")), lines[-2]
        ends.append(lines[-2][:3])

    yield deferToThread(fuzz)
    yield deferToThread(_still_serving, run.ports["smtp"])
    assert b"550" in ends
    yield _sessions_gone(run.server)
