"""Authoritative answers from a :class:`~dcrouter.dns.zone.ZoneSet`.

The rules (RFC 1034 section 4.3.2, RFC 2308, RFC 4592, RFC 6604):

* a name outside every zone gets REFUSED: dcrouter is not a resolver;
* inside a zone answers carry the AA flag; a name that does not exist gets
  NXDOMAIN, a name that exists without the asked type (including empty
  non-terminals) gets NOERROR with no answer (NODATA); both carry the zone's
  SOA in the authority section with TTL min(SOA TTL, minimum);
* CNAMEs are followed inside the zone (loops and long chains stop); the
  rcode reflects the last name of the chain;
* ``*.<closest encloser>`` answers for names that do not exist below it,
  with the query name as owner;
* MX, NS and SRV answers get the A/AAAA records of their targets, when
  dcrouter serves them, in the additional section.

Delegation (NS records below the apex) is not interpreted: such records are
answered as data.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from twisted.names import dns

from dcrouter.dns.zone import Zone, ZoneRecord, ZoneSet, in_zone

#: CNAME links followed at most.
MAX_CHAIN = 12


@dataclasses.dataclass
class Answer:
    """The sections and flags of one response, before encoding."""

    rcode: int
    authoritative: bool
    answers: list[dns.RRHeader] = dataclasses.field(default_factory=list)
    authority: list[dns.RRHeader] = dataclasses.field(default_factory=list)
    additional: list[dns.RRHeader] = dataclasses.field(default_factory=list)


REFUSED = Answer(dns.EREFUSED, False)


class Authority:
    """Answers questions from one immutable zone set (swap the authority, not its zones)."""

    def __init__(self, zones: ZoneSet) -> None:
        self.zones = zones

    def lookup(self, name: str, qtype: int, owner: Optional[bytes] = None) -> Answer:
        """Answer ``name`` (lower-case, no trailing dot) for ``qtype``.

        ``owner`` is the name as the client spelled it, used as the owner of
        records at the query name (case preserved, and it compresses against
        the question).
        """
        zone = self.zones.find(name)
        if zone is None:
            return Answer(dns.EREFUSED, False)
        if owner is None:
            owner = name.encode("latin-1")
        answers: list[dns.RRHeader] = []
        final: list[ZoneRecord] = []
        seen: set[str] = set()
        current, current_owner = name, owner
        for _ in range(MAX_CHAIN):
            seen.add(current)
            node = zone.nodes.get(current)
            if node is None:
                if current in zone.names:
                    return self._negative(zone, dns.OK, answers)
                node = _wildcard(zone, current)
                if node is None:
                    return self._negative(zone, dns.ENAME, answers)
            if qtype == dns.ALL_RECORDS:
                final = [r for rrset in node.values() for r in rrset]
                break
            rrset = node.get(qtype)
            if rrset:
                final = rrset
                break
            cnames = node.get(dns.CNAME)
            if not cnames:
                return self._negative(zone, dns.OK, answers)
            link = cnames[0]
            answers.append(link.header(current_owner))
            target = link.target()
            if target is None or target in seen or not in_zone(target, zone.origin):
                return Answer(dns.OK, True, answers)
            current, current_owner = target, target.encode("ascii")
        else:
            return Answer(dns.OK, True, answers)
        answers.extend(r.header(current_owner) for r in final)
        return Answer(dns.OK, True, answers, [], self._additional(final))

    def _negative(self, zone: Zone, rcode: int, answers: list[dns.RRHeader]) -> Answer:
        return Answer(rcode, True, answers, [zone.negative_soa.header()])

    def _additional(self, records: list[ZoneRecord]) -> list[dns.RRHeader]:
        out: list[dns.RRHeader] = []
        done: set[str] = set()
        for rec in records:
            if rec.rtype not in (dns.MX, dns.NS, dns.SRV):
                continue
            target = rec.target()
            if not target or target in done:
                continue
            done.add(target)
            zone = self.zones.find(target)
            node = zone.nodes.get(target) if zone is not None else None
            if node is None:
                continue
            for rtype in (dns.A, dns.AAAA):
                out.extend(r.header() for r in node.get(rtype, ()))
        return out


def _wildcard(zone: Zone, name: str) -> Optional[dict[int, list[ZoneRecord]]]:
    """The ``*.<closest encloser>`` node that synthesises ``name``, or None."""
    labels = name.split(".")
    for i in range(1, len(labels) + 1):
        ancestor = ".".join(labels[i:])
        if ancestor in zone.names:
            return zone.nodes.get("*." + ancestor if ancestor else "*")
    return None
