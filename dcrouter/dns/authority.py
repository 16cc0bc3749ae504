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
  dcrouter serves them, in the additional section;
* NS records below the apex delegate: a name at or below such a cut gets a
  referral (no AA, the NS records in the authority section, glue addresses
  in the additional section), except DS at the cut itself, which the parent
  answers.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from twisted.names import dns

from dcrouter.dns.zone import Zone, ZoneRecord, ZoneSet, in_zone

#: CNAME links followed at most.
MAX_CHAIN = 12
DS = 43


#: A record in a response: the owner name as it goes on the wire, and the record.
Entry = tuple[bytes, ZoneRecord]


@dataclasses.dataclass
class Answer:
    """The sections and flags of one response, before encoding."""

    rcode: int
    authoritative: bool
    answers: list[Entry] = dataclasses.field(default_factory=list)
    authority: list[Entry] = dataclasses.field(default_factory=list)
    additional: list[Entry] = dataclasses.field(default_factory=list)


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
        answers: list[Entry] = []
        final: list[ZoneRecord] = []
        seen: set[str] = set()
        current, current_owner = name, owner
        for _ in range(MAX_CHAIN):
            seen.add(current)
            if zone.cuts:
                cut = _cut_above(zone, current, qtype)
                if cut is not None:
                    if answers:  # a CNAME led into delegated space: the chain ends here
                        return Answer(dns.OK, True, answers)
                    return self._referral(zone, cut)
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
            answers.append((current_owner, link))
            target = link.target()
            if target is None or target in seen or not in_zone(target, zone.origin):
                return Answer(dns.OK, True, answers)
            current, current_owner = target, target.encode("ascii")
        else:
            return Answer(dns.OK, True, answers)
        answers.extend((current_owner, r) for r in final)
        return Answer(dns.OK, True, answers, [], self._additional(final))

    def _referral(self, zone: Zone, cut: str) -> Answer:
        ns = zone.nodes[cut][dns.NS]
        owner = cut.encode("ascii")
        return Answer(dns.OK, False, [], [(owner, r) for r in ns], self._additional(ns))

    def _negative(self, zone: Zone, rcode: int, answers: list[Entry]) -> Answer:
        soa = zone.negative_soa
        return Answer(rcode, True, answers, [(soa.owner.encode("ascii"), soa)])

    def _additional(self, records: list[ZoneRecord]) -> list[Entry]:
        out: list[Entry] = []
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
                out.extend((r.owner.encode("ascii"), r) for r in node.get(rtype, ()))
        return out


def _cut_above(zone: Zone, name: str, qtype: int) -> Optional[str]:
    """The highest delegation point at or above ``name`` (below the apex), or None."""
    labels = name.split(".")
    depth = len(zone.origin.split(".")) if zone.origin else 0
    for i in range(len(labels) - depth - 1, -1, -1):
        candidate = ".".join(labels[i:])
        if candidate in zone.cuts:
            if i == 0 and qtype == DS:
                return None
            return candidate
    return None


def _wildcard(zone: Zone, name: str) -> Optional[dict[int, list[ZoneRecord]]]:
    """The ``*.<closest encloser>`` node that synthesises ``name``, or None."""
    labels = name.split(".")
    for i in range(1, len(labels) + 1):
        ancestor = ".".join(labels[i:])
        if ancestor in zone.names:
            return zone.nodes.get("*." + ancestor if ancestor else "*")
    return None
