"""dcrouter and NSD 4.6 serving the same zones (tests/dns/richzones.py), answers compared.

The named tests pin the differences issue 13 found (referral glue and TC,
escaped dots, DS at a served child's apex, CNAMEs across zones and into
delegations, QCLASS ANY); the differential test sends a few thousand
generated queries to both servers and allows only the normalisations listed
in tests/dns/differential.py (and docs/dns.md).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
import pytest_twisted
from twisted.internet import defer, threads

from tests.dns import differential
from tests.dns.conftest import Running, start_dns
from tests.dns.nsd import Nsd
from tests.dns.richzones import ZONES, zone_set
from tests.support.net import free_tcp_udp_port


@pytest.fixture(scope="module")
def nsd(tmp_path_factory: Any) -> Iterator[Nsd]:
    """NSD serving the rich zone set (module-wide: it only reads)."""
    server = Nsd(str(tmp_path_factory.mktemp("nsd")), zone_set())
    yield server
    server.stop()


@pytest_twisted.async_yield_fixture
async def ours(tmp_path: Any) -> Any:
    """dcrouter's DNS service with the same zones."""
    running = start_dns({"dns": {"listen": "127.0.0.1", "port": free_tcp_udp_port(),
                                 "rate_limit": 0, "zones": ZONES}}, str(tmp_path))
    await running.service.ready
    for zone in zone_set():  # the same data and serials as NSD's zone files
        served = running.service.zone(zone.origin)
        assert served is not None and served.serial == zone.serial
        assert served.content.fingerprint() == zone.content.fingerprint()
    yield running
    await defer.maybeDeferred(running.service.stopService)


def both(ours: Running, nsd: Nsd, name: str, rdtype: str, rdclass: str = "IN",
         edns: int = -1, payload: int = 1232, tcp: bool = False) -> defer.Deferred:
    """The same query to both servers (in a thread): (dcrouter message, NSD message)."""
    def run() -> tuple[dns.message.Message, dns.message.Message]:
        query = dns.message.make_query(dns.name.from_text(name), rdtype, rdclass,
                                       use_edns=edns if edns >= 0 else False, payload=payload)
        wire = query.to_wire()
        port = ours.tcp_port if tcp else ours.udp_port
        mine = differential.exchange(port, wire, tcp)
        theirs = differential.exchange(nsd.port, wire, tcp)
        assert mine is not None and theirs is not None
        return (dns.message.from_wire(mine, ignore_trailing=True),
                dns.message.from_wire(theirs, ignore_trailing=True))
    return threads.deferToThread(run)


def names(msg: dns.message.Message, section: str, rdtype: str) -> list[str]:
    """Sorted 'owner rdata' strings of one type in one section."""
    t = dns.rdatatype.from_text(rdtype)
    return sorted(f"{rrset.name.to_text().lower()} {rd.to_text()}"
                  for rrset in getattr(msg, section) if rrset.rdtype == t for rd in rrset)


@pytest_twisted.ensureDeferred
async def test_item7_referral_over_512_keeps_in_domain_glue_or_sets_tc(ours: Running, nsd: Nsd
                                                                        ) -> None:
    # mid: two in-domain servers (glue required) and eight in-zone ones; all of it is over 512
    mine, theirs = await both(ours, nsd, "www.mid.example.test", "A")
    glue = ["a.mid.example.test. 192.0.2.41", "b.mid.example.test. 192.0.2.42"]
    assert set(glue) <= set(names(mine, "additional", "A"))
    assert not mine.flags & dns.flags.TC and not mine.flags & dns.flags.AA
    assert len(mine.to_wire()) <= 512
    assert names(mine, "additional", "A") == names(theirs, "additional", "A")
    assert names(mine, "additional", "AAAA") == names(theirs, "additional", "AAAA")
    # big: 13 in-domain servers with A and AAAA glue cannot all fit in 512 bytes: TC (RFC
    # 9471) with the glue that fits; NSD 4.6 sends the same records without TC
    mine, theirs = await both(ours, nsd, "www.big.example.test", "A")
    assert mine.flags & dns.flags.TC and not theirs.flags & dns.flags.TC
    assert len(names(mine, "authority", "NS")) == 13
    assert names(mine, "additional", "A") == names(theirs, "additional", "A")
    assert not names(theirs, "additional", "AAAA")  # what NSD leaves out, without TC
    # with EDNS, and over TCP, all of it: both servers agree
    for kw in ({"edns": 0, "payload": 1232}, {"tcp": True}):
        mine, theirs = await both(ours, nsd, "www.big.example.test", "A", **kw)
        assert not mine.flags & dns.flags.TC
        assert len(names(mine, "additional", "AAAA")) == 13
        assert names(mine, "additional", "AAAA") == names(theirs, "additional", "AAAA")


@pytest_twisted.ensureDeferred
async def test_item8_escaped_dot_in_a_label_is_nxdomain_or_wildcard(ours: Running, nsd: Nsd
                                                                     ) -> None:
    mine, theirs = await both(ours, nsd, r"a\.b.example.test", "A")
    for msg in (mine, theirs):
        assert msg.rcode() == dns.rcode.NXDOMAIN and msg.flags & dns.flags.AA
        assert names(msg, "authority", "SOA")
    # a wildcard above it answers, with the label kept as sent (escaped dot, case)
    mine, theirs = await both(ours, nsd, r"X\.Y.wild.example.test", "TXT")
    assert mine.answer[0].name == dns.name.from_text(r"X\.Y.wild.example.test")
    assert mine.answer[0].name.labels[0] == b"X.Y"
    assert names(mine, "answer", "TXT") == names(theirs, "answer", "TXT")
    # a delegation above it refers; no zone for its parent: REFUSED (both)
    mine, theirs = await both(ours, nsd, r"a\.b.deleg.example.test", "A")
    assert names(mine, "authority", "NS") == names(theirs, "authority", "NS")
    assert not mine.flags & dns.flags.AA
    mine, theirs = await both(ours, nsd, r"www.example\.test", "A")
    assert mine.rcode() == theirs.rcode() == dns.rcode.REFUSED
    # and a real name spelled with dots in one label never matches it
    mine, theirs = await both(ours, nsd, r"ns1\.deleg.example.test", "A")
    assert mine.rcode() == theirs.rcode() == dns.rcode.NXDOMAIN


@pytest_twisted.ensureDeferred
async def test_item9_ds_at_a_served_child_is_answered_by_the_parent(ours: Running, nsd: Nsd
                                                                     ) -> None:
    for name, parent in (("sub.example.test", "example.test."),
                         ("orphan.other.test", "other.test.")):  # served, not delegated
        mine, theirs = await both(ours, nsd, name, "DS")
        for msg in (mine, theirs):
            assert msg.rcode() == dns.rcode.NOERROR and not msg.answer, name
            assert msg.flags & dns.flags.AA
            assert msg.authority[0].name.to_text() == parent
    # everything else at the child's apex comes from the child
    mine, _theirs = await both(ours, nsd, "sub.example.test", "SOA")
    assert mine.answer[0].name.to_text() == "sub.example.test."


@pytest_twisted.ensureDeferred
async def test_item10_cnames_into_other_zones_and_delegations(ours: Running, nsd: Nsd) -> None:
    mine, theirs = await both(ours, nsd, "cross.example.test", "A")
    assert names(mine, "answer", "A") == names(theirs, "answer", "A") == [
        "www.other.test. 198.51.100.10"]
    mine, theirs = await both(ours, nsd, "cross-chain.example.test", "A")  # there and back
    assert [r.name.to_text() for r in mine.answer] == [r.name.to_text() for r in theirs.answer]
    mine, theirs = await both(ours, nsd, "cross-nx.example.test", "A")
    assert mine.rcode() == theirs.rcode() == dns.rcode.NXDOMAIN
    assert names(mine, "authority", "SOA") == names(theirs, "authority", "SOA")
    assert names(mine, "authority", "SOA")[0].startswith("other.test.")
    mine, theirs = await both(ours, nsd, "into-child.example.test", "A")  # a served child
    assert names(mine, "answer", "A") == ["www.sub.example.test. 192.0.2.60"]
    for name in ("into-deleg.example.test", "cross-deleg.example.test"):
        mine, theirs = await both(ours, nsd, name, "A")
        for msg in (mine, theirs):
            assert msg.flags & dns.flags.AA and msg.rcode() == dns.rcode.NOERROR
            assert names(msg, "answer", "CNAME") and not names(msg, "answer", "A")
        assert names(mine, "authority", "NS") == names(theirs, "authority", "NS") != []
        assert names(mine, "additional", "A") == names(theirs, "additional", "A") != []


@pytest_twisted.ensureDeferred
async def test_item11_qclass_any_answers_without_aa(ours: Running, nsd: Nsd) -> None:
    for name, rdtype in (("www.example.test", "A"), ("nope.example.test", "A"),
                         ("www.example.test", "MX"), ("cross.example.test", "A")):
        mine, theirs = await both(ours, nsd, name, rdtype, "ANY")
        for msg in (mine, theirs):
            assert not msg.flags & dns.flags.AA, (name, rdtype)
        assert mine.rcode() == theirs.rcode()
        assert names(mine, "answer", rdtype) == names(theirs, "answer", rdtype)
        assert not mine.authority and not theirs.authority  # no SOA to cache either


@pytest_twisted.ensureDeferred
async def test_generated_queries_get_the_same_answers_as_from_nsd(ours: Running, nsd: Nsd
                                                                   ) -> None:
    zones = zone_set()
    probes = differential.generate(zones)
    started = time.monotonic()
    failures, comparator = await threads.deferToThread(
        differential.run, probes, (ours.udp_port, ours.tcp_port), nsd.port, zones)
    elapsed = time.monotonic() - started
    assert not failures, differential.summary(failures)
    print(f"{len(probes)} queries in {elapsed:.1f}s, normalisations: {dict(comparator.applied)}")
    # the normalisations are the documented ones, and each was needed at least once
    assert set(comparator.applied) == set(differential.NORMALISATIONS)
    stats = ours.service.get_stats()
    assert stats["internal_errors"] == 0
