"""One rich zone set served by dcrouter and NSD alike in the side-by-side tests.

* ``example.test``: every record type, wildcards (plain, CNAME, MX), an empty
  non-terminal, CNAME chains inside the zone, into the other served zones,
  into delegations, out of everything, loops and dangling ones; delegations:
  ``deleg`` (in-domain and out-of-zone name servers), ``sub`` (whose child
  zone is served too), ``big`` (13 in-domain name servers with A and AAAA
  glue: a referral larger than 512 bytes), ``mid`` (two in-domain name
  servers and many in-zone, non-glue ones: the glue fits 512 bytes, the rest
  does not), ``sib`` (name servers under another delegation: sibling glue).
* ``sub.example.test``: the child of the ``sub`` delegation.
* ``other.test``: a second zone CNAMEs point into, with its own delegation.
* ``orphan.other.test``: served, but not delegated from ``other.test``.
"""

from __future__ import annotations

from typing import Any

from dcrouter.config import parse_config
from dcrouter.dns.zone import Zone, ZoneSet, build_zone_content

def _r(name: str, rtype: str, value: str, ttl: int | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": name, "type": rtype, "value": value}
    if ttl is not None:
        rec["ttl"] = ttl
    return rec


EXAMPLE: dict[str, Any] = {"origin": "example.test", "ttl": 300, "records": [
    _r("@", "SOA", "ns1 hostmaster 1 3600 600 604800 120"),
    _r("@", "NS", "ns1"),
    _r("@", "NS", "ns.other.test."),
    _r("@", "A", "192.0.2.1"),
    _r("@", "MX", "10 mx1"),
    _r("@", "MX", "20 www.other.test."),
    _r("@", "MX", "30 mx.elsewhere.invalid."),
    _r("@", "TXT", "v=spf1 -all"),
    _r("@", "CAA", '0 issue "ca.example.test"'),
    _r("ns1", "A", "192.0.2.53"),
    _r("ns1", "AAAA", "2001:db8::53"),
    _r("mx1", "A", "192.0.2.25"),
    _r("www", "A", "192.0.2.10"),
    _r("www", "A", "192.0.2.11"),
    _r("www", "AAAA", "2001:db8::10"),
    _r("www", "TXT", '"one" "two"', ttl=60),
    _r("long", "TXT", "y" * 600),
    _r("_sip._tcp", "SRV", "10 60 5060 www"),
    _r("_sip._udp", "SRV", "10 60 5060 www.other.test."),
    _r("1.2.0.192.in-addr", "PTR", "www"),
    _r("*.wild", "A", "192.0.2.99"),
    _r("*.wild", "TXT", "wildcard"),
    _r("*.wild", "MX", "5 mx1"),
    _r("*.cw", "CNAME", "www"),
    _r("deep.ent.sub2", "A", "192.0.2.77"),
    _r("alias", "CNAME", "www"),
    _r("chain", "CNAME", "alias"),
    _r("chain3", "CNAME", "chain"),
    _r("cross", "CNAME", "www.other.test."),
    _r("cross-chain", "CNAME", "back.other.test."),
    _r("cross-nx", "CNAME", "nope.other.test."),
    _r("cross-deleg", "CNAME", "www.d.other.test."),
    _r("into-deleg", "CNAME", "www.deleg"),
    _r("into-child", "CNAME", "www.sub"),
    _r("into-wild", "CNAME", "x.wild"),
    _r("into-orphan", "CNAME", "www.orphan.other.test."),
    _r("wmx", "MX", "10 host.wild"),
    _r("gluemx", "MX", "10 ns1.deleg"),
    _r("childmx", "MX", "10 www.sub"),
    *[_r(f"c{i}", "CNAME", f"c{i + 1}") for i in range(20)],
    _r("c20", "A", "192.0.2.20"),
    _r("outside", "CNAME", "www.elsewhere.invalid."),
    _r("loop1", "CNAME", "loop2"),
    _r("loop2", "CNAME", "loop1"),
    _r("dangling", "CNAME", "nothing"),
    # delegations
    _r("deleg", "NS", "ns1.deleg"),
    _r("deleg", "NS", "ns.other.test."),
    _r("ns1.deleg", "A", "192.0.2.5"),
    _r("ns1.deleg", "AAAA", "2001:db8::5"),
    _r("sub", "NS", "ns1.sub"),
    _r("ns1.sub", "A", "192.0.2.6"),
    *[_r("big", "NS", f"ns{i:02d}.big") for i in range(13)],
    *[_r(f"ns{i:02d}.big", "A", f"192.0.2.{100 + i}") for i in range(13)],
    *[_r(f"ns{i:02d}.big", "AAAA", f"2001:db8::{100 + i:x}") for i in range(13)],
    _r("mid", "NS", "a.mid"),
    _r("mid", "NS", "b.mid"),
    *[_r("mid", "NS", f"nsmid{i}") for i in range(8)],
    _r("a.mid", "A", "192.0.2.41"),
    _r("b.mid", "A", "192.0.2.42"),
    *[_r(f"nsmid{i}", "A", f"192.0.2.{50 + i}") for i in range(8)],
    *[_r(f"nsmid{i}", "AAAA", f"2001:db8::5{i}") for i in range(8)],
    _r("sib", "NS", "ns1.deleg"),
]}

SUB: dict[str, Any] = {"origin": "sub.example.test", "ttl": 300, "records": [
    _r("@", "SOA", "ns1 hostmaster 1 3600 600 604800 60"),
    _r("@", "NS", "ns1"),
    _r("ns1", "A", "192.0.2.6"),
    _r("www", "A", "192.0.2.60"),
    _r("@", "MX", "10 www"),
]}

OTHER: dict[str, Any] = {"origin": "other.test", "ttl": 600, "records": [
    _r("@", "SOA", "ns hostmaster 1 3600 600 604800 300"),
    _r("@", "NS", "ns"),
    _r("ns", "A", "198.51.100.53"),
    _r("www", "A", "198.51.100.10"),
    _r("www", "AAAA", "2001:db8:1::10"),
    _r("alias", "CNAME", "www"),
    _r("back", "CNAME", "www.example.test."),
    _r("d", "NS", "ns.d"),
    _r("ns.d", "A", "198.51.100.7"),
]}

#: Served, but other.test does not delegate it (DS at its apex: the parent says NXDOMAIN).
ORPHAN: dict[str, Any] = {"origin": "orphan.other.test", "ttl": 300, "records": [
    _r("@", "SOA", "ns1 hostmaster 7 3600 600 604800 300"),
    _r("@", "NS", "ns.other.test."),
    _r("www", "A", "203.0.113.1"),
]}

ZONES = [EXAMPLE, SUB, OTHER, ORPHAN]


def zone_set(zones: list[dict[str, Any]] = ZONES) -> ZoneSet:
    """The zones as dcrouter indexes them (also what NSD's zone files are written from)."""
    options = parse_config({"dns": {"zones": zones}})
    assert options.dns is not None
    contents = [build_zone_content(z, f"dns.zones[{i}]") for i, z in enumerate(options.dns.zones)]
    return ZoneSet(Zone(c, c.soa.serial or 1) for c in contents)
