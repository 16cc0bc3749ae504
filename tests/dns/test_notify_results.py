"""The last NOTIFY per zone and secondary, in the DNS figures (shown by the console)."""

from __future__ import annotations

import struct

import pytest_twisted
from twisted.internet import protocol, reactor, task

from dcrouter.dns.notify import Notifier
from dcrouter.config.dns import ZoneOptions
from dcrouter.dns.zone import Zone, ZoneSet, build_zone_content


class _Refusing(protocol.DatagramProtocol):
    """A secondary that answers every NOTIFY with REFUSED."""

    def datagramReceived(self, data: bytes, addr) -> None:
        end = data.index(b"\x00", 12) + 5
        header = data[:2] + bytes([0x80 | (4 << 3), 5]) + struct.pack("!HHHH", 1, 0, 0, 0)
        self.transport.write(header + data[12:end], addr)


def _zones(serial: int) -> ZoneSet:
    content = build_zone_content(ZoneOptions(origin="example.test"), "dns.zones[0]")
    return ZoneSet([Zone(content, serial)])


@pytest_twisted.inlineCallbacks
def test_acknowledged_refused_and_unanswered_notifies_are_reported(tmp_path):
    refusing = reactor.listenUDP(0, _Refusing(), interface="127.0.0.1")
    silent = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
    targets = [f"127.0.0.1:{refusing.getHost().port}", f"127.0.0.1:{silent.getHost().port}"]
    notifier = Notifier(reactor, targets, "127.0.0.1", delays=(0.05, 0.05))
    try:
        notifier.zones_changed(_zones(7))
        pending = {r["target"]: r["result"] for r in notifier.stats()["notify_last"]}
        assert pending == {t: "pending" for t in targets}
        for _ in range(100):
            results = {r["target"]: r for r in notifier.stats()["notify_last"]}
            if all(r["result"] != "pending" for r in results.values()):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        assert results[targets[0]]["result"] == "REFUSED"
        assert results[targets[1]]["result"] == "no reply after 3 tries"
        assert all(r["serial"] == 7 and r["zone"] == "example.test" for r in results.values())
        notifier.configure(targets[:1], "127.0.0.1")      # a secondary removed: forgotten
        assert [r["target"] for r in notifier.stats()["notify_last"]] == targets[:1]
    finally:
        notifier.stop()
        yield refusing.stopListening()
        yield silent.stopListening()
