"""Outbound line discipline: only CRLF, no line over 998 octets, on every delivery path.

A raw-socket next hop records the DATA bytes exactly as they cross the wire (aiosmtpd
would normalise them) for forward, MX and DSN deliveries; a DKIM-signed message
still verifies there, because signing covers the normalised bytes.
"""

from __future__ import annotations

import dkim
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.names import dns

from dcrouter.delivery.lines import LINE_LIMIT, dot_stuff, normalise
from dcrouter.delivery.smtpclient import wire_data
from dcrouter.message import DkimSigning, Route
from tests.delivery.harness import Stack, wait_for
from tests.delivery.peers import start_dns
from tests.delivery.rawpeer import RawNextHop

LONG_HEADER = b"X-Long: " + b"h" * 1500
LONG_BODY = b"." + b"b" * 2999
#: Bare CR, bare LF, CR CR LF, a line starting with a dot, long lines in header and body.
UGLY = (b"From: <sender@example.org>\r\nTo: <a@example.com>\r\nSubject: ugly\r\n" +
        LONG_HEADER + b"\r\n\r\nbare\rcr\nbare lf\r\r\ncrcrlf\r\n" + LONG_BODY +
        b"\r\n.\r\nend")


def assert_clean_wire(raw: bytes) -> list[bytes]:
    """DATA as sent: CRLF-terminated lines, no CR or LF inside one, none over 998 octets."""
    assert raw.endswith(b"\r\n.\r\n")
    lines = raw[:-5].split(b"\r\n")
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, line[:80]
        text = line[1:] if line.startswith(b"..") else line   # the transparency dot
        assert len(text) <= LINE_LIMIT, len(text)
    return [line[1:] if line.startswith(b"..") else line for line in lines]


def test_normalise_line_ends_and_lengths():
    assert normalise(b"a\rb\nc\r\r\nd\r\ne") == b"a\r\nb\r\nc\r\nd\r\ne\r\n"
    assert normalise(b"x" * 998 + b"\r\n") == b"x" * 998 + b"\r\n"          # at the limit
    assert normalise(b"x" * 999) == b"x" * 998 + b"\r\n x\r\n"               # one over
    wrapped = normalise(b"y" * 3000 + b"\r\n").split(b"\r\n")
    assert [len(p) for p in wrapped] == [998, 998, 998, 9, 0]   # 998 + 997 + 997 + 8
    assert all(p.startswith(b" ") for p in wrapped[1:4])
    assert b"".join(p[1:] if i else p for i, p in enumerate(wrapped)) == b"y" * 3000
    clean = normalise(UGLY)
    assert normalise(clean) == clean, "idempotent"
    assert wire_data(UGLY) == dot_stuff(clean)
    assert wire_data(b".a\n") == b"..a\r\n"


@pytest_twisted.ensureDeferred
async def test_forward_mx_and_dsn_send_only_crlf_and_short_lines(tmp_path):
    forward = RawNextHop().start()
    mx = RawNextHop(rcpt_replies={"gone@example.test": "550 5.1.1 no such user"}).start()
    sender_side = RawNextHop().start()
    records = {"example.test": [dns.Record_MX(10, b"mx.example.test")],
               "mx.example.test": [dns.Record_A("127.0.0.1")]}
    dns_port, dns_number = start_dns(reactor, records)
    stack = Stack(str(tmp_path), delivery={"nameservers": (f"127.0.0.1:{dns_number}",),
                                           "mx_port": mx.port},
                  rules=[{"pattern": "*@example.org", "mode": "forward",
                          "target": {"server": sender_side.host, "port": sender_side.port}}])
    try:
        await stack.send(Route("forward", forward.host, forward.port), ["a@example.com"],
                         body=UGLY)
        await stack.send(Route("mx"), ["ok@example.test", "gone@example.test"], body=UGLY)
        await wait_for(lambda: forward.data and mx.data and sender_side.data, 20)
        for raw in (forward.data[0], mx.data[0]):
            lines = assert_clean_wire(raw)
            assert lines[3] == LONG_HEADER[:998] and lines[4] == b" " + LONG_HEADER[998:]
            assert b"bare" in lines and b"cr" in lines and b"crcrlf" in lines
            assert lines[-1] == b"end" and b"." in lines
        # the DSN (its own delivery) carries the original headers, the long one included
        dsn = assert_clean_wire(sender_side.data[0])
        assert LONG_HEADER[:998] in dsn and b"Final-Recipient: rfc822; gone@example.test" in dsn
    finally:
        await stack.stop()
        await dns_port.stopListening()
        for peer in (forward, mx, sender_side):
            peer.stop()


@pytest_twisted.ensureDeferred
async def test_an_envelope_with_a_line_break_is_never_sent(tmp_path):
    """A CR or LF in an envelope address would inject a command: refused before MAIL."""
    peer = RawNextHop().start()
    stack = Stack(str(tmp_path))
    try:
        ids = await stack.send(Route("forward", peer.host, peer.port),
                               ["a@example.com\r\nRCPT TO:<b@evil.test>"], mail_from="")
        item = await wait_for(lambda: (stack.queue.finished.get(ids[0]) or (0, None))[1])
        assert item.status == "failed" and item.recipients[0].code == 553
        ids = await stack.send(Route("forward", peer.host, peer.port), ["ok@example.com"],
                               mail_from="x\n@example.org")
        item = await wait_for(lambda: (stack.queue.finished.get(ids[0]) or (0, None))[1])
        assert item.status == "failed" and "5.1.3" in item.recipients[0].message
        assert "MAIL" not in peer.commands and "RCPT" not in peer.commands
    finally:
        await stack.stop()
        peer.stop()


@pytest_twisted.ensureDeferred
async def test_the_dkim_signature_covers_the_bytes_sent(tmp_path):
    peer = RawNextHop().start()
    stack = Stack(str(tmp_path))
    try:
        stack.dkim_keys.get("example.org", "sel1", create=True)
        await stack.send(Route("forward", peer.host, peer.port), ["a@example.com"], body=UGLY,
                         dkim=DkimSigning("example.org", "sel1"))
        await wait_for(lambda: peer.data)
        lines = assert_clean_wire(peer.data[0])
        received = b"\r\n".join(lines) + b"\r\n"
        assert received.startswith(b"DKIM-Signature:")
        record = stack.dkim_keys.get("example.org", "sel1", create=False).public_record().encode()

        def dnsfunc(name, timeout=5):
            return record
        assert await threads.deferToThread(dkim.verify, received, dnsfunc=dnsfunc)
    finally:
        await stack.stop()
        peer.stop()


def _reference(message: bytes, limit: int) -> bytes:
    """normalise spelled out the slow, obvious way: every CR*LF or lone CR ends a line;
    each line over ``limit`` is cut after ``limit`` octets, continuations start with a space
    and hold at most ``limit - 1`` more."""
    import re
    lines = re.split(rb"\r*\n|\r", message)
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for line in lines:
        if limit > 1 and len(line) > limit:
            out.append(line[:limit])
            rest = line[limit:]
            while rest:
                out.append(b" " + rest[:limit - 1])
                rest = rest[limit - 1:]
        else:
            out.append(line)
    return b"".join(line + b"\r\n" for line in out)


def test_normalise_matches_the_obvious_implementation():
    """The fast checks (counts of CR/LF/CRLF, a line-end-anchored search) decide exactly as
    the line-by-line definition does, for random mixes of line ends and line lengths."""
    import random
    rnd = random.Random(14)
    pieces = [b"a", b"\r", b"\n", b"\r\n", b"\r\r\n", b".", b"x" * 9, b"y" * 10, b"z" * 11,
              b"w" * 997, b"v" * 998, b"u" * 999]
    for _ in range(2000):
        message = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 10)))
        for limit in (LINE_LIMIT, 10):
            assert normalise(message, limit) == _reference(message, limit), (message, limit)
