"""Outbound connections do not log Twisted's factory and port chatter (issue 13 item 6).

The delivery client's factory is quiet at the source (``noisy = False``); the UDP
port lines of each MX query (twisted.names opens a port per query and udp.Port
logs unconditionally) are dropped by dcrouter's log observer.
"""

from __future__ import annotations

import io

import pytest_twisted
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import dns

from dcrouter.message import Route
from tests.delivery.harness import Stack, wait_for
from dcrouter.config.router import RouterOptions
from dcrouter.logsetup import make_observer
from tests.delivery.peers import Sink, start_dns

CHATTER = ("Starting factory", "Stopping factory", "starting on", "Closed)", "Starting protocol",
           "Stopping protocol")


@pytest_twisted.ensureDeferred
async def test_deliveries_and_mx_lookups_are_quiet(tmp_path):
    sink = Sink().start()
    records = {"example.test": [dns.Record_MX(10, b"mx.example.test")],
               "mx.example.test": [dns.Record_A("127.0.0.1")]}
    dns_port, dns_number = start_dns(reactor, records)
    lines: list[str] = []
    out = io.StringIO()
    dcrouter_log = make_observer(RouterOptions(), out)

    def observe(event: dict) -> None:
        lines.append(formatEvent(event) or "")
        dcrouter_log(event)
    globalLogPublisher.addObserver(observe)
    stack = Stack(str(tmp_path), delivery={"nameservers": (f"127.0.0.1:{dns_number}",),
                                           "mx_port": sink.port})
    try:
        await stack.send(Route("forward", sink.host, sink.port), ["a@example.com"])
        await stack.send(Route("mx"), ["b@example.test"])
        await wait_for(lambda: len(sink.messages) == 2)
        await wait_for(lambda: not stack.delivery.workers)   # connections closed too
    finally:
        globalLogPublisher.removeObserver(observe)
        await stack.stop()
        await dns_port.stopListening()
        sink.stop()
    assert any("delivered" in line for line in lines), "the capture saw the deliveries"
    factories = [line for line in lines if "factory" in line]
    assert factories == [], "\n".join(factories)
    written = out.getvalue()
    assert "delivered" in written
    noisy = [line for line in written.splitlines() if any(c in line for c in CHATTER)]
    assert noisy == [], "\n".join(noisy)
