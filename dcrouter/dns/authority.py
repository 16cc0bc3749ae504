"""Authoritative answers from a :class:`~dcrouter.dns.zone.ZoneSet`.

The rules (RFC 1034 section 4.3.2, RFC 2308, RFC 4592, RFC 6604, RFC 8482,
RFC 9471), checked against NSD serving the same zones (tests/dns/test_nsd_diff.py):

* a name outside every zone gets REFUSED: dcrouter is not a resolver;
* inside a zone answers carry the AA flag; a name that does not exist gets
  NXDOMAIN, a name that exists without the asked type (including empty
  non-terminals) gets NOERROR with no answer (NODATA); both carry the zone's
  SOA in the authority section with TTL min(SOA TTL, minimum);
* CNAMEs are followed, into any zone served here (step 3a restarts the
  search at step 2); loops and long chains stop; the rcode reflects the last
  name of the chain and the SOA is that name's zone's; a chain that runs into
  a delegation ends with the referral (NS in the authority section, glue);
* ``*.<closest encloser>`` answers for names that do not exist below it,
  with the query name as owner;
* QTYPE ANY gets one RRset, the first at the name (RFC 8482, as NSD does);
* MX, NS and SRV answers get the A/AAAA records of their targets in the
  additional section when the same zone holds them;
* NS records below the apex delegate: a name at or below such a cut gets a
  referral (no AA, the NS records in the authority section, glue addresses
  in the additional section: in-domain glue first, marked as required so the
  encoder sets TC when it does not fit, RFC 9471), except DS at the cut
  itself, which the parent answers - also when the child zone is served here
  (RFC 4035 section 3.1.4.1).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from twisted.names import dns

from dcrouter.dns.zone import Zone, ZoneRecord, ZoneSet, in_zone

#: CNAME links followed at most (loops stop at the first repeated name; NSD has no
#: fixed limit, so this only differs for chains no real zone has).
MAX_CHAIN = 32
DS = 43


#: A record in a response: the owner name as it goes on the wire, and the record.
Entry = tuple[bytes, ZoneRecord]


@dataclasses.dataclass
class Answer:
    """The sections and flags of one response, before encoding.

    The first ``required`` additional entries are in-domain glue of a
    referral: when they do not all fit, the response gets TC (RFC 9471).
    """

    rcode: int
    authoritative: bool
    answers: list[Entry] = dataclasses.field(default_factory=list)
    authority: list[Entry] = dataclasses.field(default_factory=list)
    additional: list[Entry] = dataclasses.field(default_factory=list)
    required: int = 0


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
        zone = self._zone_for(name, qtype)
        if zone is None:
            return Answer(dns.EREFUSED, False)
        if qtype == DS and zone.origin != name and name not in zone.names and \
                self.zones.zones.get(name) is not None:
            # DS at the apex of a served zone its (served) parent does not delegate: the
            # name exists here, so NODATA from the parent (as NSD), not a NXDOMAIN that
            # would deny the whole child zone (RFC 8020)
            return self._negative(zone, dns.OK, [])
        if owner is None:
            owner = name.encode("latin-1")
        answers: list[Entry] = []
        seen: set[str] = set()
        current, current_owner = name, owner
        for _ in range(MAX_CHAIN):
            seen.add(current)
            if zone.cuts:
                cut = _cut_above(zone, current, qtype)
                if cut is not None:
                    return self._referral(zone, cut, answers)
            node = zone.nodes.get(current)
            if node is None:
                if current in zone.names:
                    return self._negative(zone, dns.OK, answers)
                node = _wildcard(zone, current)
                if node is None:
                    return self._negative(zone, dns.ENAME, answers)
            if qtype == dns.ALL_RECORDS:  # RFC 8482: one RRset, the first at the name
                final = next(iter(node.values()))
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
            if target is None or target in seen:
                return Answer(dns.OK, True, answers)
            # RFC 1034 4.3.2 step 3a: start over with the target, in whichever zone holds it
            next_zone = self._zone_for(target, qtype)
            if next_zone is None:
                return Answer(dns.OK, True, answers)
            zone, current, current_owner = next_zone, target, target.encode("ascii")
        else:
            return Answer(dns.OK, True, answers)
        answers.extend((current_owner, r) for r in final)
        return Answer(dns.OK, True, answers, [], self._additional(zone, final))

    def _zone_for(self, name: str, qtype: int) -> Optional[Zone]:
        """The zone that answers ``name``: the closest one, except for DS at a served
        zone's apex, which its parent zone answers when served too (RFC 4035 3.1.4.1)."""
        zone = self.zones.find(name)
        if zone is not None and qtype == DS and name == zone.origin and name:
            parent = self.zones.find(name.partition(".")[2])
            if parent is not None:
                return parent
        return zone

    def _referral(self, zone: Zone, cut: str, answers: list[Entry]) -> Answer:
        """NS of ``cut`` in the authority section, glue in the additional; AA only when a
        CNAME of ours led here (the answer section then holds it)."""
        ns = zone.nodes[cut][dns.NS]
        owner = cut.encode("ascii")
        inside: list[str] = []
        outside: list[str] = []
        for rec in ns:
            target = rec.target()
            if target and target not in inside and target not in outside:
                (inside if in_zone(target, cut) else outside).append(target)
        glue = _addresses(zone, inside, glue=True)
        return Answer(dns.OK, bool(answers), answers, [(owner, r) for r in ns],
                      glue + _addresses(zone, outside, glue=True), required=len(glue))

    def _negative(self, zone: Zone, rcode: int, answers: list[Entry]) -> Answer:
        soa = zone.negative_soa
        return Answer(rcode, True, answers, [(soa.owner.encode("ascii"), soa)])

    @staticmethod
    def _additional(zone: Zone, records: list[ZoneRecord]) -> list[Entry]:
        """A/AAAA of the MX, NS and SRV targets that ``zone`` holds (as NSD: same zone,
        wildcards apply, nothing from below a delegation)."""
        targets: list[str] = []
        for rec in records:
            if rec.rtype in (dns.MX, dns.NS, dns.SRV):
                target = rec.target()
                if target and target not in targets:
                    targets.append(target)
        return _addresses(zone, targets, glue=False) if targets else []


def _addresses(zone: Zone, names: list[str], glue: bool) -> list[Entry]:
    """The A records of ``names`` in ``zone``, then their AAAA records (NSD's order).

    ``glue``: for a referral, the records as they are (glue lives below cuts);
    otherwise names below a cut are skipped and a wildcard answers for a name
    that does not exist.
    """
    nodes: list[tuple[bytes, dict[int, list[ZoneRecord]]]] = []
    for name in names:
        node = zone.nodes.get(name)
        if not glue and zone.cuts and _cut_above(zone, name, dns.A) is not None:
            continue
        if node is None and not glue and name not in zone.names:
            node = _wildcard(zone, name)
        if node is not None:
            nodes.append((name.encode("ascii"), node))
    out: list[Entry] = []
    for rtype in (dns.A, dns.AAAA):
        for owner, node in nodes:
            out.extend((owner, r) for r in node.get(rtype, ()))
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
