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
