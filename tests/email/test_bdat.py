"""CHUNKING / BDAT (RFC 3030) over real sockets: plain, STARTTLS, implicit TLS, the full router.

smtplib has no BDAT, so these tests speak SMTP over raw (and ssl-wrapped) sockets,
always in a thread while the server runs in the test reactor.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from dcrouter.email.sessioncore import COMMAND_LINE_LIMIT
from tests.email.conftest import PASSWORD
from tests.email.handlers import RecordingHandler
from tests.email.test_server import Raw, received_header, sessions_gone, spool_leftovers
from tests.support.net import free_port
from tests.support.router import options_from, port_of, start_router, stop_router

#: Every byte value, lines with leading dots, a lone dot line, bare LF and CR,
#: and a DATA terminator in the middle: BDAT passes all of it through untouched,
#: except that bare LF and bare CR are written as CRLF (email.bare_newline = "normalize").
TRICKY = (b"Subject: chunks\r\nX-Binary: yes\r\n\r\n"
          + bytes(range(256))
          + b"\r\n.\r\n..two dots\r\n.leading\r\nbare lf\nbare cr\rmixed\n\r\n"
          + b"\r\n.\r\nafter a terminator\r\n\x00nul\r\nno final newline.")
#: What is stored for TRICKY: the "\t\n\x0b\x0c\r\x0e" of the byte run and the bare
#: line ends of the "bare" lines became CRLF; nothing else changed.
TRICKY_STORED = (b"Subject: chunks\r\nX-Binary: yes\r\n\r\n"
                 + bytes(range(10)) + b"\r\n\x0b\x0c\r\n" + bytes(range(14, 256))
                 + b"\r\n.\r\n..two dots\r\n.leading\r\nbare lf\r\nbare cr\r\nmixed\r\n\r\n"
                 + b"\r\n.\r\nafter a terminator\r\n\x00nul\r\nno final newline.")


def crlf(data: bytes) -> bytes:
    """``data`` with every bare CR and bare LF written as CRLF."""
    out, i = bytearray(), 0
    while i < len(data):
        byte = data[i:i + 1]
        if byte == b"\r" and data[i + 1:i + 2] == b"\n":
            out += b"\r\n"
            i += 2
            continue
        out += b"\r\n" if byte in (b"\r", b"\n") else byte
        i += 1
    return bytes(out)


class Client(Raw):
    """Raw SMTP with BDAT, STARTTLS and implicit TLS (blocking: run it in a thread)."""

    def __init__(self, port: int, context: Any = None, timeout: float = 30) -> None:
        super().__init__(port, timeout=timeout)
        if context is not None:  # implicit TLS
            self._wrap(context)

    def _wrap(self, context: Any) -> None:
        self.file.close()
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")

    def starttls(self, context: Any) -> str:
        reply = self.cmd("STARTTLS")
        self._wrap(context)
        return reply

    def hello(self) -> str:
        self.reply()
        return self.cmd("EHLO client.test")

    def envelope(self, sender: str = "a@local.test", *recipients: str) -> None:
        assert self.cmd(f"MAIL FROM:<{sender}>").startswith("250"), "MAIL"
        for rcpt in recipients or ("b@local.test",):
            assert self.cmd(f"RCPT TO:<{rcpt}>").startswith("250"), "RCPT"

    def bdat(self, data: bytes, last: bool = False) -> str:
        self.send(b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data)
        return self.reply()


def chunks_of(data: bytes, *sizes: int) -> list[bytes]:
    out, pos = [], 0
    for size in sizes:
        out.append(data[pos:pos + size])
        pos += size
    out.append(data[pos:])
    return out


# -- delivery -------------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_chunks_and_last_delivered_byte_exact(start_server: Any) -> None:
    run = start_server()
    # chunk edges fall inside CRLF pairs and just before a dot line
    pieces = chunks_of(TRICKY, 17, 1, 240, 2, 1, 60)

    def client() -> tuple:
        c = Client(run.ports["smtp"])
        ehlo = c.hello()
        c.envelope()
        replies = [c.bdat(piece) for piece in pieces[:-1]]
        replies.append(c.bdat(pieces[-1], last=True))
        c.cmd("QUIT")
        c.close()
        return ehlo, replies

    from twisted.logger import globalLogPublisher
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        ehlo, replies = yield deferToThread(client)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["body_command"] for e in events if "body_command" in e] == ["BDAT"]
    assert "250-CHUNKING" in ehlo.splitlines() and "BINARYMIME" not in ehlo
    assert replies[:-1] == [f"250 2.0.0 {len(p)} octets received" for p in pieces[:-1]]
    message = run.handler.messages[0]["message"]
    assert replies[-1] == f"250 2.0.0 Ok: queued as {message.queue_id}"
    assert run.handler.body() == TRICKY_STORED == crlf(TRICKY)
    assert message.body_8bit
    assert message.size == len(run.handler.messages[0]["data"])
    header = received_header(run.handler.messages[0]["data"])
    assert f"with ESMTP id {message.queue_id}" in header and "for <b@local.test>" in header
    assert not spool_leftovers(run.server)
    assert run.server.get_stats()["bytes_received"] == len(TRICKY_STORED)


@pytest_twisted.inlineCallbacks
def test_chunk_spread_over_many_writes(start_server: Any) -> None:
    """The command line and the chunk arrive in small pieces, with pauses between them."""
    run = start_server()
    body = b"Subject: slow\r\n\r\n" + b"0123456789" * 5000

    def client() -> str:
        c = Client(run.ports["smtp"])
        c.hello()
        c.envelope()
        c.send(b"BD")
        time.sleep(0.05)
        c.send(b"AT %d LA" % len(body))
        time.sleep(0.05)
        c.send(b"ST\r\n")
        for pos in range(0, len(body), 7000):
            c.send(body[pos:pos + 7000])
            time.sleep(0.01)
        reply = c.reply()
        c.close()
        return reply

    reply = yield deferToThread(client)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    assert run.handler.body() == body


@pytest_twisted.inlineCallbacks
def test_pipelined_chunks_and_transactions_in_one_write(start_server: Any) -> None:
    run = start_server()
    run.handler.delay = 0.05  # the LAST chunk is answered later: replies must stay in order
    first = [b"Subject: one\r\n\r\n", b".dot\r\n", b"end\r\n"]

    def client() -> list:
        c = Client(run.ports["smtp"])
        c.hello()
        c.send(b"MAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nRCPT TO:<c@local.test>\r\n"
               + b"".join(b"BDAT %d\r\n%s" % (len(p), p) for p in first[:-1])
               + b"BDAT %d LAST\r\n%s" % (len(first[-1]), first[-1])
               + b"MAIL FROM:<a@local.test>\r\nRCPT TO:<d@local.test>\r\nBDAT 0 LAST\r\n"
               + b"MAIL FROM:<a@local.test>\r\nRCPT TO:<e@local.test>\r\nBDAT 4\r\nQUITBDAT 0\r\n"
               + b"BDAT 6 LAST\r\nRSET\r\n"
               + b"NOOP\r\nQUIT\r\n")
        replies = [c.reply() for _ in range(16)]
        replies.append("closed" if c.closed() else "open")
        c.close()
        return replies

    replies = yield deferToThread(client)
    assert [r[:3] for r in replies[:-1]] == ["250"] * 15 + ["221"], replies
    first_id = run.handler.messages[0]["message"].queue_id
    assert replies[3:6] == ["250 2.0.0 16 octets received", "250 2.0.0 6 octets received",
                            f"250 2.0.0 Ok: queued as {first_id}"]
    assert replies[11:14] == ["250 2.0.0 4 octets received", "250 2.0.0 0 octets received",
                             "250 2.0.0 Ok: queued as "
                             + run.handler.messages[2]["message"].queue_id]
    assert replies[-1] == "closed"
    assert [m["message"].recipients for m in run.handler.messages] == \
        [["b@local.test", "c@local.test"], ["d@local.test"], ["e@local.test"]]
    assert run.handler.body(0) == b"".join(first)
    assert run.handler.body(1) == b""  # BDAT 0 LAST: an empty message
    assert run.handler.body(2) == b"QUITRSET\r\n"  # chunk octets are never commands


@pytest_twisted.inlineCallbacks
def test_random_messages_and_chunk_sizes_byte_exact(start_server: Any) -> None:
    """50 messages of random octets cut into random chunks, each transaction in one write:
    stored byte for byte, but for bare CR and LF (written as CRLF, even across chunks)."""
    import random
    run = start_server()
    rng = random.Random(3030)
    messages = [rng.randbytes(rng.choice([0, 1, 2, 5, 100, 1000, 70_000]))
                + rng.choice([b"", b"\r\n.\r\n", b".", b"\r", b"\n."]) for _ in range(50)]

    def client() -> list:
        c = Client(run.ports["smtp"])
        c.hello()
        replies = []
        for message in messages:
            cuts = sorted(rng.sample(range(len(message) + 1), min(len(message) + 1, 4)))
            pieces = [message[a:b] for a, b in zip([0] + cuts, cuts + [len(message)])]
            wire = b"MAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\n"
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                wire += b"BDAT %d%s\r\n" % (len(piece), b" LAST" if last else b"") + piece
            c.send(wire)
            replies.append([c.reply() for _ in range(2 + len(pieces))])
        c.close()
        return replies

    replies = yield deferToThread(client)
    assert all(r[-1].startswith("250 2.0.0 Ok: queued as ") for r in replies), replies
    for recorded, message in zip(run.handler.messages, messages, strict=True):
        # (not handler.body(): a random body may start with what looks like a folded line)
        data = recorded["data"]
        header = data[:len(data) - len(crlf(message))]
        assert data[len(header):] == crlf(message)
        assert header.startswith(b"Received: from client.test ([127.0.0.1])")
        assert header.endswith(b"\r\n") and header.count(b"\r\n") == 3


# -- limits ---------------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_size_limit_overflow_then_session_still_usable(start_server: Any) -> None:
    run = start_server(max_message_size=100_000)
    block = b"y" * 60_000

    def client() -> list:
        c = Client(run.ports["smtp"])
        c.hello()
        c.envelope()
        out = [c.bdat(block)]
        # the second chunk passes the limit: it is still read whole, then 552
        c.send(b"BDAT 60000\r\n")
        for pos in range(0, 60_000, 10_000):
            c.send(block[pos:pos + 10_000])
        out.append(c.reply())
        out.append(c.bdat(b"QUIT\r\n", last=True))  # the transaction is gone
        c.envelope()  # a new one on the same session: exactly the limit fits
        out.append(c.bdat(block))
        out.append(c.bdat(block[:40_000], last=True))
        c.envelope()  # one chunk over the limit with LAST
        out.append(c.bdat(block + block, last=True))
        out.append(c.cmd("NOOP"))
        c.close()
        return out

    out = yield deferToThread(client)
    assert out[0] == "250 2.0.0 60000 octets received"
    assert out[1] == "552 5.3.4 Error: message file too big"
    assert out[2] == "503 5.5.1 Error: need MAIL command"
    assert out[3] == "250 2.0.0 60000 octets received"
    assert out[4].startswith("250 2.0.0 Ok: queued as ")
    assert out[5] == "552 5.3.4 Error: message file too big"
    assert out[6] == "250 2.0.0 Ok"
    assert len(run.handler.messages) == 1 and run.handler.body() == block + block[:40_000]
    assert run.server.get_stats()["rejected_by_reason"]["size"] == 2
    assert not spool_leftovers(run.server)


@pytest_twisted.inlineCallbacks
def test_idle_timeout_inside_a_chunk(start_server: Any) -> None:
    run = start_server(connection_timeout=1)

    def client() -> tuple:
        c = Client(run.ports["smtp"])
        c.hello()
        c.envelope()
        c.send(b"BDAT 1000\r\n" + b"z" * 400)
        reply = c.reply()
        closed = c.closed()
        c.close()
        return reply, closed

    reply, closed = yield deferToThread(client)
    assert reply == "421 4.4.2 mail.dcrouter.test Error: timeout exceeded" and closed
    yield sessions_gone(run.server)
    assert not spool_leftovers(run.server) and not run.handler.messages


# -- errors ---------------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_bdat_error_replies(start_server: Any) -> None:
    run = start_server(max_errors=20)  # the default 10 would close the session below

    def client() -> dict:
        c = Client(run.ports["smtp"])
        c.hello()
        out: dict[str, Any] = {}
        # refused chunks are still read: "QUIT\r\n" below is data, not a command
        out["before_mail"] = c.bdat(b"QUIT\r\n")
        out["noop1"] = c.cmd("NOOP")
        c.cmd("MAIL FROM:<a@local.test>")
        out["before_rcpt"] = c.bdat(b"QUIT\r\n", last=True)
        c.cmd("RCPT TO:<b@local.test>")
        out["syntax"] = [c.cmd(line) for line in
                         ("BDAT", "BDAT abc", "BDAT -1", "BDAT 5 NOTLAST", "BDAT 5 LAST x",
                          "BDAT 1e3", "BDAT " + "9" * 21,
                          "BDAT \u00b9", "BDAT \uff15 LAST")]   # non-ASCII digits (¹, fullwidth 5)
        out["long"] = c.cmd("BDAT 1" + " " * COMMAND_LINE_LIMIT)
        out["first"] = c.bdat(b"Subject: x\r\n\r\n")
        out["data"] = c.cmd("DATA")  # not after BDAT in the same transaction
        out["last"] = c.bdat(b"body\r\n", last=True)
        out["after_last"] = c.bdat(b"more", last=True)
        c.envelope()
        out["zero_last"] = c.bdat(b"", last=True)
        c.close()
        return out

    out = yield deferToThread(client)
    assert out["before_mail"] == "503 5.5.1 Error: need MAIL command"
    assert out["noop1"] == "250 2.0.0 Ok"
    assert out["before_rcpt"] == "503 5.5.1 Error: need RCPT command"
    assert out["syntax"] == ["501 5.5.4 Syntax: BDAT count [LAST]"] * 9
    assert out["long"] == "500 5.5.2 Error: line too long"
    assert out["first"] == "250 2.0.0 14 octets received"
    assert out["data"] == "503 5.5.1 Error: DATA not allowed after BDAT in the same transaction"
    assert out["last"].startswith("250 2.0.0 Ok: queued as ")
    assert out["after_last"] == "503 5.5.1 Error: need MAIL command"
    assert out["zero_last"].startswith("250 2.0.0 Ok: queued as ")
    assert run.handler.body(0) == b"Subject: x\r\n\r\nbody\r\n"
    assert run.handler.body(1) == b""
    assert len(run.handler.messages) == 2


@pytest_twisted.inlineCallbacks
def test_rcpt_after_bdat_refused_and_spool_failure_ends_the_transaction(start_server: Any) -> None:
    run = start_server()
    spool_files = run.server.spool_files
    take = spool_files.take
    failures = [OSError(28, "No space left on device /secret/spool")]

    def failing_take() -> Any:
        if failures:
            raise failures.pop()
        return take()

    spool_files.take = failing_take  # type: ignore[method-assign]

    def client() -> list:
        c = Client(run.ports["smtp"])
        c.hello()
        c.envelope()
        out = [c.bdat(b"QUIT\r\n"), c.bdat(b"rest\r\n", last=True)]
        c.envelope()
        out += [c.bdat(b"Subject: ok\r\n\r\n"), c.cmd("RCPT TO:<late@local.test>"),
                c.bdat(b"fine\r\n", last=True)]
        c.close()
        return out

    out = yield deferToThread(client)
    assert out[0] == "451 4.3.0 Temporary local problem, try again later"
    assert out[1] == "503 5.5.1 Error: need MAIL command"  # no message from the rest alone
    assert out[2] == "250 2.0.0 15 octets received"
    assert out[3] == "503 5.5.1 Error: RCPT not allowed after BDAT"
    assert out[4].startswith("250 2.0.0 Ok: queued as ")
    assert len(run.handler.messages) == 1
    assert run.handler.messages[0]["message"].recipients == ["b@local.test"]
    assert run.handler.body() == b"Subject: ok\r\n\r\nfine\r\n"
    assert "secret" not in "".join(out)


@pytest_twisted.inlineCallbacks
def test_chunking_switched_off(start_server: Any) -> None:
    run = start_server(chunking=False)

    def client() -> tuple:
        c = Client(run.ports["smtp"])
        ehlo = c.hello()
        c.envelope()
        bdat = c.cmd("BDAT 0 LAST")
        c.close()
        return ehlo, bdat

    ehlo, bdat = yield deferToThread(client)
    assert "CHUNKING" not in ehlo and "250-8BITMIME" in ehlo.splitlines()
    assert bdat == "502 5.5.1 Error: command not implemented"
    assert not run.handler.messages


@pytest_twisted.inlineCallbacks
def test_rset_discards_chunks(start_server: Any) -> None:
    run = start_server()

    def client() -> list:
        c = Client(run.ports["smtp"])
        c.hello()
        c.envelope()
        out = [c.bdat(b"first attempt\r\n"), c.bdat(b"more of it\r\n"), c.cmd("RSET"),
               c.bdat(b"orphan\r\n", last=True)]
        c.envelope()
        out.append(c.cmd("DATA"))  # after RSET the transaction may use DATA again
        c.send(b"Subject: fresh\r\n\r\nnew\r\n.\r\n")
        out.append(c.reply())
        c.close()
        return out

    out = yield deferToThread(client)
    assert out[2] == "250 2.0.0 Ok"
    assert out[3] == "503 5.5.1 Error: need MAIL command"
    assert out[4].startswith("354") and out[5].startswith("250 2.0.0 Ok: queued as ")
    assert len(run.handler.messages) == 1
    assert run.handler.body() == b"Subject: fresh\r\n\r\nnew\r\n"
    assert not spool_leftovers(run.server)


@pytest_twisted.inlineCallbacks
def test_handler_rejection_of_the_last_chunk_as_for_data(start_server: Any) -> None:
    from dcrouter.errors import PolicyRejection
    run = start_server()

    def client() -> list:
        c = Client(run.ports["smtp"])
        c.hello()
        c.envelope()
        first = c.bdat(b"Subject: spam\r\n\r\nbuy now\r\n", last=True)
        c.envelope()
        second = c.bdat(b"Subject: ok\r\n\r\nfine\r\n", last=True)
        c.close()
        return [first, second]

    run.handler.fail_next = PolicyRejection(554, "5.7.1", "Message rejected as spam", "spam")
    out = yield deferToThread(client)
    assert out[0] == "554 5.7.1 Message rejected as spam"
    assert out[1].startswith("250 2.0.0 Ok: queued as ")
    assert run.handler.body() == b"Subject: ok\r\n\r\nfine\r\n"
    assert run.server.get_stats()["rejected_by_reason"]["spam"] == 1
    assert not spool_leftovers(run.server)


@pytest_twisted.inlineCallbacks
def test_drain_waits_for_the_last_chunk(start_server: Any) -> None:
    run = start_server()
    drains: list = []

    def client() -> tuple:
        c = Client(run.ports["smtp"])
        c.hello()
        c.envelope()
        first = c.bdat(b"Subject: drain\r\n\r\n")
        reactor.callFromThread(lambda: drains.append(run.server.drain()))
        time.sleep(0.3)  # the drain must wait: a transaction is open
        waiting = [d.called for d in drains]
        last = c.bdat(b"done\r\n", last=True)
        after = c.reply()
        c.close()
        return first, waiting, last, after

    first, waiting, last, after = yield deferToThread(client)
    assert first == "250 2.0.0 18 octets received" and waiting == [False]
    assert last.startswith("250 2.0.0 Ok: queued as ")
    assert after == "421 4.3.2 mail.dcrouter.test Service shutting down"
    yield drains[0]
    assert run.handler.body() == b"Subject: drain\r\n\r\ndone\r\n"


# -- TLS and AUTH ---------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_bdat_over_starttls_and_implicit_tls_with_auth(start_server: Any) -> None:
    import base64
    run = start_server()
    plain = base64.b64encode(b"\x00alice\x00" + PASSWORD.encode()).decode()

    def client() -> list:
        out = []
        c = Client(run.ports["smtp"])
        c.hello()
        out.append(c.starttls(run.client_context()))
        out.append(c.cmd("EHLO client.test"))
        c.envelope()
        out.append(c.bdat(TRICKY[:100]))
        out.append(c.bdat(TRICKY[100:], last=True))
        c.close()
        s = Client(run.ports["smtps"], context=run.client_context())
        s.hello()
        out.append(s.cmd("AUTH PLAIN " + plain))
        s.envelope("alice@local.test", "bob@remote.example")
        out.append(s.bdat(b"Subject: tls\r\n\r\n" + b"\xff" * 100_000, last=True))
        # pipelined over TLS: a whole transaction in one write
        s.send(b"MAIL FROM:<alice@local.test>\r\nRCPT TO:<carol@remote.example>\r\n"
               b"BDAT 6\r\n.\r\nx\r\nBDAT 2 LAST\r\n\r\n")
        out.append("|".join(s.reply() for _ in range(4)))
        s.close()
        sub = Client(run.ports["submission"])  # AUTH required: no transaction, chunk skipped
        sub.hello()
        out.append(sub.cmd("MAIL FROM:<a@local.test>"))
        out.append(sub.bdat(b"NOOP\r\n", last=True))
        out.append(sub.cmd("NOOP"))
        sub.close()
        return out

    out = yield deferToThread(client)
    assert out[0].startswith("220") and "250-CHUNKING" in out[1].splitlines()
    assert out[2] == "250 2.0.0 100 octets received" and out[3].startswith("250 2.0.0 Ok")
    assert out[4].startswith("235") and out[5].startswith("250 2.0.0 Ok: queued as ")
    codes = out[6].split("|")
    assert [c[:3] for c in codes] == ["250"] * 4 and codes[2] == "250 2.0.0 6 octets received"
    assert out[7].startswith("530") and out[8] == "503 5.5.1 Error: need MAIL command"
    assert out[9] == "250 2.0.0 Ok"
    first, second, third = run.handler.messages
    assert run.handler.body(2) == b".\r\nx\r\n\r\n"
    assert run.handler.body(0) == TRICKY_STORED
    assert "with ESMTPS id " + first["message"].queue_id in received_header(first["data"])
    assert run.handler.body(1) == b"Subject: tls\r\n\r\n" + b"\xff" * 100_000
    assert "with ESMTPSA id " + second["message"].queue_id in received_header(second["data"])
    assert second["message"].session.auth_user == "alice"


# -- a big message, memory bounded ----------------------------------------------------------------

def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class HashingHandler(RecordingHandler):
    """Hashes each spool file in pieces instead of reading it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: list[tuple[str, int, int]] = []  # (sha256 of body, body size, total)

    def handle_message(self, message: Any) -> Any:
        digest = hashlib.sha256()
        total = body = 0
        with open(message.spool_path, "rb") as f:
            head = f.read(4096)
            end = head.index(b";")
            end = head.index(b"\r\n", end) + 2  # dcrouter's Received header ends here
            digest.update(head[end:])
            total, body = len(head), len(head) - end
            while True:
                piece = f.read(1024 * 1024)
                if not piece:
                    break
                digest.update(piece)
                total += len(piece)
                body += len(piece)
        os.unlink(message.spool_path)
        self.digests.append((digest.hexdigest(), body, total))
        self.messages.append({"message": message, "data": b""})
        return [message.queue_id]


@pytest.mark.parametrize("chunk_mib,chunks", [(1, 40), (24, 1)])
@pytest_twisted.inlineCallbacks
def test_large_message_memory_bounded(start_server: Any, chunk_mib: int, chunks: int) -> None:
    """40 MB in 1 MB chunks, and one 24 MB chunk: neither the message nor a chunk is held."""
    handler = HashingHandler()
    run = start_server(handler=handler)
    mib = 1024 * 1024
    # random octets without CR and LF (bare ones would be stored as CRLF, changing the size)
    block = bytearray(os.urandom(mib)).replace(b"\r", b"R").replace(b"\n", b"N")
    peak = [0]
    base = rss_kib()
    watch = task.LoopingCall(lambda: peak.__setitem__(0, max(peak[0], rss_kib() - base)))
    watch.start(0.005)

    def client() -> tuple:
        c = Client(run.ports["smtp"], timeout=120)
        c.hello()
        c.envelope()
        digest = hashlib.sha256()
        replies = []
        n = 0
        for i in range(chunks):
            last = i == chunks - 1
            c.send(b"BDAT %d%s\r\n" % (chunk_mib * mib, b" LAST" if last else b""))
            for _ in range(chunk_mib):  # written 1 MB at a time, never built whole
                block[:4] = (0x40404040 + n).to_bytes(4, "big")  # every MB differs (no CR/LF)
                n += 1
                digest.update(block)
                c.send(block)
            replies.append(c.reply())
        c.close()
        return replies, digest.hexdigest()

    try:
        replies, digest = yield deferToThread(client)
    finally:
        watch.stop()
    size = chunk_mib * mib
    assert replies[:-1] == [f"250 2.0.0 {size} octets received"] * (chunks - 1)
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    assert handler.digests[0][:2] == (digest, chunks * size)
    assert handler.messages[0]["message"].size == handler.digests[0][2]
    # tens of MB went through; the process (client included) grew by far less
    assert peak[0] < 8 * 1024, f"RSS grew by {peak[0]} KiB"


# -- the whole router: BDAT into a Maildir --------------------------------------------------------

@defer.inlineCallbacks
def wait_for_file(directory: str, timeout: float = 20.0) -> Any:
    for _ in range(int(timeout / 0.05)):
        if os.path.isdir(directory) and os.listdir(directory):
            return os.path.join(directory, os.listdir(directory)[0])
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"nothing arrived in {directory}")


@pytest_twisted.inlineCallbacks
def test_bdat_through_the_router_into_a_maildir(tmp_path: Any) -> None:
    state = str(tmp_path / "var")
    mail = str(tmp_path / "mail")
    options = options_from({"email": {
        "hostname": "gw.test", "listen": "127.0.0.1", "ports": [free_port()],
        "submission_ports": [], "implicit_tls_ports": [], "relay_networks": ["127.0.0.0/8"],
        "domain_rules": [{"pattern": "*@local.test", "mode": "mta",
                          "mta_options": {"allow_local_delivery": True,
                                          "local_delivery_path": mail}}],
        "queue": {"check_interval": 0.1, "persistent_path": os.path.join(state, "queue")},
    }}, state)
    router = start_router(options)
    body = (b"From: a@sender.test\r\nTo: box@local.test\r\nSubject: chunked\r\n"
            b"Message-ID: <bdat1@sender.test>\r\n\r\n" + TRICKY.split(b"\r\n\r\n", 1)[1])
    reply: Optional[str] = None
    try:
        port = port_of(router, "email")

        def client() -> str:
            c = Client(port)
            c.hello()
            c.envelope("a@sender.test", "Box@local.test")
            for piece in chunks_of(body, 50, 3, 200)[:-1]:
                assert c.bdat(piece).startswith("250 2.0.0 ")
            answer = c.bdat(chunks_of(body, 50, 3, 200)[-1], last=True)
            c.cmd("QUIT")
            c.close()
            return answer

        reply = yield deferToThread(client)
        path = yield wait_for_file(os.path.join(mail, "box", "new"))
        with open(path, "rb") as f:
            stored = f.read()
    finally:
        yield stop_router(router)
    assert reply is not None and reply.startswith("250 2.0.0 Ok: queued as ")
    # the client's bytes, bare CR/LF written as CRLF, after the trace headers
    assert stored.endswith(crlf(body))
    trace = stored[:-len(crlf(body))]
    assert b"Received: from client.test ([127.0.0.1])" in trace and b"with ESMTP id" in trace

