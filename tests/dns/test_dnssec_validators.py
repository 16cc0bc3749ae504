"""Real validators on dcrouter's signed zone: Unbound, delv, dnssec-verify, ldns-verify-zone.

* Unbound (Debian ``unbound``) resolving through a stub zone, with the DS that
  ``dcrouter`` prints as its only trust anchor, answers with AD; behind a
  proxy that flips one byte of a signature it answers SERVFAIL;
* the zone transferred over AXFR passes ``dnssec-verify`` (bind9-utils) and
  ``ldns-verify-zone`` (ldnsutils); NSD as a secondary serves the transferred
  zone, and ``delv`` (bind9-dnsutils) fully validates answers from both.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, Optional

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import DatagramProtocol

from tests.dns.conftest import ZONE, Running, start_dns
from tests.dns.signed_peer import (Unbound, axfr_text, dnssec_verify, ldns_verify, require)
from tests.dns.test_secondary_nsd import wait_for
from tests.support.net import free_tcp_udp_port

SIGNED_ZONE = dict(ZONE, dnssec=True)


def signed_config(**dns_keys: Any) -> dict[str, Any]:
    """example.test, signed, on a free loopback port (transfers allowed to 127.0.0.1)."""
    section = {"listen": "127.0.0.1", "port": free_tcp_udp_port(), "rate_limit": 0,
               "zones": [SIGNED_ZONE], "allow_transfer": ["127.0.0.1/32"]}
    section.update(dns_keys)
    return {"dns": section}


def trust_anchor(running: Running, origin: str = "example.test") -> str:
    """The DS lines dcrouter gives the registrar."""
    status = running.service.dnssec.status(origin, running.service.clock.seconds())
    assert status["ds"], status
    return "\n".join(status["ds"])


class TamperingProxy(DatagramProtocol):
    """Forwards UDP queries to ``upstream``; in answers to ``qtype`` queries, one byte of
    every signature in the answer section is flipped (a forged or damaged answer)."""

    noisy = False

    def __init__(self, upstream: int, qtype: int) -> None:
        self.upstream = upstream
        self.qtype = qtype
        self.clients: dict[int, Any] = {}
        self.tampered = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        """A query from a client, or dcrouter's answer."""
        if addr == ("127.0.0.1", self.upstream):
            qid = int.from_bytes(data[:2], "big")
            client = self.clients.pop(qid, None)
            if client is not None:
                self.transport.write(self._tamper(data), client)
            return
        self.clients[int.from_bytes(data[:2], "big")] = addr
        self.transport.write(data, ("127.0.0.1", self.upstream))

    def _tamper(self, data: bytes) -> bytes:
        msg = dns.message.from_wire(data)
        if not msg.question or msg.question[0].rdtype != self.qtype:
            return data
        for rrset in msg.answer:
            if rrset.rdtype == dns.rdatatype.RRSIG:
                forged = [sig.replace(signature=bytes([sig.signature[0] ^ 0x55]) +
                                      sig.signature[1:]) for sig in rrset]
                rrset.clear()
                for sig in forged:
                    rrset.add(sig)
                self.tampered += 1
        return msg.to_wire()


@pytest_twisted.async_yield_fixture
async def signed(tmp_path: Any) -> Any:
    """dcrouter serving example.test signed."""
    running = start_dns(signed_config(), str(tmp_path / "dcrouter"))
    await running.service.ready
    yield running
    await defer.maybeDeferred(running.service.stopService)


def _unbound(folder: str, anchor: str, port: int) -> Unbound:
    return Unbound(folder, free_tcp_udp_port(), anchor, {"example.test": port})


@pytest_twisted.ensureDeferred
async def test_unbound_validates_with_the_ds_dcrouter_prints(signed: Running,
                                                             tmp_path: Any) -> None:
    unbound = await threads.deferToThread(_unbound, str(tmp_path / "unbound"),
                                          trust_anchor(signed), signed.udp_port)
    try:
        for name, rdtype, rcode in (("www.example.test", "A", dns.rcode.NOERROR),
                                    ("example.test", "MX", dns.rcode.NOERROR),
                                    ("nope.example.test", "A", dns.rcode.NXDOMAIN),
                                    ("www.example.test", "MX", dns.rcode.NOERROR),
                                    ("x.y.wild.example.test", "TXT", dns.rcode.NOERROR),
                                    ("deep.ent.sub.example.test", "A", dns.rcode.NOERROR),
                                    ("ent.sub.example.test", "A", dns.rcode.NOERROR),
                                    ("chain.example.test", "A", dns.rcode.NOERROR)):
            reply = await threads.deferToThread(unbound.ask, name, rdtype)
            assert reply.rcode() == rcode, (name, rdtype, reply.to_text(), unbound.log())
            assert reply.flags & dns.flags.AD, (name, rdtype, reply.to_text(), unbound.log())
    finally:
        await threads.deferToThread(unbound.stop)


@pytest_twisted.ensureDeferred
async def test_unbound_servfails_a_tampered_signature(signed: Running, tmp_path: Any) -> None:
    proxy = TamperingProxy(signed.udp_port, dns.rdatatype.A)
    port = reactor.listenUDP(0, proxy, interface="127.0.0.1")
    unbound: Optional[Unbound] = None
    try:
        unbound = await threads.deferToThread(_unbound, str(tmp_path / "unbound"),
                                              trust_anchor(signed), port.getHost().port)
        reply = await threads.deferToThread(unbound.ask, "www.example.test", "A")
        assert reply.rcode() == dns.rcode.SERVFAIL, reply.to_text()
        assert proxy.tampered >= 1
        assert "signature crypto failed" in unbound.log() or "bogus" in unbound.log().lower()
        # what the proxy leaves alone still validates (the DNSKEY set passed through it)
        reply = await threads.deferToThread(unbound.ask, "www.example.test", "AAAA")
        assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AD
    finally:
        if unbound is not None:
            await threads.deferToThread(unbound.stop)
        await defer.maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_unbound_servfails_a_zone_signed_with_other_keys(signed: Running,
                                                               tmp_path: Any) -> None:
    # the same zone signed by another dcrouter (its own keys) does not match the DS
    impostor = start_dns(signed_config(), str(tmp_path / "impostor"))
    unbound: Optional[Unbound] = None
    try:
        unbound = await threads.deferToThread(_unbound, str(tmp_path / "unbound"),
                                              trust_anchor(signed), impostor.udp_port)
        reply = await threads.deferToThread(unbound.ask, "www.example.test", "A")
        assert reply.rcode() == dns.rcode.SERVFAIL, reply.to_text()
    finally:
        if unbound is not None:
            await threads.deferToThread(unbound.stop)
        await defer.maybeDeferred(impostor.service.stopService)


@pytest_twisted.ensureDeferred
async def test_transferred_zone_passes_dnssec_verify_and_ldns_verify_zone(
        signed: Running, tmp_path: Any) -> None:
    text = await threads.deferToThread(axfr_text, signed.tcp_port, "example.test")
    assert " RRSIG " in text and " NSEC " in text and " DNSKEY " in text
    verify = await threads.deferToThread(dnssec_verify, text, "example.test", str(tmp_path))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "Zone fully signed" in verify.stdout + verify.stderr
    ldns = await threads.deferToThread(ldns_verify, text, str(tmp_path))
    assert ldns.returncode == 0, ldns.stdout + ldns.stderr
    assert "Zone is verified and complete" in ldns.stdout + ldns.stderr
    # a damaged copy fails both (one signature byte changed)
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if "\tRRSIG\tA " in line or " RRSIG A " in line)
    fields = lines[i].split()
    fields[-1] = ("A" if fields[-1][0] != "A" else "B") + fields[-1][1:]
    lines[i] = " ".join(fields)
    damaged = "\n".join(lines) + "\n"
    verify = await threads.deferToThread(dnssec_verify, damaged, "example.test", str(tmp_path))
    assert verify.returncode != 0
    ldns = await threads.deferToThread(ldns_verify, damaged, str(tmp_path), "damaged")
    assert ldns.returncode != 0


def nsd_secondary(folder: str, port: int, primary: int) -> subprocess.Popen:
    """NSD transferring example.test from dcrouter (request-xfr AXFR)."""
    os.makedirs(folder, exist_ok=True)
    conf = os.path.join(folder, "nsd.conf")
    with open(conf, "w") as f:
        f.write(f"""server:
  ip-address: 127.0.0.1
  port: {port}
  username: ""
  chroot: ""
  zonesdir: "{folder}"
  pidfile: "{folder}/nsd.pid"
  zonelistfile: "{folder}/zone.list"
  xfrdfile: "{folder}/xfrd.state"
  xfrdir: "{folder}"
  database: ""
  server-count: 1
  logfile: "{folder}/nsd.log"
remote-control:
  control-enable: no
zone:
  name: "example.test"
  zonefile: "example.test.zone"
  request-xfr: AXFR 127.0.0.1@{primary} NOKEY
""")
    return subprocess.Popen([require("nsd"), "-d", "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def delv(port: int, anchor: str, folder: str, name: str, rdtype: str) -> str:
    """delv's verdict for ``name``/``rdtype`` asked of 127.0.0.1:port with ``anchor``."""
    path = os.path.join(folder, "anchors.conf")
    entries = []
    for line in anchor.splitlines():
        owner, _in, _ds, tag, alg, digest_type, digest = line.split()
        entries.append(f'  "{owner}" static-ds {tag} {alg} {digest_type} "{digest}";')
    with open(path, "w") as f:
        f.write("trust-anchors {\n" + "\n".join(entries) + "\n};\n")
    proc = subprocess.run([require("delv"), "@127.0.0.1", "-p", str(port), "-a", path,
                           "+root=example.test", name, rdtype], capture_output=True, text=True,
                          timeout=30)
    return proc.stdout + proc.stderr


@pytest_twisted.ensureDeferred
async def test_delv_validates_dcrouter_and_an_nsd_secondary_of_it(signed: Running,
                                                                  tmp_path: Any) -> None:
    anchor = trust_anchor(signed)
    folder = str(tmp_path)
    for name, rdtype in (("www.example.test", "A"), ("nope.example.test", "A"),
                         ("x.wild.example.test", "A")):
        out = await threads.deferToThread(delv, signed.udp_port, anchor, folder, name, rdtype)
        assert "; fully validated" in out or "; negative response, fully validated" in out, out
    port = free_tcp_udp_port()
    nsd = nsd_secondary(str(tmp_path / "nsd"), port, signed.tcp_port)
    try:
        serial = signed.service.zone("example.test").serial

        def transferred() -> bool:
            query = dns.message.make_query("example.test", "SOA")
            try:
                reply = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)
            except Exception:
                return False
            return bool(reply.answer) and reply.answer[0][0].serial == serial
        assert await wait_for(transferred)
        for name, rdtype in (("www.example.test", "AAAA"), ("nope.example.test", "TXT"),
                             ("example.test", "DNSKEY")):
            out = await threads.deferToThread(delv, port, anchor, folder, name, rdtype)
            assert "fully validated" in out, out
    finally:
        nsd.terminate()
        await threads.deferToThread(nsd.wait, 10)


def parent_and_child(port: int, **policy: Any) -> dict[str, Any]:
    """test. (signed) delegating example.test (signed): dcrouter keeps the DS in test."""
    parent = {"origin": "test", "ttl": 60, "dnssec": True, "records": [
        {"name": "@", "type": "SOA", "value": "ns1.test. hostmaster.test. 1 3600 600 86400 60"},
        {"name": "@", "type": "NS", "value": "ns1"},
        {"name": "ns1", "type": "A", "value": "127.0.0.1"},
        {"name": "example", "type": "NS", "value": "ns1.example"},
        {"name": "ns1.example", "type": "A", "value": "127.0.0.1"}]}
    child = dict(SIGNED_ZONE, ttl=60)
    dnssec = {"dnskey_ttl": 60, "propagation_delay": 30, "parent_ds_ttl": 60}
    dnssec.update(policy)
    return {"dns": {"listen": "127.0.0.1", "port": port, "rate_limit": 0,
                    "zones": [parent, child], "dnssec": dnssec}}


@pytest_twisted.ensureDeferred
async def test_ksk_rollover_under_a_served_parent_validates_throughout(tmp_path: Any) -> None:
    from twisted.internet import task
    running = start_dns(parent_and_child(free_tcp_udp_port()), str(tmp_path / "dcrouter"))
    service = running.service
    await service.ready
    clock = task.Clock()
    clock.advance(service.clock.seconds())
    service.clock = clock
    anchor = trust_anchor(running, "test")   # only the parent's DS: the chain runs through it

    async def validated(stage: str) -> list[int]:
        folder = str(tmp_path / f"unbound-{stage}")
        unbound = await threads.deferToThread(
            Unbound, folder, free_tcp_udp_port(), anchor,
            {"test": running.udp_port, "example.test": running.udp_port})
        try:
            for name, rdtype in (("www.example.test", "A"), ("example.test", "DNSKEY"),
                                 ("example.test", "DS"), ("nope.example.test", "A")):
                reply = await threads.deferToThread(unbound.ask, name, rdtype)
                assert reply.flags & dns.flags.AD, (stage, name, reply.to_text(), unbound.log())
        finally:
            await threads.deferToThread(unbound.stop)
        ds = [r for r in service.zone("test").nodes.get("example.test", {}).get(43, [])]
        return sorted(int(r.text.split()[0]) for r in ds)

    first = await validated("before")
    service.dnssec.request_roll("example.test", "ksk")
    await service.publish()
    status = service.dnssec.status("example.test", clock.seconds())
    assert len([k for k in status["keys"] if k["role"] == "ksk"]) == 2
    assert await validated("new-ksk-published") == first   # the parent still has the old DS
    for _ in range(6):  # Ipub, the DS switch in the parent, the old DS's TTL
        clock.advance(service._timer.getTime() - clock.seconds())
        await service.publish()
    status = service.dnssec.status("example.test", clock.seconds())
    ksks = [k for k in status["keys"] if k["role"] == "ksk"]
    assert len(ksks) == 1 and ksks[0]["tag"] not in first, status
    assert status["waiting_for_ds"] is None and status["ds"] == [ksks[0]["ds"]]
    assert await validated("after") == [ksks[0]["tag"]]
    await defer.maybeDeferred(service.stopService)


@pytest_twisted.ensureDeferred
async def test_ksk_rollover_waits_for_the_ds_at_the_parent_servers(tmp_path: Any) -> None:
    from twisted.internet import task
    nsd_port = free_tcp_udp_port()
    running = start_dns(signed_config(dnssec={"parent_servers": [f"127.0.0.1:{nsd_port}"],
                                              "propagation_delay": 60}),
                        str(tmp_path / "dcrouter"))
    service = running.service
    await service.ready
    clock = task.Clock()
    clock.advance(service.clock.seconds())
    service.clock = clock
    service.dnssec.request_roll("example.test", "ksk")
    await service.publish()
    clock.advance(3600 + 60 + 1)  # Ipub: the new KSK is the one the parent should have
    await service.publish()
    status = service.dnssec.status("example.test", clock.seconds())
    waiting = status["waiting_for_ds"]
    assert waiting is not None and len(status["ds"]) == 1
    # the parent's servers do not have it yet: still waiting after a check
    parent = ("$ORIGIN test.\n$TTL 300\n@ SOA ns1 hostmaster 1 3600 600 86400 300\n"
              "@ NS ns1\nns1 A 127.0.0.1\nexample NS ns1.example\nns1.example A 127.0.0.1\n")
    old_ds = [k["ds"] for k in status["keys"] if k["role"] == "ksk" and k["tag"] != waiting]
    folder = str(tmp_path / "nsd")

    def serve(ds_lines: list[str]) -> Any:
        text = parent + "".join(line + "\n" for line in ds_lines)
        return _parent_nsd(folder, nsd_port, text)
    server = await threads.deferToThread(serve, old_ds)
    try:
        clock.advance(600)
        await service.publish()
        assert service.dnssec.status("example.test", clock.seconds())["waiting_for_ds"] == waiting
        await threads.deferToThread(server.stop)
        server = await threads.deferToThread(serve, status["ds"])
        clock.advance(600)
        await service.publish()
        after = service.dnssec.status("example.test", clock.seconds())
        assert after["waiting_for_ds"] is None
        seen = next(k for k in after["keys"] if k["tag"] == waiting)
        assert seen["ds_seen"] == clock.seconds()
    finally:
        await threads.deferToThread(server.stop)
        await defer.maybeDeferred(service.stopService)


class _ParentNsd:
    """NSD serving one hand-written test. zone."""

    def __init__(self, folder: str, port: int, text: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "test.zone"), "w") as f:
            f.write(text)
        conf = os.path.join(folder, "nsd.conf")
        with open(conf, "w") as f:
            f.write(f"""server:
  ip-address: 127.0.0.1
  port: {port}
  username: ""
  chroot: ""
  zonesdir: "{folder}"
  pidfile: "{folder}/nsd.pid"
  zonelistfile: "{folder}/zone.list"
  xfrdfile: "{folder}/xfrd.state"
  xfrdir: "{folder}"
  database: ""
  server-count: 1
  logfile: "{folder}/nsd.log"
remote-control:
  control-enable: no
zone:
  name: "test"
  zonefile: "test.zone"
""")
        self.proc = subprocess.Popen([require("nsd"), "-d", "-c", conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        query = dns.message.make_query("test.", "SOA")
        for _ in range(200):
            try:
                dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
                return
            except Exception:
                continue
        raise AssertionError("nsd did not start")

    def stop(self) -> None:
        """Terminate by PID."""
        self.proc.terminate()
        self.proc.wait(10)


def _parent_nsd(folder: str, port: int, text: str) -> _ParentNsd:
    return _ParentNsd(folder, port, text)
