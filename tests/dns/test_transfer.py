"""Zone transfers (AXFR, IXFR) and NOTIFY with real clients over real sockets.

Clients: dnspython's ``dns.query.xfr`` / ``dns.zone.from_xfr``, ``dig`` and
plain UDP sockets standing in for secondaries; NSD as a real secondary is in
``test_secondary_nsd.py``.
"""

from __future__ import annotations

import copy
import socket
import struct
import subprocess
import time
from typing import Any, Optional

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.xfr
import dns.zone
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.logger import globalLogPublisher

from dcrouter.config import parse_config
from dcrouter.dns.service import DnsService
from dcrouter.dns.transfer import TransferAcl, serial_newer
from dcrouter.service import Extensions, RouterContext
from tests.dns.conftest import ZONE, Running, dns_config, start_dns
from tests.dns.test_email_records import mail_config
from tests.dns.test_server import raw_query
from tests.support.router import options_from

ALLOWED = "127.0.0.2"


def axfr(port: int, zone: str, source: str = ALLOWED, **kw: Any) -> list[dns.message.Message]:
    """Every message of a transfer (blocking: call in a thread)."""
    return list(dns.query.xfr("127.0.0.1", zone, port=port, source=source, timeout=5,
                              lifetime=20, **kw))


def zone_from_xfr(port: int, zone: str, source: str = ALLOWED) -> dns.zone.Zone:
    return dns.zone.from_xfr(dns.query.xfr("127.0.0.1", zone, port=port, source=source,
                                           timeout=5, lifetime=20, relativize=False),
                             relativize=False)


def transfer_config(**keys: Any) -> dict[str, Any]:
    data = mail_config(allow_transfer=[f"{ALLOWED}/32"], **keys)
    data["dns"]["zones"][0]["records"] = [dict(r) for r in ZONE["records"]]
    data["dns"]["zones"][0]["ttl"] = 300
    return data


@pytest_twisted.async_yield_fixture
async def xfr_server(tmp_path: Any) -> Any:
    running = start_dns(transfer_config(), str(tmp_path))
    await running.service.ready
    yield running
    await defer.maybeDeferred(running.service.stopService)


@pytest_twisted.ensureDeferred
async def test_axfr_zone_equals_what_queries_return(xfr_server: Any) -> None:
    port = xfr_server.tcp_port
    service = xfr_server.service

    def run() -> tuple[dns.zone.Zone, dict[tuple[str, int], Any], list[dns.message.Message]]:
        zone = zone_from_xfr(port, "example.test")
        answers = {}
        for name, node in zone.nodes.items():
            for rdataset in node.rdatasets:
                query = dns.message.make_query(name, rdataset.rdtype)
                answers[(name.to_text(), rdataset.rdtype)] = dns.query.tcp(
                    query, "127.0.0.1", port=port, timeout=3)
        return zone, answers, axfr(port, "example.test")

    zone, answers, messages = await threads.deferToThread(run)
    served = service.zone("example.test")
    # the answer starts and ends with the SOA carrying the served serial
    records = [rr for m in messages for rrset in m.answer for rr in
               [(rrset.name.to_text(), rrset.rdtype, r) for r in rrset]]
    assert records[0][1] == records[-1][1] == dns.rdatatype.SOA
    assert records[0][2].serial == records[-1][2].serial == served.serial
    assert all(m.flags & dns.flags.AA and m.rcode() == dns.rcode.NOERROR for m in messages)
    # the same set of (owner, type) as the zone served: every type, the email records
    expected = {(r.owner + ".", r.rtype) for r in served.records}
    got = {(k[0], k[1]) for k in answers}
    assert got == expected
    types = {dns.rdatatype.to_text(t) for _n, t in got}
    assert types >= {"SOA", "NS", "A", "AAAA", "CNAME", "MX", "TXT", "SRV", "CAA", "PTR"}
    # email records are in the transfer: MX, SPF, DKIM, DMARC
    names = {n for n, _t in got}
    assert "_dmarc.example.test." in names
    assert any(n.endswith("._domainkey.example.test.") for n in names)
    dmarc = zone.find_rdataset("_dmarc.example.test.", "TXT")
    assert b"".join(dmarc[0].strings).startswith(b"v=DMARC1")
    spf = [b"".join(r.strings) for r in zone.find_rdataset("example.test.", "TXT")]
    assert any(s.startswith(b"v=spf1") for s in spf)
    long_txt = zone.find_rdataset("long.example.test.", "TXT")
    assert b"".join(long_txt[0].strings) == b"x" * 600
    # every rdataset equals what an ordinary query returns (delegations give referrals)
    cuts = {"deleg.example.test.", "ns1.deleg.example.test."}
    for (name, rdtype), response in answers.items():
        rdataset = zone.find_rdataset(name, rdtype)
        if name in cuts:
            assert not response.answer  # a referral: the data is in the transfer all the same
            continue
        rrset = response.get_rrset(response.answer, dns.name.from_text(name), dns.rdataclass.IN,
                                   rdtype)
        assert rrset is not None, (name, rdtype)
        assert set(rrset) == set(rdataset), (name, rdtype)
        assert rrset.ttl == rdataset.ttl
    assert service.get_stats()["transfers"] == 2


@pytest_twisted.ensureDeferred
async def test_transfer_refused_outside_allow_transfer_and_logged(xfr_server: Any) -> None:
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("event") == "dns.transfer_refused":
            events.append(event)
    globalLogPublisher.addObserver(observe)
    try:
        def run() -> str:
            try:
                axfr(xfr_server.tcp_port, "example.test", source="127.0.0.1")
            except dns.xfr.TransferError as e:
                return dns.rcode.to_text(e.rcode)
            return "transferred"
        assert await threads.deferToThread(run) == "REFUSED"
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [e["client"] for e in events] == ["127.0.0.1"]
    stats = xfr_server.service.get_stats()
    assert stats["transfers_refused"] == 1 and stats["transfers"] == 0

    # a name that is not a zone served here: NOTAUTH, even for an allowed client
    def other() -> str:
        try:
            axfr(xfr_server.tcp_port, "www.example.test")
        except dns.xfr.TransferError as e:
            return dns.rcode.to_text(e.rcode)
        return "transferred"
    assert await threads.deferToThread(other) == "NOTAUTH"
    # ordinary queries on the same server still work
    response = await threads.deferToThread(
        dns.query.tcp, dns.message.make_query("www.example.test", "A"), "127.0.0.1",
        port=xfr_server.tcp_port, timeout=3)
    assert response.answer[0][0].address == "192.0.2.10"


@pytest_twisted.ensureDeferred
async def test_axfr_and_ixfr_over_udp_refused_even_for_allowed_clients(xfr_server: Any) -> None:
    """No transfer over UDP: AXFR gets NOTIMP (RFC 5936 4.2), IXFR REFUSED, as NSD answers."""
    def run(qtype: int, source: str) -> Optional[bytes]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((source, 0))
            s.settimeout(2)
            s.sendto(raw_query(b"example.test", qtype=qtype), ("127.0.0.1", xfr_server.udp_port))
            return s.recv(65535)
    for qtype in (252, 251):
        for source in ("127.0.0.1", ALLOWED):
            reply = await threads.deferToThread(run, qtype, source)
            assert reply is not None and reply[3] & 0xF == (
                dns.rcode.NOTIMP if qtype == 252 else dns.rcode.REFUSED)
            assert struct.unpack("!H", reply[6:8])[0] == 0  # no records


@pytest_twisted.ensureDeferred
async def test_large_zone_is_split_into_several_messages(tmp_path: Any) -> None:
    records = [{"name": f"host{i}", "type": "A", "value": f"10.{i // 65536}.{i // 256 % 256}"
                f".{i % 256}"} for i in range(5000)]
    records += [{"name": f"t{i}", "type": "TXT", "value": f"text record {i} " + "y" * 300}
                for i in range(200)]
    zone = {"origin": "big.test", "records": records}
    running = start_dns(dns_config(zones=[zone], allow_transfer=["127.0.0.0/30"]),
                        str(tmp_path))
    try:
        def run() -> tuple[list[dns.message.Message], list[int], dns.zone.Zone]:
            messages = axfr(running.tcp_port, "big.test")
            # the raw message sizes, read off the wire
            q = dns.message.make_query("big.test", "AXFR").to_wire()
            sizes = []
            with socket.create_connection(("127.0.0.1", running.tcp_port), timeout=5,
                                          source_address=(ALLOWED, 0)) as s:
                s.sendall(struct.pack("!H", len(q)) + q)
                soas = 0
                while soas < 2:
                    head = _recv_exact(s, 2)
                    body = _recv_exact(s, struct.unpack("!H", head)[0])
                    sizes.append(len(body))
                    msg = dns.message.from_wire(body, one_rr_per_rrset=True)
                    soas += sum(1 for rrset in msg.answer if rrset.rdtype == dns.rdatatype.SOA)
            return messages, sizes, zone_from_xfr(running.tcp_port, "big.test")
        messages, sizes, received = await threads.deferToThread(run)
        assert len(messages) > 3 and len(sizes) == len(messages)
        assert max(sizes) <= 65535
        count = sum(len(rrset) for m in messages for rrset in m.answer)
        assert count == 5200 + 1 + 2  # the records, the generated NS, the SOA twice
        assert received.find_rdataset("host4999.big.test.", "A")[0].address == "10.0.19.135"
        assert len(list(received.iterate_rdatas("A"))) == 5000
    finally:
        await running.service.stopService()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


@pytest_twisted.ensureDeferred
async def test_ixfr_gets_the_full_zone_or_the_current_soa(xfr_server: Any) -> None:
    serial = xfr_server.service.zone("example.test").serial

    def run(client_serial: int) -> list[dns.message.Message]:
        return axfr(xfr_server.tcp_port, "example.test", rdtype=dns.rdatatype.IXFR,
                    serial=client_serial)
    full = await threads.deferToThread(run, serial - 1)
    rrsets = [rrset for m in full for rrset in m.answer]
    assert rrsets[0].rdtype == rrsets[-1].rdtype == dns.rdatatype.SOA
    assert rrsets[1].rdtype != dns.rdatatype.SOA  # AXFR-style (RFC 1995 section 4)
    assert sum(len(r) for r in rrsets) > 20
    current = await threads.deferToThread(run, serial)
    assert [r.rdtype for m in current for r in m.answer] == [dns.rdatatype.SOA]
    assert current[0].answer[0][0].serial == serial
    assert xfr_server.service.get_stats()["transfers_up_to_date"] == 1


@pytest_twisted.ensureDeferred
async def test_dig_axfr_parses(xfr_server: Any) -> None:
    def run() -> list[list[str]]:
        out = subprocess.run(["dig", "@127.0.0.1", "-p", str(xfr_server.tcp_port), "-b", ALLOWED,
                              "example.test", "AXFR", "+nocomments", "+nostats", "+nocmd"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return [line.split() for line in out.splitlines() if line and not line.startswith(";")]
    lines = await threads.deferToThread(run)
    assert lines[0][3] == lines[-1][3] == "SOA"
    assert int(lines[0][6]) == xfr_server.service.zone("example.test").serial
    assert ["www.example.test.", "300", "IN", "AAAA", "2001:db8::10"] in lines
    assert len(lines) == len(xfr_server.service.zone("example.test").records) + 1


@pytest_twisted.ensureDeferred
async def test_allow_transfer_and_notify_are_reloaded(xfr_server: Any, tmp_path: Any) -> None:
    service = xfr_server.service

    def run() -> str:
        try:
            return str(len(axfr(xfr_server.tcp_port, "example.test", source="127.0.0.1")))
        except dns.xfr.TransferError as e:
            return dns.rcode.to_text(e.rcode)
    assert await threads.deferToThread(run) == "REFUSED"
    secondary = Secondary()
    try:
        data = copy.deepcopy(transfer_config())
        data["dns"]["port"] = xfr_server.udp_port
        data["dns"]["allow_transfer"] = ["::ffff:127.0.0.0/104"]  # IPv4-mapped: 127.0.0.0/8
        data["dns"]["notify"] = [f"127.0.0.1:{secondary.port}"]
        data["router"] = {"state_dir": str(tmp_path)}
        # a target added by a reload is told the current serials of every zone
        receiving = threads.deferToThread(secondary.receive, 1.0, (0, 1, 2))
        await defer.maybeDeferred(service.reconfigure, parse_config(data))
        assert (await threads.deferToThread(run)).isdigit()
        told = {m.question[0].name.to_text(): m.answer[0][0].serial
                for m, _a in await receiving}
        assert told == {f"{z.origin}.": z.serial for z in service.zone_set}
        # a reload that changes one zone NOTIFYs that zone only, with its new serial
        data["dns"]["zones"][0]["records"][1]["value"] = "192.0.2.11"
        receiving = threads.deferToThread(secondary.receive, 1.0)
        await defer.maybeDeferred(service.reconfigure, parse_config(data))
        changed = await receiving
        assert [(m.question[0].name.to_text(), m.answer[0][0].serial) for m, _a in changed] == [
            ("example.test.", service.zone("example.test").serial)]
    finally:
        secondary.close()


@pytest_twisted.ensureDeferred
async def test_queries_pipelined_behind_a_transfer_are_answered_after_it(
        xfr_server: Any) -> None:
    def run() -> list[dns.message.Message]:
        transfer = dns.message.make_query("example.test", "AXFR")
        transfer.id = 1
        query = dns.message.make_query("www.example.test", "A")
        query.id = 2
        wire = b"".join(struct.pack("!H", len(w)) + w for w in
                        (transfer.to_wire(), query.to_wire()))
        out = []
        with socket.create_connection(("127.0.0.1", xfr_server.tcp_port), timeout=5,
                                      source_address=(ALLOWED, 0)) as s:
            s.sendall(wire)
            s.shutdown(socket.SHUT_WR)  # the answers still come, then the server closes
            while True:
                try:
                    head = _recv_exact(s, 2)
                except EOFError:
                    return out
                body = _recv_exact(s, struct.unpack("!H", head)[0])
                out.append(dns.message.from_wire(body, one_rr_per_rrset=True))
    messages = await threads.deferToThread(run)
    assert [m.id for m in messages][-1] == 2 and {m.id for m in messages[:-1]} == {1}
    assert messages[-1].answer[0][0].address == "192.0.2.10"
    rrsets = [r for m in messages[:-1] for r in m.answer]
    assert rrsets[0].rdtype == rrsets[-1].rdtype == dns.rdatatype.SOA


@pytest_twisted.ensureDeferred
async def test_transfer_over_ipv6_with_a_record_larger_than_a_message(tmp_path: Any) -> None:
    huge = "z" * 30000  # about 30 KB of TXT: over the 16 KiB message target, alone in one
    zone = {"origin": "six.test", "records": [
        {"name": "@", "type": "AAAA", "value": "2001:db8::6"},
        {"name": "huge", "type": "TXT", "value": huge}] + [
        {"name": f"n{i}", "type": "A", "value": "192.0.2.6"} for i in range(1000)]}
    running = start_dns(dns_config(port=0, listen="::1", zones=[zone],
                                   allow_transfer=["::1/128"]), str(tmp_path))
    try:
        def run() -> tuple[list[dns.message.Message], dns.zone.Zone]:
            messages = list(dns.query.xfr("::1", "six.test", port=running.tcp_port, timeout=5))
            zone = dns.zone.from_xfr(dns.query.xfr("::1", "six.test", port=running.tcp_port,
                                                   timeout=5, relativize=False),
                                     relativize=False)
            return messages, zone
        messages, received = await threads.deferToThread(run)
        alone = [m for m in messages if any(r.rdtype == dns.rdatatype.TXT for r in m.answer)]
        assert len(alone) == 1 and sum(len(r) for r in alone[0].answer) == 1
        assert len(alone[0].to_wire()) > 30000
        txt = received.find_rdataset("huge.six.test.", "TXT")
        assert b"".join(txt[0].strings) == huge.encode()
        assert len(list(received.iterate_rdatas("A"))) == 1000
    finally:
        await running.service.stopService()


def test_txt_data_too_long_for_a_message_is_a_config_error(tmp_path: Any) -> None:
    from dcrouter.errors import ConfigError
    zone = {"origin": "x.test", "records": [{"name": "t", "type": "TXT", "value": "a" * 70000}]}
    with pytest.raises(ConfigError, match=r"records\[0\].value.*too long"):
        DnsService(RouterContext(options_from(dns_config(zones=[zone]), str(tmp_path)), reactor,
                                 Extensions()))


def test_acl_matches_ipv4_ipv6_and_mapped_addresses() -> None:
    acl = TransferAcl(["192.0.2.0/24", "2001:db8::/32", "::ffff:198.51.100.7/128"])
    assert acl.allows("192.0.2.9") and acl.allows("::ffff:192.0.2.9")
    assert acl.allows("2001:db8::1") and acl.allows("198.51.100.7")
    assert not acl.allows("192.0.3.1") and not acl.allows("2001:db9::1")
    assert not acl.allows("not an address") and not TransferAcl().allows("127.0.0.1")
    assert serial_newer(2, 1) and serial_newer(0, 0xFFFFFFFF) and not serial_newer(1, 1)


# -- NOTIFY ---------------------------------------------------------------------------------


class Secondary:
    """A UDP socket standing in for a secondary: receives NOTIFYs, replies to chosen ones."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def receive(self, seconds: float, reply_to: tuple[int, ...] = (0,),
                rcode: int = dns.rcode.NOERROR, count: Optional[int] = None
                ) -> list[tuple[dns.message.Message, Any]]:
        """What arrives within ``seconds`` (or the first ``count``); reply to the n-th of
        ``reply_to``."""
        got: list[tuple[dns.message.Message, Any]] = []
        end = time.monotonic() + seconds
        while count is None or len(got) < count:
            left = end - time.monotonic()
            if left <= 0:
                return got
            self.sock.settimeout(left)
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                return got
            message = dns.message.from_wire(data)
            if len(got) in reply_to:
                reply = dns.message.make_response(message)
                reply.set_rcode(rcode)
                self.sock.sendto(reply.to_wire(), addr)
            got.append((message, addr))
        return got

    def close(self) -> None:
        self.sock.close()


def start_with_fast_retries(data: dict[str, Any], state_dir: str,
                            delays: tuple[float, ...] = (0.3, 0.3, 0.3)) -> Running:
    context = RouterContext(options_from(data, state_dir), reactor, Extensions())
    service = DnsService(context)
    service.notifier.delays = delays
    service.startService()
    return Running(service)


def soa_serial(message: dns.message.Message) -> int:
    assert message.opcode() == dns.opcode.NOTIFY and message.flags & dns.flags.AA
    assert not message.flags & dns.flags.QR
    assert message.question[0].name.to_text() == "example.test."
    assert message.question[0].rdtype == dns.rdatatype.SOA
    return message.answer[0][0].serial


@pytest_twisted.ensureDeferred
async def test_notify_on_start_and_on_change_retried_until_answered(tmp_path: Any) -> None:
    secondary = Secondary()
    running = start_with_fast_retries(dns_config(notify=[f"127.0.0.1:{secondary.port}"]),
                                      str(tmp_path))
    service = running.service
    try:
        # at start: one NOTIFY with the serial served, answered at once: no resend
        first = await threads.deferToThread(secondary.receive, 1.0)
        assert len(first) == 1
        assert soa_serial(first[0][0]) == service.zone("example.test").serial
        assert first[0][1][0] == "127.0.0.1"  # from dns.listen
        assert service.get_stats()["notify_acknowledged"] == 1

        # a zone change: the first NOTIFY goes unanswered, the resend is answered, no more
        old = service.zone("example.test").serial
        receiving = threads.deferToThread(secondary.receive, 1.5, (1,))
        await service.update_zones([dict(ZONE, records=[
            {"name": "www", "type": "A", "value": "192.0.2.123"}])])
        second = await receiving
        new = service.zone("example.test").serial
        assert new > old
        assert [soa_serial(m) for m, _a in second] == [new, new]
        assert second[0][0].id == second[1][0].id
        stats = service.get_stats()
        assert stats["notify_acknowledged"] == 2 and stats["notify_pending"] == 0
        assert stats["notify_sent"] == 3

        # an unchanged zone set sends nothing
        quiet = threads.deferToThread(secondary.receive, 0.5)
        service.notifier.zones_changed(service.zone_set)
        assert await quiet == []
    finally:
        await service.stopService()
        secondary.close()


@pytest_twisted.ensureDeferred
async def test_notify_gives_up_after_the_retries_and_logs_error_replies(tmp_path: Any) -> None:
    silent, refusing = Secondary(), Secondary()
    running = start_with_fast_retries(
        dns_config(notify=[f"127.0.0.1:{silent.port}", f"127.0.0.1:{refusing.port}"]),
        str(tmp_path), delays=(0.2, 0.2))
    try:
        got_silent, got_refusing = await defer.gatherResults([
            threads.deferToThread(silent.receive, 1.5, ()),
            threads.deferToThread(refusing.receive, 1.0, (0,), dns.rcode.NOTAUTH)])
        assert len(got_silent) == 3  # the first try and two resends, then it gives up
        assert len(got_refusing) == 1  # an error reply is a reply: logged, not resent
        stats = running.service.get_stats()
        assert stats["notify_failed"] == 1 and stats["notify_rejected"] == 1
        assert stats["notify_pending"] == 0
    finally:
        await running.service.stopService()
        silent.close()
        refusing.close()


def test_notify_targets_are_checked() -> None:
    from dcrouter.errors import ConfigError
    with pytest.raises(ConfigError, match=r"dns.notify\[0\]"):
        parse_config({"dns": {"notify": ["ns2.example.test:53"]}})
    with pytest.raises(ConfigError, match=r"dns.allow_transfer\[1\]"):
        parse_config({"dns": {"allow_transfer": ["127.0.0.1/32", "everyone"]}})
    options = parse_config({"dns": {"notify": ["192.0.2.1", "[2001:db8::1]:5353"]}})
    assert options.dns is not None and options.dns.notify == ("192.0.2.1", "[2001:db8::1]:5353")


def test_mangled_transfer_queries_never_raise(tmp_path: Any) -> None:
    """10,000 mutated, truncated AXFR/IXFR queries straight into the transfer handler."""
    import random

    from tests.dns.test_fuzz import encode_name
    service = DnsService(RouterContext(options_from(
        dns_config(allow_transfer=["127.0.0.0/8"]), str(tmp_path)), reactor, Extensions()))
    handler = service.transfers
    rng = random.Random(1996)
    current = service.zone("example.test").serial
    soas = [b"\xc0\x0c" + struct.pack("!HHIH", 6, 1, 0, 22) + b"\x00\x00" +
            struct.pack("!IIIII", serial, 0, 0, 0, 0) for serial in (current - 1, current)]
    answered = 0
    for _ in range(10000):
        qtype = rng.choice([251, 252])
        nscount = 1 if qtype == 251 and rng.random() < 0.8 else 0
        query = bytearray(struct.pack("!HHHHHH", rng.getrandbits(16), 0, 1, 0, nscount, 0) +
                          encode_name(rng.choice([b"example.test", b"www.example.test", b""])) +
                          struct.pack("!HH", qtype, 1) + (rng.choice(soas) if nscount else b""))
        for _ in range(rng.randrange(0, 4)):
            query[rng.randrange(len(query))] = rng.getrandbits(8)
        if rng.random() < 0.3:
            del query[rng.randrange(len(query)):]
        stream = handler.messages(bytes(query), "127.0.0.1")
        if stream is not None:
            for message in stream:
                assert 12 <= len(message) <= 65535
            answered += 1
    assert answered > 2000  # many still parse: full transfers, current-SOA answers, refusals
    assert handler.transfers > 500 and handler.up_to_date > 100


@pytest_twisted.ensureDeferred
async def test_notify_to_an_ipv6_secondary(tmp_path: Any) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        sock.settimeout(3)
        port = sock.getsockname()[1]
        running = start_with_fast_retries(dns_config(port=0, listen="::1",
                                                     notify=[f"[::1]:{port}"]), str(tmp_path))
        try:
            def run() -> tuple[dns.message.Message, Any]:
                data, addr = sock.recvfrom(65535)
                message = dns.message.from_wire(data)
                sock.sendto(dns.message.make_response(message).to_wire(), addr)
                return message, addr
            message, addr = await threads.deferToThread(run)
            assert soa_serial(message) == running.service.zone("example.test").serial
            assert addr[0] == "::1"
            for _ in range(20):
                if running.service.get_stats()["notify_acknowledged"]:
                    break
                await threads.deferToThread(time.sleep, 0.05)
            assert running.service.get_stats()["notify_acknowledged"] == 1
        finally:
            await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_notify_when_a_new_dkim_key_republishes_the_email_records(tmp_path: Any) -> None:
    secondary = Secondary()
    data = transfer_config(notify=[f"127.0.0.1:{secondary.port}"])
    running = start_with_fast_retries(data, str(tmp_path))
    service = running.service
    try:
        await service.ready
        zones = len(service.zone_set)
        start = await threads.deferToThread(secondary.receive, 3.0, tuple(range(zones)),
                                            count=zones)
        assert len(start) == zones  # one for each zone at start, all answered
        serial = service.zone("example.test").serial
        receiving = threads.deferToThread(secondary.receive, 5.0, (0,), count=1)
        # an operator creates a key for a new selector: the records are republished
        await threads.deferToThread(service.context.dkim_keys.get, "example.test", "rotated",
                                    create=True)
        told = [(m.question[0].name.to_text(), m.answer[0][0].serial)
                for m, _a in await receiving]
        new = service.zone("example.test").serial
        assert new > serial
        assert told == [("example.test.", new)]

        def fetch() -> dns.zone.Zone:
            return zone_from_xfr(running.tcp_port, "example.test")
        zone = await threads.deferToThread(fetch)
        key = zone.find_rdataset("rotated._domainkey.example.test.", "TXT")
        assert b"".join(key[0].strings).startswith(b"v=DKIM1; k=rsa; p=")
    finally:
        await service.stopService()
        secondary.close()


def test_a_client_that_does_not_read_pauses_the_transfer(tmp_path: Any) -> None:
    """Messages are encoded only while the transport takes them: memory stays bounded."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    class BufferingTransport(StringTransport):
        """Pauses its producer above 64 KiB unread, like a real TCP transport."""

        def write(self, data: bytes) -> None:
            super().write(data)
            if len(self.value()) > 65536 and self.producer is not None and not self.paused:
                self.paused = True
                self.producer.pauseProducing()

        def pauseProducing(self) -> None:  # reading from the client: nothing to do here
            pass

        def resumeProducing(self) -> None:
            pass

    records = [{"name": f"h{i}", "type": "A", "value": "192.0.2.1"} for i in range(12000)]
    service = DnsService(RouterContext(options_from(dns_config(
        zones=[{"origin": "big.test", "records": records}], allow_transfer=["127.0.0.1/32"]),
        str(tmp_path)), reactor, Extensions()))
    protocol = service.tcp.buildProtocol(None)
    transport = BufferingTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5353))
    transport.paused = False
    protocol.makeConnection(transport)
    query = dns.message.make_query("big.test", "AXFR").to_wire()
    protocol.dataReceived(struct.pack("!H", len(query)) + query)
    try:
        first = len(transport.value())
        assert 65536 < first < 65536 + 2 * 16384 + 4  # stopped right after the high-water mark
        assert protocol.stream is not None  # the rest is not encoded yet
        total, rounds = first, 0
        transport.clear()
        transport.paused = False
        while protocol.stream is not None:
            protocol.resumeProducing()
            total += len(transport.value())
            transport.clear()
            transport.paused = False
            rounds += 1
        assert rounds >= 2 and total > 12000 * 16  # several pauses, every record sent
    finally:
        protocol.connectionLost(None)
