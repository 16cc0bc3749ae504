"""The delivery client on the wire, as Postfix's behaves (issue 14 item 2).

Over real sockets to a scripted next hop: MAIL, RCPT and DATA pipelined in one
group; the next message straight after the reply to the last one's dot (no RSET),
RSET only after an aborted transaction; an idle connection cached for
``connection_cache_time`` and reused, then QUIT; TCP_NODELAY on its socket; a 421
on an idle connection or a reused connection that dies before answering costs no
deferral. With a recording transport: every command group, and a message's data
with its dot, is one write.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import pytest_twisted
from twisted.internet.testing import StringTransport

from dcrouter.delivery.smtpclient import ClientSettings, DeliveryClient, Job
from dcrouter.message import Route
from tests.delivery.harness import Stack, wait_for
from tests.delivery.scriptedhop import ScriptedHop


def hop_route(hop: ScriptedHop) -> Route:
    return Route(kind="forward", server="127.0.0.1", port=hop.port)


async def delivered(stack: Stack, item_id: str) -> Any:
    def probe() -> Any:
        entry = stack.queue.finished.get(item_id)
        return entry[1] if entry and entry[1].status == "delivered" else None
    return await wait_for(probe)


@pytest_twisted.ensureDeferred
async def test_pipelined_groups_and_no_rset_between_messages(tmp_path):
    hop = ScriptedHop().start()
    stack = Stack(str(tmp_path), delivery={"per_destination_concurrency": 1})
    try:
        for n in range(5):
            await stack.send(hop_route(hop), [f"u{n}@example.com"])
        await wait_for(lambda: hop.messages == 5)
        assert len(hop.sessions) == 1
        session = hop.sessions[0]
        assert session.commands == ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 5
        assert session.grouped == [True] * 5, "RCPT and DATA came before MAIL's reply"
        assert session.nested == 0
        assert stack.delivery.counters["pipelined_transactions"] == 5
    finally:
        await stack.stop()
        hop.stop()


@pytest_twisted.ensureDeferred
async def test_idle_connection_cached_reused_then_quit(tmp_path):
    hop = ScriptedHop().start()
    stack = Stack(str(tmp_path), delivery={"connection_cache_time": 1.0})
    try:
        first = await stack.send(hop_route(hop), ["a@example.com"])
        await delivered(stack, first[0])
        worker = next(iter(stack.delivery.workers.values()))
        await wait_for(lambda: worker.idle)
        client = next(iter(worker.idle))
        sock = client.transport.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        second = await stack.send(hop_route(hop), ["b@example.com"])
        await delivered(stack, second[0])
        assert len(hop.sessions) == 1, "the parked connection took the next message"
        assert stack.delivery.counters["connection_cache_hits"] == 1
        await wait_for(lambda: hop.sessions[0].ended == "quit", timeout=10)
        assert hop.sessions[0].commands[-1] == "QUIT"
        assert stack.delivery.get_stats()["connections"] == 0
    finally:
        await stack.stop()
        hop.stop()


@pytest_twisted.ensureDeferred
async def test_cache_off_quits_at_once(tmp_path):
    hop = ScriptedHop().start()
    stack = Stack(str(tmp_path), delivery={"connection_cache_time": 0})
    try:
        first = await stack.send(hop_route(hop), ["a@example.com"])
        await delivered(stack, first[0])
        await wait_for(lambda: hop.sessions[0].ended == "quit")
        second = await stack.send(hop_route(hop), ["b@example.com"])
        await delivered(stack, second[0])
        assert len(hop.sessions) == 2
    finally:
        await stack.stop()
        hop.stop()


@pytest_twisted.ensureDeferred
async def test_421_on_an_idle_connection_closes_it(tmp_path):
    hop = ScriptedHop(idle_421=0.2).start()
    stack = Stack(str(tmp_path), delivery={"connection_cache_time": 30.0})
    try:
        first = await stack.send(hop_route(hop), ["a@example.com"])
        await delivered(stack, first[0])
        await wait_for(lambda: hop.sessions[0].ended == "421")
        await wait_for(lambda: stack.delivery.get_stats()["connections"] == 0)
        second = await stack.send(hop_route(hop), ["b@example.com"])
        item = await delivered(stack, second[0])
        assert item.attempts == 1 and len(hop.sessions) == 2
    finally:
        await stack.stop()
        hop.stop()


@pytest_twisted.ensureDeferred
async def test_reused_connection_lost_before_any_reply_hands_the_job_back(tmp_path):
    """The hop closes the cached connection at the second MAIL without a word (as a server
    timing out an idle connection just then): the message goes out on a new connection in
    the same attempt instead of being deferred."""
    hop = ScriptedHop(drop_at_mail=(1, 2)).start()
    stack = Stack(str(tmp_path), delivery={"connection_cache_time": 30.0})
    try:
        first = await stack.send(hop_route(hop), ["a@example.com"])
        await delivered(stack, first[0])
        second = await stack.send(hop_route(hop), ["b@example.com"])
        item = await delivered(stack, second[0])
        assert item.attempts == 1
        assert [s.ended for s in hop.sessions][:1] == ["dropped"] and len(hop.sessions) == 2
        assert stack.delivery.counters["jobs_handed_back"] == 1
    finally:
        await stack.stop()
        hop.stop()


@pytest_twisted.ensureDeferred
async def test_aborted_transaction_is_reset_before_the_next(tmp_path):
    """Every recipient refused: DATA (pipelined) gets 554, the transaction is open on the
    server's side, so RSET comes before the next MAIL - never a nested MAIL."""
    hop = ScriptedHop(refuse_rcpt=("nobody@example.com",)).start()
    stack = Stack(str(tmp_path), delivery={"per_destination_concurrency": 1})
    try:
        await stack.send(hop_route(hop), ["nobody@example.com"])
        good = await stack.send(hop_route(hop), ["a@example.com"])
        await delivered(stack, good[0])
        session = hop.sessions[0]
        assert session.commands[:6] == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL"]
        assert session.nested == 0 and session.messages == 1
    finally:
        await stack.stop()
        hop.stop()


@pytest_twisted.ensureDeferred
async def test_without_pipelining_one_command_at_a_time(tmp_path):
    hop = ScriptedHop(pipelining=False).start()
    stack = Stack(str(tmp_path), delivery={"per_destination_concurrency": 1})
    try:
        for n in range(2):
            await stack.send(hop_route(hop), [f"u{n}@example.com"])
        await wait_for(lambda: hop.messages == 2)
        assert hop.sessions[0].commands == ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 2
        assert stack.delivery.counters["pipelined_transactions"] == 0
    finally:
        await stack.stop()
        hop.stop()


class _Source:
    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def take(self) -> Optional[Job]:
        return self.jobs.pop(0) if self.jobs else None

    def park(self, client: Any) -> bool:
        return False

    def unpark(self, client: Any) -> None:
        pass

    def give_back(self, job: Job) -> None:
        self.jobs.insert(0, job)


class _Recording(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.writes.append(b"".join(seq))
        super().writeSequence(seq)


def test_every_group_and_every_message_is_one_write():
    """What leaves between two replies is one write: no small segment after an
    unacknowledged one for Nagle to hold until the delayed ACK."""
    body = b"Subject: x\r\n\r\n" + b"line\r\n" * 3000
    jobs = [Job(f"id{n}", "s@example.org", ["a@example.com", "b@example.com"], body)
            for n in range(2)]
    client = DeliveryClient(ClientSettings(identity="dcrouter.test", command_timeout=30),
                            _Source(jobs))
    transport = _Recording()
    client.makeConnection(transport)
    client.dataReceived(b"220 hop.test ESMTP\r\n")
    assert transport.writes == [b"EHLO dcrouter.test\r\n"]
    transport.writes.clear()
    client.dataReceived(b"250-hop.test\r\n250 PIPELINING\r\n")
    group = (b"MAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.com>\r\n"
             b"RCPT TO:<b@example.com>\r\nDATA\r\n")
    assert transport.writes == [group]
    for n in range(2):
        transport.writes.clear()
        client.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        assert transport.writes == [body + b".\r\n"]
        transport.writes.clear()
        client.dataReceived(b"250 2.0.0 queued\r\n")
        assert transport.writes == ([group] if n == 0 else [b"QUIT\r\n"])
    client.connectionLost()
