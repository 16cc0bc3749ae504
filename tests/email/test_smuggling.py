"""SMTP smuggling (CVE-2023-51766 class): raw bytes in, an aiosmtpd sink out, through a whole router.

Every shape of a "fake" end of data - ``\\n.\\n``, ``\\n.\\r\\n``, ``\\r\\n.\\n``,
``\\r.\\r`` and the rest - is followed by a second, smuggled transaction.  With
the default ``bare_newline = "normalize"`` the sink must receive exactly one
message, the smuggled commands inside its body as text; with ``"reject"`` the
client gets ``550 5.5.2`` and the sink nothing.
"""

from __future__ import annotations

import re
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.email.gateway import gateway, settle, wait_for  # noqa: F401 - the fixture
from tests.email.test_bdat import Client, crlf

#: A fake end of data, then commands that would start a second transaction downstream.
SMUGGLED = (b"MAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@fwd.test>\r\nDATA\r\n"
            b"From: admin@bank.test\r\nSubject: smuggled\r\n\r\nsend money\r\n")
SHAPES = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n.\r",
          b"\r.\n", b"\r\n\r.\r\n", b"\r\n.\r\r\n", b"\n\n.\n\n", b"\r\n.\x00\r\n"]
HEAD = b"From: a@sender.test\r\nTo: b@fwd.test\r\nSubject: first\r\n\r\nbody"


def _one_session(port: int, shape: bytes, bdat: bool = False) -> list[str]:
    """One transaction whose content holds ``shape`` + SMUGGLED; every reply read."""
    c = Client(port)
    replies = [c.hello()]
    replies.append(c.cmd("MAIL FROM:<a@sender.test>"))
    replies.append(c.cmd("RCPT TO:<b@fwd.test>"))
    content = HEAD + shape + SMUGGLED
    if bdat:
        replies.append(c.bdat(content[:50]))
        replies.append(c.bdat(content[50:], last=True))
    else:
        replies.append(c.cmd("DATA"))
        c.send(content + b".\r\n")
        replies.append(c.reply())
    try:
        replies.append(c.cmd("QUIT"))
    except ConnectionError as e:
        replies.append(f"closed {e}")
    c.close()
    return replies


def _expected(shape: bytes) -> bytes:
    """The message as the sink must see it after dcrouter's Received header.

    The reference semantics, line by line: a line ends at LF (one CR before it
    dropped); a dot at the start of a line is removed unless the line is a lone
    dot (which only ends the data after CRLF and with CRLF); a bare CR inside a
    line becomes CRLF.
    """
    out = []
    for line in (HEAD + shape + SMUGGLED).split(b"\n")[:-1]:
        line = line[:-1] if line.endswith(b"\r") else line
        if line.startswith(b".") and line != b".":
            line = line[1:]
        out.append(line.replace(b"\r", b"\r\n") + b"\r\n")
    return b"".join(out)


@pytest_twisted.inlineCallbacks
def test_every_smuggling_shape_gives_one_message_with_the_bytes_kept(gateway: Any) -> None:
    gw = gateway()

    def client() -> list[list[str]]:
        return [_one_session(gw.port, shape) for shape in SHAPES]

    sessions = yield deferToThread(client)
    for shape, replies in zip(SHAPES, sessions):
        codes = [r[:3] for r in replies]
        # 220/EHLO, MAIL, RCPT, 354, one 250 for the one message, 221: nothing answered twice
        assert codes == ["250", "250", "250", "354", "250", "221"], (shape, replies)
        assert replies[4].startswith("250 2.0.0 Ok: queued as "), (shape, replies)
    yield wait_for(lambda: len(gw.sink.messages) >= len(SHAPES))
    yield settle()
    assert len(gw.sink.messages) == len(SHAPES)  # never a second, smuggled message
    got = sorted(m.content for m in gw.sink.messages)
    assert all(m.mail_from == "a@sender.test" and m.rcpt_tos == ["b@fwd.test"]
               for m in gw.sink.messages)
    for shape in SHAPES:
        expected = _expected(shape)
        match = [c for c in got if c.endswith(expected)]
        assert match, (shape, expected)
        assert match[0].startswith(b"Received: from client.test ([127.0.0.1])")
        assert re.search(rb"[^\r]\n|\r[^\n]", match[0]) is None  # no bare CR or LF left
    # where the fake terminator is a lone dot, it arrived as a "." line of the body
    for shape in (b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r.\n"):
        assert _expected(shape) == crlf(HEAD + shape + SMUGGLED)
        assert b"body\r\n.\r\nMAIL FROM:<admin@bank.test>\r\n" in _expected(shape)


@pytest_twisted.inlineCallbacks
def test_bdat_content_with_fake_terminators_is_one_message(gateway: Any) -> None:
    gw = gateway()

    def client() -> list[list[str]]:
        return [_one_session(gw.port, shape, bdat=True) for shape in SHAPES[:4]]

    sessions = yield deferToThread(client)
    for replies in sessions:
        assert [r[:3] for r in replies] == ["250", "250", "250", "250", "250", "221"], replies
    yield wait_for(lambda: len(gw.sink.messages) >= 4)
    yield settle()
    assert len(gw.sink.messages) == 4
    for shape in SHAPES[:4]:
        # (BDAT has no dot-stuffing: every dot stays)
        assert any(m.content.endswith(crlf(HEAD + shape + SMUGGLED)) for m in gw.sink.messages)


@pytest_twisted.inlineCallbacks
def test_reject_mode_refuses_bare_newlines_and_hangs_up(gateway: Any) -> None:
    gw = gateway(bare_newline="reject")

    def client() -> tuple:
        data = _one_session(gw.port, b"\n.\n")
        chunked = _one_session(gw.port, b"\r.\r", bdat=True)
        c = Client(gw.port)
        c.hello()
        c.send(b"MAIL FROM:<a@sender.test>\n")  # a bare LF on a command line
        command = c.reply()
        closed = c.closed()
        c.close()
        clean = _one_session(gw.port, b"\r\n..\r\n")  # proper CRLF and dot-stuffing
        return data, chunked, command, closed, clean

    data, chunked, command, closed, clean = yield deferToThread(client)
    assert data[4] == "550 5.5.2 Error: bare <LF> received" and data[5].startswith("closed")
    assert chunked[3].startswith("250 2.0.0 50 octets")
    assert chunked[4] == "550 5.5.2 Error: bare <LF> received"
    assert chunked[5].startswith("closed")
    assert command == "550 5.5.2 Error: bare <LF> received" and closed
    assert clean[4].startswith("250 2.0.0 Ok: queued as ")
    yield wait_for(lambda: gw.sink.messages)
    yield settle()
    assert len(gw.sink.messages) == 1
    assert gw.sink.messages[0].content.endswith(b"body\r\n.\r\n" + SMUGGLED)
    stats = gw.router.by_name["email"].server.get_stats()
    assert stats["rejected_by_reason"]["bare_newline"] == 3


@pytest_twisted.inlineCallbacks
def test_reject_mode_exempts_the_exclusions_but_still_ends_only_at_crlf_dot_crlf(
        gateway: Any) -> None:
    gw = gateway(bare_newline="reject", bare_newline_exclusions=["127.0.0.0/8"])

    def client() -> list[str]:
        return _one_session(gw.port, b"\n.\n")

    replies = yield deferToThread(client)
    assert [r[:3] for r in replies] == ["250", "250", "250", "354", "250", "221"], replies
    yield wait_for(lambda: gw.sink.messages)
    yield settle()
    assert len(gw.sink.messages) == 1
    assert gw.sink.messages[0].content.endswith(_expected(b"\n.\n"))
