"""Authoritative answers over real UDP/TCP sockets, checked with dnspython and dig."""

from __future__ import annotations

import subprocess
from typing import Any

import dns.flags
import dns.rcode
import dns.rdatatype
import pytest_twisted
from twisted.internet import threads

from tests.dns.conftest import ask


def rrset(response: Any, rdtype: str, section: str = "answer") -> list[str]:
    out = []
    for rr in getattr(response, section):
        if rr.rdtype == dns.rdatatype.from_text(rdtype):
            out.extend(sorted(r.to_text() for r in rr))
    return out


@pytest_twisted.ensureDeferred
async def test_every_record_type_over_udp_and_tcp(server: Any) -> None:
    cases = [
        ("www.example.test", "A", ["192.0.2.10"]),
        ("www.example.test", "AAAA", ["2001:db8::10"]),
        ("alias.example.test", "CNAME", ["www.example.test."]),
        ("example.test", "MX", ["10 mx1.example.test.", "20 mx2.example.test."]),
        ("example.test", "TXT", ['"v=spf1 ip4:192.0.2.0/24 -all"']),
        ("multi.example.test", "TXT", ['"first string" "second \\"quoted\\""']),
        ("example.test", "NS", ["ns1.example.test."]),
        ("_sip._tcp.example.test", "SRV", ["10 60 5060 sip.example.test."]),
        ("example.test", "CAA", ['0 issue "ca.example.test"']),
        ("1.2.0.192.in-addr.example.test", "PTR", ["www.example.test."]),
    ]
    for tcp in (False, True):
        port = server.tcp_port if tcp else server.udp_port
        for name, rdtype, expected in cases:
            response = await ask(port, name, rdtype, tcp=tcp)
            assert response.rcode() == dns.rcode.NOERROR, (name, rdtype)
            assert response.flags & dns.flags.AA
            assert not response.flags & dns.flags.RA
            assert rrset(response, rdtype) == expected, (name, rdtype, tcp)
    soa = await ask(server.udp_port, "example.test", "SOA")
    assert soa.answer[0][0].mname.to_text() == "ns1.example.test."
    assert soa.answer[0][0].serial == server.service.zone("example.test").serial


@pytest_twisted.ensureDeferred
async def test_long_txt_arrives_as_255_byte_strings(server: Any) -> None:
    response = await ask(server.udp_port, "long.example.test", "TXT", use_edns=0, payload=1232)
    strings = response.answer[0][0].strings
    assert [len(s) for s in strings] == [255, 255, 90]
    assert b"".join(strings) == b"x" * 600


@pytest_twisted.ensureDeferred
async def test_nxdomain_and_nodata_carry_the_soa(server: Any) -> None:
    nx = await ask(server.udp_port, "missing.example.test", "A")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nx.flags & dns.flags.AA and not nx.answer
    assert rrset(nx, "SOA", "authority")[0].startswith("ns1.example.test. hostmaster")
    assert nx.authority[0].ttl == 300
    nodata = await ask(server.udp_port, "www.example.test", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert rrset(nodata, "SOA", "authority")
    ent = await ask(server.udp_port, "sub.example.test", "A")  # empty non-terminal
    assert ent.rcode() == dns.rcode.NOERROR and not ent.answer
    below = await ask(server.udp_port, "x.deep.ent.sub.example.test", "A")
    assert below.rcode() == dns.rcode.NXDOMAIN


@pytest_twisted.ensureDeferred
async def test_out_of_zone_is_refused_and_recursion_is_never_offered(server: Any) -> None:
    for name in ("www.example.org", "test", "."):
        response = await ask(server.udp_port, name, "A")
        assert response.rcode() == dns.rcode.REFUSED, name
        assert not response.answer
        assert not response.flags & dns.flags.AA
        assert not response.flags & dns.flags.RA
    recursive = await ask(server.udp_port, "www.example.test", "A")  # RD set by default
    assert recursive.flags & dns.flags.RD and not recursive.flags & dns.flags.RA


@pytest_twisted.ensureDeferred
async def test_cname_chains_loops_and_dangling_targets(server: Any) -> None:
    chain = await ask(server.udp_port, "chain.example.test", "A")
    assert [rr.to_text().split()[0] for rr in chain.answer] == [
        "chain.example.test.", "alias.example.test.", "www.example.test."]
    assert rrset(chain, "A") == ["192.0.2.10"]
    outside = await ask(server.udp_port, "outside.example.test", "A")
    assert rrset(outside, "CNAME") == ["www.elsewhere.invalid."]
    assert outside.rcode() == dns.rcode.NOERROR and len(outside.answer) == 1
    loop = await ask(server.udp_port, "loop1.example.test", "A")
    assert loop.rcode() == dns.rcode.NOERROR and len(loop.answer) == 2
    dangling = await ask(server.udp_port, "dangling.example.test", "A")
    assert rrset(dangling, "CNAME") == ["nothing.example.test."]
    assert dangling.rcode() == dns.rcode.NXDOMAIN  # RFC 6604: the last name's rcode
    assert rrset(dangling, "SOA", "authority")


@pytest_twisted.ensureDeferred
async def test_wildcards_and_case_insensitivity(server: Any) -> None:
    wild = await ask(server.udp_port, "Anything.Wild.EXAMPLE.test", "A")
    assert wild.answer[0].name.to_text() == "Anything.Wild.EXAMPLE.test."  # case echoed
    assert rrset(wild, "A") == ["192.0.2.99"]
    deeper = await ask(server.udp_port, "a.b.wild.example.test", "TXT")
    assert rrset(deeper, "TXT") == ['"wildcard"']
    apex_of_wild = await ask(server.udp_port, "wild.example.test", "A")  # an ENT, not wildcard
    assert apex_of_wild.rcode() == dns.rcode.NOERROR and not apex_of_wild.answer
    upper = await ask(server.udp_port, "uPPER.example.TEST", "A")
    assert rrset(upper, "A") == ["192.0.2.88"]
    assert upper.question[0].name.to_text() == "uPPER.example.TEST."


@pytest_twisted.ensureDeferred
async def test_mx_answer_has_addresses_in_additional_and_any(server: Any) -> None:
    mx = await ask(server.udp_port, "example.test", "MX")
    assert rrset(mx, "A", "additional") == ["192.0.2.25"]
    # RFC 8482 (as NSD): ANY gets one RRset, the first at the name, over UDP and TCP alike
    for tcp in (False, True):
        every = await ask(server.tcp_port if tcp else server.udp_port, "www.example.test",
                          "ANY", tcp=tcp)
        assert [rr.rdtype for rr in every.answer] == [dns.rdatatype.A]
        apex = await ask(server.tcp_port if tcp else server.udp_port, "example.test", "ANY",
                         tcp=tcp)
        assert [rr.rdtype for rr in apex.answer] == [dns.rdatatype.SOA]


@pytest_twisted.ensureDeferred
async def test_dig_sees_the_same_answers(server: Any) -> None:
    def dig(*args: str) -> str:
        return subprocess.run(["dig", "@127.0.0.1", "-p", str(server.udp_port), "+norec",
                               "+time=2", "+tries=1", *args],
                              capture_output=True, text=True, timeout=10).stdout
    out = await threads.deferToThread(dig, "example.test", "MX")
    assert "status: NOERROR" in out and "flags: qr aa;" in out
    assert "10 mx1.example.test." in out
    out = await threads.deferToThread(dig, "+short", "www.example.test", "AAAA")
    assert out.strip() == "2001:db8::10"
    out = await threads.deferToThread(dig, "+tcp", "+short", "_sip._tcp.example.test", "SRV")
    assert out.strip() == "10 60 5060 sip.example.test."
    out = await threads.deferToThread(dig, "nothing.example.test", "A")
    assert "status: NXDOMAIN" in out and "SOA" in out
    out = await threads.deferToThread(dig, "example.com", "A")
    assert "status: REFUSED" in out
    out = await threads.deferToThread(dig, "+short", "example.test", "CAA")
    assert out.strip() == '0 issue "ca.example.test"'


@pytest_twisted.ensureDeferred
async def test_ns_below_the_apex_delegates(server: Any) -> None:
    for name, rdtype in (("www.deleg.example.test", "A"), ("deleg.example.test", "NS"),
                         ("ns1.deleg.example.test", "A")):
        referral = await ask(server.udp_port, name, rdtype)
        assert referral.rcode() == dns.rcode.NOERROR, name
        assert not referral.flags & dns.flags.AA and not referral.answer
        assert rrset(referral, "NS", "authority") == ["ns1.deleg.example.test."]
        assert rrset(referral, "A", "additional") == ["192.0.2.5"]  # glue
    ds = await ask(server.udp_port, "deleg.example.test", "DS")  # the parent's side of the cut
    assert ds.flags & dns.flags.AA and not ds.answer and rrset(ds, "SOA", "authority")
    chained = await ask(server.udp_port, "into-deleg.example.test", "A")
    assert rrset(chained, "CNAME") == ["www.deleg.example.test."]
    assert not rrset(chained, "A")
