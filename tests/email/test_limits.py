"""Connection and per-IP rate limits like Postfix's (issue 14 item 1), over real sockets.

``max_connections_per_ip`` and the per-IP message rate do not apply to
``client_limit_exceptions`` (default ``relay_networks``, as Postfix's
``smtpd_client_event_limit_exceptions = $mynetworks``); a finished session's slot
is free before the next session from that address is counted. Loopback
addresses other than 127.0.0.1 play outsiders.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from dcrouter.email.limits import ConnectionTracker, LimitExceptions
from tests.email.test_processor_smtp import converse, stack  # noqa: F401 (a fixture)
from tests.email.test_server import Raw


def _session_in_a_row(port: int, count: int, source: str, quit_first: bool) -> list[str]:
    """Open ``count`` sessions one after the other; each ends as soon as it is greeted
    (QUIT and 221, or the client just closes). Returns every greeting that was not 220."""
    refused = []
    for _ in range(count):
        raw = Raw(port, source=source)
        greeting = raw.reply()
        if not greeting.startswith("220 "):
            refused.append(greeting)
        elif quit_first:
            assert raw.cmd("QUIT").startswith("221 ")
        raw.close()
    return refused


@pytest_twisted.inlineCallbacks
def test_200_sessions_in_a_row_at_limit_50_none_refused(start_server: Any) -> None:
    """The per-IP cap counts a non-exempt client too (client_limit_exceptions = []), with 49
    sessions held open: 200 sessions in a row on the 50th slot - ended by QUIT, or by the
    client closing - are all greeted, because a finished session frees its slot before the
    next one is counted."""
    run = start_server(max_connections_per_ip=50, max_connections=1000,
                       client_limit_exceptions=[])
    port = run.ports["smtp"]

    def client() -> tuple[list[str], list[str], str]:
        held = [Raw(port) for _ in range(49)]
        for raw in held:
            assert raw.reply().startswith("220 ")
        try:
            by_quit = _session_in_a_row(port, 200, "127.0.0.1", quit_first=True)
            by_close = _session_in_a_row(port, 200, "127.0.0.1", quit_first=False)
            # the cap itself still holds: 50 open, the 51st is refused
            fiftieth, extra = Raw(port), Raw(port)
            fiftieth.reply()
            over = extra.reply()
            fiftieth.close()
            extra.close()
        finally:
            for raw in held:
                raw.close()
        return by_quit, by_close, over

    by_quit, by_close, over = yield deferToThread(client)
    assert by_quit == [] and by_close == []
    assert over == ("421 4.7.0 mail.dcrouter.test Error: too many connections from your "
                    "address, try again later")


@pytest_twisted.inlineCallbacks
def test_relay_networks_exempt_outsiders_limited(start_server: Any) -> None:
    """Default exceptions = relay_networks (here 127.0.0.1 only): 60 concurrent sessions from
    127.0.0.1 with the cap at 50 are all greeted, while 127.0.0.2 gets 421 at its 51st; a
    finished outsider session frees its slot too."""
    run = start_server(max_connections_per_ip=50, max_connections=1000,
                       relay_networks=["127.0.0.1/32"])
    port = run.ports["smtp"]

    def client() -> tuple[int, int, str, str]:
        inside = [Raw(port, source="127.0.0.1") for _ in range(60)]
        outside = [Raw(port, source="127.0.0.2") for _ in range(50)]
        try:
            greeted_inside = sum(r.reply().startswith("220 ") for r in inside)
            greeted_outside = sum(r.reply().startswith("220 ") for r in outside)
            extra = Raw(port, source="127.0.0.2")
            refused = extra.reply()
            extra.close()
            assert outside[0].cmd("QUIT").startswith("221 ")
            outside[0].close()
            again = Raw(port, source="127.0.0.2")
            after = again.reply()
            again.close()
        finally:
            for raw in inside + outside:
                raw.close()
        return greeted_inside, greeted_outside, refused, after

    greeted_inside, greeted_outside, refused, after = yield deferToThread(client)
    assert greeted_inside == 60 and greeted_outside == 50
    assert refused.startswith("421 4.7.0 ") and "from your address" in refused
    assert after.startswith("220 ")
    assert run.server.get_stats()["rejected_by_reason"]["connection_limit"] == 1


@pytest_twisted.inlineCallbacks
def test_exceptions_configurable(start_server: Any) -> None:
    """client_limit_exceptions names other networks: then 127.0.0.1 (a relay network) is
    limited and 127.0.0.3 is not."""
    run = start_server(max_connections_per_ip=2, max_connections=100,
                       client_limit_exceptions=["127.0.0.3/32"])
    port = run.ports["smtp"]

    def client() -> tuple[list[str], list[str]]:
        local = [Raw(port, source="127.0.0.1") for _ in range(3)]
        listed = [Raw(port, source="127.0.0.3") for _ in range(5)]
        try:
            return [r.reply()[:3] for r in local], [r.reply()[:3] for r in listed]
        finally:
            for raw in local + listed:
                raw.close()

    local, listed = yield deferToThread(client)
    assert local == ["220", "220", "421"]
    assert listed == ["220"] * 5


@pytest_twisted.inlineCallbacks
def test_global_cap_applies_to_relay_networks(start_server: Any) -> None:
    """max_connections (Postfix: the smtpd process limit) counts exempt clients too, and a
    finished session frees its global slot before the next is counted."""
    run = start_server(max_connections=3, max_connections_per_ip=100)
    port = run.ports["smtp"]

    def client() -> tuple[str, list[str]]:
        held = [Raw(port) for _ in range(3)]
        try:
            for raw in held:
                raw.reply()
            extra = Raw(port)
            refused = extra.reply()
            extra.close()
            held[2].cmd("QUIT")
            held[2].close()
            in_a_row = _session_in_a_row(port, 50, "127.0.0.1", quit_first=True)
        finally:
            for raw in held:
                raw.close()
        return refused, in_a_row

    refused, in_a_row = yield deferToThread(client)
    assert refused == "421 4.7.0 mail.dcrouter.test Error: too many connections, try again later"
    assert in_a_row == []


def test_tracker_releases_once_and_reclaims() -> None:
    """The tracker itself: a slot is released once whatever calls release; reclaim runs only
    at the cap; exempt clients count toward the total only."""
    calls: list[Any] = []
    tracker = ConnectionTracker(3, 1, LimitExceptions(["10.0.0.0/8"]))
    tracker.reclaim = lambda ip: calls.append(ip) or 0
    assert tracker.admit("192.0.2.1") == ""
    tracker.bind("a", "192.0.2.1")
    assert calls == []
    assert tracker.admit("192.0.2.1") == "per_ip" and calls == ["192.0.2.1"]
    for key in ("x", "y"):
        assert tracker.admit("10.1.2.3") == ""
        tracker.bind(key, "10.1.2.3")
    assert tracker.per_ip == {"192.0.2.1": 1} and tracker.total == 3
    assert tracker.admit("10.1.2.3") == "global" and calls[-1] is None
    assert tracker.release("a") is True and tracker.release("a") is False
    assert tracker.total == 2 and tracker.per_ip == {}
    assert LimitExceptions(["10.0.0.0/8"]).covers("::ffff:10.0.0.1")
    assert not LimitExceptions([]).covers("10.0.0.1")


@pytest_twisted.inlineCallbacks
def test_per_ip_rate_limit_exempts_relay_networks(stack: Any) -> None:
    """rate_limits.max_messages_per_minute_per_ip: 127.0.0.1 (relay_networks) sends past it;
    an outsider address (127.0.0.2, not in relay_networks) gets 451 4.7.1 at MAIL."""
    st = stack(rate_limits={"max_messages_per_minute_per_ip": 2},
               relay_networks=["127.0.0.1/32"])
    port = st.ports["smtp"]
    for _ in range(4):
        r = yield deferToThread(converse, port, "a@sender.test", ["b@local.test"],
                                b"Subject: x\r\n\r\nbody\r\n")
        assert r["data"][0] == 250

    def outsider() -> list[bytes]:
        replies = []
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10,
                                          source_address=("127.0.0.2", 0)) as s:
                f = s.makefile("rb")
                f.readline()
                s.sendall(b"EHLO outsider.test\r\n")
                while f.readline()[3:4] == b"-":
                    pass
                s.sendall(b"MAIL FROM:<a@sender.test>\r\n")
                replies.append(f.readline().strip())
                s.sendall(b"QUIT\r\n")
                time.sleep(0.01)
        return replies

    replies = yield deferToThread(outsider)
    assert replies[:2] == [b"250 2.1.0 Ok", b"250 2.1.0 Ok"]
    assert replies[2] == b"451 4.7.1 Rate limit exceeded, try again later"
