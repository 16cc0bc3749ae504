"""Signed zones: dcrouter signing online against NSD 4.6 serving the same zones signed by
ldns-signzone (ldnsutils) with the same keys.

The rich zone set (tests/dns/richzones.py) with ``dnssec = true`` on every zone;
dcrouter creates the keys, ldns-signzone signs its unsigned data with them
independently, NSD serves the result.  The same generated queries (most with
DO) go to both servers: answers must agree record for record, signatures
compared by what they cover and with which key (their times and bytes differ),
and every signature dcrouter sends must validate.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Iterator

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from dcrouter.dns.service import DnsService
from dcrouter.dns.zone import DNSKEY, ZoneSet
from dcrouter.service import Extensions, RouterContext
from tests.dns import differential
from tests.dns.conftest import Running, start_dns
from tests.dns.nsd import Nsd
from tests.dns.richzones import ZONES
from tests.dns.signed_peer import ldns_sign
from tests.support.net import free_tcp_udp_port
from tests.support.router import options_from

SIGNED = [dict(z, dnssec=True) for z in ZONES]


def signed_config(port: int) -> dict[str, Any]:
    """The rich zones, all signed, on 127.0.0.1:port."""
    return {"dns": {"listen": "127.0.0.1", "port": port, "rate_limit": 0, "zones": SIGNED}}


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: Any) -> str:
    """A state_dir whose dnssec/ holds the keys both signers use."""
    return str(tmp_path_factory.mktemp("dnssec-state"))


@pytest.fixture(scope="module")
def signed_zones(keys_dir: str) -> ZoneSet:
    """The zones as dcrouter signs them (its keys created in ``keys_dir``)."""
    context = RouterContext(options_from(signed_config(free_tcp_udp_port()), keys_dir),
                            reactor, Extensions())
    return DnsService(context).zone_set


@pytest.fixture(scope="module")
def nsd(tmp_path_factory: Any, keys_dir: str, signed_zones: ZoneSet) -> Iterator[Nsd]:
    """NSD serving the zones signed by ldns-signzone with dcrouter's keys."""
    work = str(tmp_path_factory.mktemp("ldns"))
    texts = {z.origin: ldns_sign(z, keys_dir, work) for z in signed_zones}
    server = Nsd(str(tmp_path_factory.mktemp("nsd-signed")), signed_zones, texts)
    yield server
    server.stop()


@pytest_twisted.async_yield_fixture
async def ours(tmp_path: Any, keys_dir: str) -> Any:
    """dcrouter serving the same zones, with the same keys (a fresh serial file)."""
    shutil.copytree(os.path.join(keys_dir, "dnssec"), os.path.join(str(tmp_path), "dnssec"))
    running = start_dns(signed_config(free_tcp_udp_port()), str(tmp_path))
    await running.service.ready
    yield running
    await defer.maybeDeferred(running.service.stopService)


def dnskeys(zones: ZoneSet) -> dict[dns.name.Name, dns.rrset.RRset]:
    """Each zone's DNSKEY set, for validating signatures."""
    out = {}
    for zone in zones:
        name = dns.name.from_text(zone.origin + ".")
        rrset = dns.rrset.from_text_list(name, 300, "IN", "DNSKEY",
                                         [r.text for r in zone.nodes[zone.origin][DNSKEY]])
        out[name] = rrset
    return out


def both(ours: Running, nsd: Nsd, name: str, rdtype: str, dnssec: bool = True,
         payload: int = 1232, tcp: bool = False) -> defer.Deferred:
    """One query (EDNS, DO unless told) to both servers: (dcrouter's, NSD's) messages."""
    def run() -> tuple[dns.message.Message, dns.message.Message]:
        query = dns.message.make_query(name, rdtype, use_edns=0, payload=payload,
                                       want_dnssec=dnssec)
        wire = query.to_wire()
        mine = differential.exchange(ours.tcp_port if tcp else ours.udp_port, wire, tcp)
        theirs = differential.exchange(nsd.port, wire, tcp)
        assert mine is not None and theirs is not None
        return dns.message.from_wire(mine), dns.message.from_wire(theirs)
    return threads.deferToThread(run)


def types_in(msg: dns.message.Message, section: str) -> list[str]:
    """'owner TYPE' (RRSIGs as 'owner RRSIG(TYPE)') of a section, sorted."""
    out = []
    for rrset in getattr(msg, section):
        kind = dns.rdatatype.to_text(rrset.rdtype)
        if rrset.rdtype == dns.rdatatype.RRSIG:
            kind += f"({dns.rdatatype.to_text(rrset.covers)})"
        out.append(f"{rrset.name.to_text().lower()} {kind}")
    return sorted(out)


def without_apex_ns(msg: dns.message.Message) -> list[str]:
    """NSD's authority section without the apex NS set (and its signature) it adds to
    positive answers when there is room (the differential's ``nsd-apex-ns``)."""
    found = types_in(msg, "authority")
    if not msg.answer:
        return found
    apexes = {"example.test.", "other.test.", "sub.example.test.", "orphan.other.test."}
    return [t for t in found if not (t.split()[0] in apexes and t.split()[1] in (
        "NS", "RRSIG(NS)"))]


@pytest_twisted.ensureDeferred
async def test_nxdomain_nodata_wildcard_and_delegation_proofs_match_nsd(
        ours: Running, nsd: Nsd, signed_zones: ZoneSet) -> None:
    keys = dnskeys(signed_zones)
    cases = {
        ("nope.example.test.", "A"): dns.rcode.NXDOMAIN,           # name + wildcard cover
        ("www.example.test.", "MX"): dns.rcode.NOERROR,            # NODATA: the name's NSEC
        ("ent.sub2.example.test.", "A"): dns.rcode.NOERROR,        # empty non-terminal
        ("x.wild.example.test.", "A"): dns.rcode.NOERROR,          # wildcard + cover
        ("x.wild.example.test.", "AAAA"): dns.rcode.NOERROR,       # wildcard NODATA
        ("www.deleg.example.test.", "A"): dns.rcode.NOERROR,       # unsigned delegation
        ("www.sub.example.test.", "A"): dns.rcode.NOERROR,         # signed child
        ("sub.example.test.", "DS"): dns.rcode.NOERROR,            # the child's DS
        ("deleg.example.test.", "DS"): dns.rcode.NOERROR,          # no DS: the cut's NSEC
        ("example.test.", "DNSKEY"): dns.rcode.NOERROR,
        ("example.test.", "CDS"): dns.rcode.NOERROR,
        ("cross-nx.example.test.", "A"): dns.rcode.NXDOMAIN,       # CNAME into other.test
    }
    for (name, rdtype), rcode in cases.items():
        mine, theirs = await both(ours, nsd, name, rdtype)
        assert mine.rcode() == theirs.rcode() == rcode, (name, rdtype)
        assert types_in(mine, "answer") == types_in(theirs, "answer"), (name, rdtype)
        assert types_in(mine, "authority") == without_apex_ns(theirs), (name, rdtype)
        assert not differential.verify_signatures(mine.to_wire(), keys), (name, rdtype)
    # the NXDOMAIN proof: the NSEC covering the name and the one covering the wildcard
    mine, _theirs = await both(ours, nsd, "nope.example.test.", "A")
    nsecs = [r for r in mine.authority if r.rdtype == dns.rdatatype.NSEC]
    assert len(nsecs) == 2
    # without DO: no RRSIG, no NSEC (RFC 3225)
    mine, theirs = await both(ours, nsd, "nope.example.test.", "A", dnssec=False)
    assert types_in(mine, "authority") == types_in(theirs, "authority") == [
        "example.test. SOA"]
    mine, _theirs = await both(ours, nsd, "www.example.test.", "A", dnssec=False)
    assert [r.rdtype for r in mine.answer] == [dns.rdatatype.A]


@pytest_twisted.ensureDeferred
async def test_signed_answers_over_the_udp_limit_truncate(ours: Running, nsd: Nsd) -> None:
    # a signed 600-byte TXT does not fit 512 bytes: TC (both), the whole answer over TCP
    mine, theirs = await both(ours, nsd, "long.example.test.", "TXT", payload=512)
    assert mine.flags & dns.flags.TC and theirs.flags & dns.flags.TC
    mine, theirs = await both(ours, nsd, "long.example.test.", "TXT", payload=512, tcp=True)
    assert types_in(mine, "answer") == types_in(theirs, "answer") == [
        "long.example.test. RRSIG(TXT)", "long.example.test. TXT"]


@pytest_twisted.ensureDeferred
async def test_generated_queries_get_the_same_signed_answers_as_from_nsd(
        ours: Running, nsd: Nsd, signed_zones: ZoneSet) -> None:
    probes = differential.generate(signed_zones, seed=20261204, extra=1500, do_rate=0.8,
                                   core_do=True)
    started = time.monotonic()
    failures, comparator = await threads.deferToThread(
        differential.run, probes, (ours.udp_port, ours.tcp_port), nsd.port, signed_zones,
        64, dnskeys(signed_zones))
    elapsed = time.monotonic() - started
    assert not failures, differential.summary(failures)
    print(f"{len(probes)} queries in {elapsed:.1f}s, normalisations: {dict(comparator.applied)}")
    assert set(comparator.applied) <= set(differential.NORMALISATIONS)
    assert ours.service.get_stats()["internal_errors"] == 0
