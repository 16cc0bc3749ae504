"""The server over real sockets: EDNS, truncation, TCP, limits, reload, twisted's resolver."""

from __future__ import annotations

import socket
import struct
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads
from twisted.names import client
from twisted.names import dns as tdns

from dcrouter.config import parse_config
from dcrouter.errors import ConfigError
from tests.dns.conftest import ZONE, ask, dns_config, send_raw, start_dns
from tests.support.net import free_tcp_udp_port


def raw_query(name: bytes = b"www.example.test", qtype: int = 1, qid: int = 0x1234,
              flags: int = 0x0100, qdcount: int = 1, tail: bytes = b"", arcount: int = 0) -> bytes:
    labels = b"".join(bytes([len(p)]) + p for p in name.split(b".")) + b"\x00"
    return (struct.pack("!HHHHHH", qid, flags, qdcount, 0, 0, arcount) + labels +
            struct.pack("!HH", qtype, 1) + tail)


@pytest_twisted.ensureDeferred
async def test_edns_payload_size_and_truncation_then_tcp(server: Any) -> None:
    # 600 bytes of TXT: over 512 without EDNS -> TC and an empty answer ...
    plain = await ask(server.udp_port, "long.example.test", "TXT")
    assert plain.flags & dns.flags.TC and not plain.answer
    assert plain.question[0].name.to_text() == "long.example.test."
    small = await ask(server.udp_port, "long.example.test", "TXT", use_edns=0, payload=600)
    assert small.flags & dns.flags.TC and not small.answer
    # ... whole with a large enough EDNS payload, and whole over TCP.
    big = await ask(server.udp_port, "long.example.test", "TXT", use_edns=0, payload=4096)
    assert not big.flags & dns.flags.TC and big.answer
    assert big.edns == 0 and big.payload == 1232  # our own maximum, advertised
    full = await ask(server.tcp_port, "long.example.test", "TXT", tcp=True)
    assert not full.flags & dns.flags.TC
    assert b"".join(full.answer[0][0].strings) == b"x" * 600


@pytest_twisted.ensureDeferred
async def test_dnssec_ok_is_copied_and_bad_edns_version_gets_badvers(server: Any) -> None:
    do = await ask(server.udp_port, "www.example.test", "A", use_edns=0, want_dnssec=True)
    assert do.ednsflags & dns.flags.DO
    v1 = await ask(server.udp_port, "www.example.test", "A", use_edns=1)
    assert v1.rcode() == dns.rcode.BADVERS and not v1.answer


@pytest_twisted.ensureDeferred
async def test_malformed_queries_get_formerr_or_silence(server: Any) -> None:
    two = await send_raw(server.udp_port, raw_query(qdcount=2))
    assert two is not None and two[3] & 0xF == tdns.EFORMAT and two[:2] == b"\x12\x34"
    truncated = await send_raw(server.udp_port, raw_query()[:20])
    assert truncated is not None and truncated[3] & 0xF == tdns.EFORMAT
    pointer = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    looped = await send_raw(server.udp_port, pointer)
    assert looped is not None and looped[3] & 0xF == tdns.EFORMAT
    notify = await send_raw(server.udp_port, raw_query(flags=0x2000))  # opcode NOTIFY
    assert notify is not None and notify[3] & 0xF == tdns.ENOTIMP
    axfr = await send_raw(server.udp_port, raw_query(qtype=tdns.AXFR))  # UDP: as NSD
    assert axfr is not None and axfr[3] & 0xF == tdns.ENOTIMP
    assert await send_raw(server.udp_port, b"\x00" * 5, timeout=0.5) is None  # runt
    assert await send_raw(server.udp_port, raw_query(flags=0x8000), timeout=0.5) is None  # QR
    still = await ask(server.udp_port, "www.example.test", "A")
    assert still.rcode() == dns.rcode.NOERROR
    assert server.service.get_stats()["malformed"] >= 3


@pytest_twisted.ensureDeferred
async def test_tcp_pipelining_and_huge_length_prefix(server: Any) -> None:
    def run() -> tuple[list[int], bytes]:
        with socket.create_connection(("127.0.0.1", server.tcp_port), timeout=3) as s:
            batch = b""
            for qid in (1, 2, 3):
                q = raw_query(qid=qid)
                batch += struct.pack("!H", len(q)) + q
            s.sendall(batch)
            ids = []
            buf = b""
            while len(ids) < 3:
                buf += s.recv(4096)
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    n = struct.unpack("!H", buf[:2])[0]
                    ids.append(struct.unpack("!H", buf[2:4])[0])
                    buf = buf[2 + n:]
        with socket.create_connection(("127.0.0.1", server.tcp_port), timeout=3) as s:
            s.sendall(b"\xff\xff" + b"A" * 100)
            closed = s.recv(10)  # the server closes: b""
        return ids, closed
    ids, closed = await threads.deferToThread(run)
    assert ids == [1, 2, 3]
    assert closed == b""
    assert server.service.get_stats()["tcp_oversized"] == 1


@pytest_twisted.ensureDeferred
async def test_tcp_idle_timeout_and_connection_limit(tmp_path: Any) -> None:
    running = start_dns(dns_config(tcp_timeout=0.3, max_tcp_connections=2), str(tmp_path))
    try:
        def run() -> tuple[bytes, bytes, float]:
            import time
            a = socket.create_connection(("127.0.0.1", running.tcp_port), timeout=3)
            b = socket.create_connection(("127.0.0.1", running.tcp_port), timeout=3)
            c = socket.create_connection(("127.0.0.1", running.tcp_port), timeout=3)
            third = c.recv(10)  # refused: closed at once
            start = time.monotonic()
            try:
                first = a.recv(10)  # idle: aborted after the timeout
            except ConnectionResetError:
                first = b""
            waited = time.monotonic() - start
            for s in (a, b, c):
                s.close()
            return third, first, waited
        third, first, waited = await threads.deferToThread(run)
        assert third == b"" and first == b""
        assert waited < 3
        assert running.service.get_stats()["tcp_refused"] >= 1
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_rate_limit_per_client_ip(tmp_path: Any) -> None:
    running = start_dns(dns_config(rate_limit=5, rate_limit_slip=4), str(tmp_path))
    try:
        def run() -> tuple[int, int]:
            answered = slipped = 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(1.0)
                query = raw_query()
                for qid in range(40):
                    s.sendto(query, ("127.0.0.1", running.udp_port))
                try:
                    while True:
                        reply = s.recv(2000)
                        if reply[2] & 0x02:  # TC without records, no larger than the query
                            assert struct.unpack("!HHH", reply[6:12]) == (0, 0, 0)
                            assert len(reply) <= len(query)
                            slipped += 1
                        else:
                            answered += 1
                except socket.timeout:
                    pass
            return answered, slipped
        answered, slipped = await threads.deferToThread(run)
        assert 5 <= answered <= 10  # 5 a second (the burst may straddle a second)
        assert 5 <= slipped <= 10  # every 4th of the ~35 refused
        assert running.service.get_stats()["rate_limited"] >= 30
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_reload_changes_answer_and_serial_without_dropping_queries(tmp_path: Any) -> None:
    data = dns_config()
    running = start_dns(data, str(tmp_path))
    service = running.service
    try:
        before = await ask(running.udp_port, "www.example.test", "A")
        serial = service.zone("example.test").serial
        assert before.answer[0][0].address == "192.0.2.10"

        # queries keep flowing while the zone is swapped
        stop = []
        answered: list[int] = []

        def hammer() -> None:
            while not stop:
                r = dns.query.udp(dns.message.make_query("example.test", "SOA"), "127.0.0.1",
                                  port=running.udp_port, timeout=2)
                answered.append(r.rcode())
        load = threads.deferToThread(hammer)

        zone = dict(ZONE)
        zone["records"] = [dict(r) for r in ZONE["records"]]
        zone["records"][1]["value"] = "192.0.2.11"
        new = dict(data)
        new["dns"] = dict(data["dns"], zones=[zone])
        new["router"] = {"state_dir": str(tmp_path)}
        await defer.maybeDeferred(service.reconfigure, parse_config(new))
        await task.deferLater(reactor, 0.2, lambda: None)
        stop.append(True)
        await load
        after = await ask(running.udp_port, "www.example.test", "A")
        assert after.answer[0][0].address == "192.0.2.11"
        soa = await ask(running.udp_port, "example.test", "SOA")
        assert soa.answer[0][0].serial > serial
        assert answered and set(answered) == {dns.rcode.NOERROR}

        # an unchanged reload keeps the serial; a bad one keeps the zones
        same = service.zone("example.test").serial
        await defer.maybeDeferred(service.reconfigure, parse_config(new))
        assert service.zone("example.test").serial == same
        bad = dict(new)
        bad_zone = dict(zone, records=[{"name": "x", "type": "A", "value": "not-ip"}])
        bad["dns"] = dict(new["dns"], zones=[bad_zone])
        await defer.maybeDeferred(service.reconfigure, parse_config(bad))
        kept = await ask(running.udp_port, "www.example.test", "A")
        assert kept.answer[0][0].address == "192.0.2.11"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_port_change_rebinds(tmp_path: Any) -> None:
    data = dns_config()
    running = start_dns(data, str(tmp_path))
    try:
        new_port = free_tcp_udp_port()
        new = dict(data, dns=dict(data["dns"], port=new_port), router={"state_dir": str(tmp_path)})
        await defer.maybeDeferred(running.service.reconfigure, parse_config(new))
        assert {p for _proto, _h, p in running.service.bound_addresses()} == {new_port}
        moved = await ask(new_port, "www.example.test", "A")
        assert moved.rcode() == dns.rcode.NOERROR
        assert await send_raw(running.udp_port, raw_query(), timeout=0.5) is None
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_twisted_names_client_resolves_from_this_server(server: Any) -> None:
    resolver = client.createResolver(servers=[("127.0.0.1", server.udp_port)])
    answers, _auth, _add = await resolver.lookupMailExchange("example.test")
    assert sorted((a.payload.preference, a.payload.name.name) for a in answers) == [
        (10, b"mx1.example.test"), (20, b"mx2.example.test")]
    address = await resolver.getHostByName("mx1.example.test")
    assert address == "192.0.2.25"


@pytest_twisted.ensureDeferred
async def test_stats_and_zones_for_the_api(server: Any) -> None:
    await ask(server.udp_port, "www.example.test", "A")
    await ask(server.udp_port, "www.example.test", "A")
    await ask(server.udp_port, "nope.example.test", "MX")
    await ask(server.udp_port, "example.org", "A")
    stats = server.service.get_stats()
    assert stats["queries_by_rcode"]["NOERROR"] >= 2
    assert stats["queries_by_rcode"]["NXDOMAIN"] == 1 and stats["queries_by_rcode"]["REFUSED"] == 1
    assert stats["queries_by_type"]["A"] >= 3 and stats["queries_by_type"]["MX"] == 1
    assert stats["zones"][0]["origin"] == "example.test"
    zones = server.service.zones()
    assert zones[0]["origin"] == "example.test."
    assert {"name": "www.example.test.", "type": "A", "ttl": 300,
            "value": "192.0.2.10"} in zones[0]["records"]
    assert zones[0]["records"][0]["type"] == "SOA"
    assert "udp" in {p for p, _h, _port in server.service.bound_addresses()}


@pytest_twisted.ensureDeferred
async def test_answers_over_16k_stay_decodable_over_tcp(tmp_path: Any) -> None:
    """Compression pointers reach 16 KiB only: later names are written in full."""
    records = [{"name": "@", "type": "MX", "value": f"{i} mx{i}.big.test."} for i in range(1500)]
    records += [{"name": f"mx{i}", "type": "A", "value": f"192.0.2.{i % 250}"}
                for i in range(1500)]
    zone = {"origin": "big.test", "records": records}
    running = start_dns(dns_config(zones=[zone]), str(tmp_path))
    try:
        full = await ask(running.tcp_port, "big.test", "MX", tcp=True)
        assert len(full.to_wire()) > 16384
        assert sum(len(rr) for rr in full.answer) == 1500
        addresses = {rr.name.to_text(): rr[0].address for rr in full.additional
                     if rr.rdtype == dns.rdatatype.A}
        assert len(addresses) == 1500
        assert addresses["mx1499.big.test."] == "192.0.2.249"
        udp = await ask(running.udp_port, "big.test", "MX", use_edns=0, payload=4096)
        assert udp.flags & dns.flags.TC
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_serials_keep_increasing_across_restarts(tmp_path: Any) -> None:
    zone = dict(ZONE, records=list(ZONE["records"]) + [
        {"name": "@", "type": "SOA", "value": "ns1 hostmaster 5 3600 600 604800 300"}])
    data = dns_config(zones=[zone])
    first = start_dns(data, str(tmp_path))
    assert first.service.zone("example.test").serial == 5  # the configured serial
    changed = dict(zone, records=list(zone["records"]) + [
        {"name": "new", "type": "A", "value": "192.0.2.200"}])
    new = dict(data, dns=dict(data["dns"], zones=[changed]), router={"state_dir": str(tmp_path)})
    await defer.maybeDeferred(first.service.reconfigure, parse_config(new))
    assert first.service.zone("example.test").serial == 6
    await first.service.stopService()
    # a restart with the same content keeps 6; one more change gives 7, not 5 again
    second = start_dns(new, str(tmp_path))
    try:
        assert second.service.zone("example.test").serial == 6
        soa = await ask(second.udp_port, "example.test", "SOA")
        assert soa.answer[0][0].serial == 6
    finally:
        await second.service.stopService()
    third = start_dns(data, str(tmp_path))
    try:
        assert third.service.zone("example.test").serial == 7
    finally:
        await third.service.stopService()


@pytest_twisted.ensureDeferred
async def test_tcp_client_that_half_closes_gets_all_answers(server: Any) -> None:
    def run() -> int:
        with socket.create_connection(("127.0.0.1", server.tcp_port), timeout=3) as s:
            for qid in range(1, 51):
                q = raw_query(name=b"long.example.test", qtype=16, qid=qid)
                s.sendall(struct.pack("!H", len(q)) + q)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        count = 0
        while data:
            n = struct.unpack("!H", data[:2])[0]
            count += 1
            data = data[2 + n:]
        return count
    assert await threads.deferToThread(run) == 50


@pytest_twisted.ensureDeferred
async def test_ipv6_listener(tmp_path: Any) -> None:
    running = start_dns(dns_config(port=0, listen="::1"), str(tmp_path))
    try:
        def run() -> tuple[Any, Any]:
            udp = dns.query.udp(dns.message.make_query("www.example.test", "AAAA"), "::1",
                                port=running.udp_port, timeout=3)
            tcp = dns.query.tcp(dns.message.make_query("example.test", "MX"), "::1",
                                port=running.tcp_port, timeout=3)
            return udp, tcp
        udp, tcp = await threads.deferToThread(run)
        assert [r.address for rr in udp.answer for r in rr] == ["2001:db8::10"]
        assert len(tcp.answer[0]) == 2
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_zones_replaced_at_runtime_for_the_api(server: Any) -> None:
    service = server.service
    serial = service.zone("example.test").serial
    zone = dict(ZONE, records=[{"name": "www", "type": "A", "value": "192.0.2.123"}])
    added = {"origin": "api.test", "records": [{"name": "@", "type": "TXT", "value": "hi"}]}
    await service.update_zones([zone, added])
    www = await ask(server.udp_port, "www.example.test", "A")
    assert www.answer[0][0].address == "192.0.2.123"
    assert service.zone("example.test").serial > serial
    api = await ask(server.udp_port, "api.test", "TXT")
    assert api.answer[0][0].strings == (b"hi",)
    with pytest.raises(ConfigError, match=r"dns.zones\[0\].records\[0\].value"):
        service.update_zones([{"origin": "x.test",
                               "records": [{"name": "a", "type": "A", "value": "nope"}]}])
    with pytest.raises(ConfigError, match=r"dns.zones\[0\].origin"):
        service.update_zones([{"records": []}])
    still = await ask(server.udp_port, "api.test", "TXT")
    assert still.answer
