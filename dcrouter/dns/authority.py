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

For a query with DO to a signed zone (RFC 4035 3.1, :mod:`dcrouter.dns.denial`)
every RRset of the answer and authority sections, and the additional
addresses the zone holds, come with their RRSIGs (a wildcard's under the query
name); NXDOMAIN carries the NSEC covering the name and the one covering the
wildcard at its closest encloser, NODATA the name's NSEC (an empty
non-terminal's covering one), a wildcard answer the NSEC proving the name
does not exist, a referral the DS set or the cut's NSEC.  QTYPE RRSIG gets
the signatures at the name.  Without DO nothing of this is added.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from twisted.names import dns

from dcrouter.dns.denial import Proofs, nsec_at, signatures, with_signatures
from dcrouter.dns.zone import RRSIG, Zone, ZoneRecord, ZoneSet, in_zone

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

    def lookup(self, name: str, qtype: int, owner: Optional[bytes] = None,
               dnssec: bool = False, qkey: Optional[tuple[bytes, ...]] = None) -> Answer:
        """Answer ``name`` (lower-case, no trailing dot) for ``qtype``.

        ``owner`` is the name as the client spelled it, used as the owner of
        records at the query name (case preserved, and it compresses against
        the question).  ``dnssec`` (the query's DO bit) adds the signatures
        and NSEC proofs of signed zones (RFC 4035 3.1); ``qkey`` is the query
        name's canonical sort key when ``name`` stands in for it (a label
        with a dot in it).
        """
        zone = self._zone_for(name, qtype)
        if zone is None:
            return Answer(dns.EREFUSED, False)
        proofs = Proofs() if dnssec else None
        if qtype == DS and zone.origin != name and name not in zone.names and \
                self.zones.zones.get(name) is not None:
            # DS at the apex of a served zone its (served) parent does not delegate: the
            # name exists here, so NODATA from the parent (as NSD), not a NXDOMAIN that
            # would deny the whole child zone (RFC 8020)
            if proofs is not None:
                proofs.add_covering(zone, name, qkey)
            return self._negative(zone, dns.OK, [], proofs)
        if owner is None:
            owner = name.encode("latin-1")
        answers: list[Entry] = []
        seen: set[str] = set()
        current, current_owner = name, owner
        key = qkey
        for _ in range(MAX_CHAIN):
            seen.add(current)
            signed = proofs if zone.dnssec is not None else None
            if zone.cuts:
                cut = _cut_above(zone, current, qtype)
                if cut is not None:
                    return self._referral(zone, cut, answers, proofs)
            node = zone.nodes.get(current)
            node_owner = current
            if node is None:
                if current in zone.names:
                    if signed is not None:  # an empty non-terminal: no NSEC of its own
                        signed.add_covering(zone, current, key)
                    return self._negative(zone, dns.OK, answers, proofs)
                encloser, node = _wildcard(zone, current)
                if signed is not None:  # the name itself does not exist
                    signed.add_covering(zone, current, key)
                if node is None:
                    if signed is not None:  # nor a wildcard at the closest encloser
                        signed.add_covering(zone, _star(encloser))
                    return self._negative(zone, dns.ENAME, answers, proofs)
                node_owner = _star(encloser)
            key = None
            if qtype == dns.ALL_RECORDS:  # RFC 8482: one RRset, the first at the name
                final = next(iter(node.values()))
                break
            rrset = node.get(qtype)
            if qtype == RRSIG and zone.dnssec is not None:
                rrset = [s for t in node for s in zone.dnssec.sigs.get((node_owner, t), ())]
            if rrset:
                final = rrset
                break
            cnames = node.get(dns.CNAME)
            if not cnames:
                if signed is not None:
                    signed.add(zone, nsec_at(zone, node_owner))
                return self._negative(zone, dns.OK, answers, proofs)
            link = cnames[0]
            answers.append((current_owner, link))
            if signed is not None:
                answers.extend(signatures(zone, node_owner, dns.CNAME, current_owner))
            target = link.target()
            if target is None or target in seen:
                return Answer(dns.OK, True, answers, _entries(proofs))
            # RFC 1034 4.3.2 step 3a: start over with the target, in whichever zone holds it
            next_zone = self._zone_for(target, qtype)
            if next_zone is None:
                return Answer(dns.OK, True, answers, _entries(proofs))
            zone, current, current_owner = next_zone, target, target.encode("ascii")
        else:
            return Answer(dns.OK, True, answers, _entries(proofs))
        answers.extend((current_owner, r) for r in final)
        if proofs is not None and zone.dnssec is not None and final[0].rtype != RRSIG:
            answers.extend(signatures(zone, node_owner, final[0].rtype, current_owner))
        return Answer(dns.OK, True, answers, _entries(proofs),
                      self._additional(zone, final, proofs is not None))

    def _zone_for(self, name: str, qtype: int) -> Optional[Zone]:
        """The zone that answers ``name``: the closest one, except for DS at a served
        zone's apex, which its parent zone answers when served too (RFC 4035 3.1.4.1)."""
        zone = self.zones.find(name)
        if zone is not None and qtype == DS and name == zone.origin and name:
            parent = self.zones.find(name.partition(".")[2])
            if parent is not None:
                return parent
        return zone

    def _referral(self, zone: Zone, cut: str, answers: list[Entry],
                  proofs: Optional[Proofs]) -> Answer:
        """NS of ``cut`` in the authority section, glue in the additional; AA only when a
        CNAME of ours led here (the answer section then holds it).  With DNSSEC the DS
        set and its signatures follow the NS set, or the cut's NSEC proving there is
        none (RFC 4035 3.1.4)."""
        node = zone.nodes[cut]
        ns = node[dns.NS]
        owner = cut.encode("ascii")
        inside: list[str] = []
        outside: list[str] = []
        for rec in ns:
            target = rec.target()
            if target and target not in inside and target not in outside:
                (inside if in_zone(target, cut) else outside).append(target)
        dnssec = proofs is not None
        glue = _addresses(zone, inside, glue=True, dnssec=dnssec)
        authority = [(owner, r) for r in ns]
        if proofs is not None and zone.dnssec is not None:
            ds = node.get(DS)
            if ds:
                authority.extend(with_signatures(zone, [(owner, r) for r in ds], cut))
            else:
                proofs.add(zone, nsec_at(zone, cut))
        authority.extend(_entries(proofs))
        return Answer(dns.OK, bool(answers), answers, authority,
                      glue + _addresses(zone, outside, glue=True, dnssec=dnssec),
                      required=len(glue))

    def _negative(self, zone: Zone, rcode: int, answers: list[Entry],
                  proofs: Optional[Proofs] = None) -> Answer:
        soa = zone.negative_soa
        soa_owner = soa.owner.encode("ascii")
        authority = [(soa_owner, soa)]
        if proofs is not None and zone.dnssec is not None:
            authority.extend((soa_owner, s) for s in zone.dnssec.negative_soa_sigs)
        authority.extend(_entries(proofs))
        return Answer(rcode, True, answers, authority)

    @staticmethod
    def _additional(zone: Zone, records: list[ZoneRecord], dnssec: bool) -> list[Entry]:
        """A/AAAA of the MX, NS and SRV targets that ``zone`` holds (as NSD: same zone,
        wildcards apply, nothing from below a delegation), signed when asked for."""
        targets: list[str] = []
        for rec in records:
            if rec.rtype in (dns.MX, dns.NS, dns.SRV):
                target = rec.target()
                if target and target not in targets:
                    targets.append(target)
        return _addresses(zone, targets, glue=False, dnssec=dnssec) if targets else []


def _entries(proofs: Optional[Proofs]) -> list[Entry]:
    return list(proofs.entries) if proofs is not None else []


def _star(encloser: str) -> str:
    """The wildcard name at ``encloser``."""
    return "*." + encloser if encloser else "*"


def _addresses(zone: Zone, names: list[str], glue: bool, dnssec: bool = False) -> list[Entry]:
    """The A records of ``names`` in ``zone``, then their AAAA records (NSD's order).

    ``glue``: for a referral, the records as they are (glue lives below cuts);
    otherwise names below a cut are skipped, a wildcard answers for a name
    that does not exist, and with ``dnssec`` each RRset's signatures follow it.
    """
    nodes: list[tuple[bytes, str, dict[int, list[ZoneRecord]], bool]] = []
    sign = dnssec and zone.dnssec is not None
    for name in names:
        node = zone.nodes.get(name)
        node_owner = name
        below = bool(zone.cuts) and _cut_above(zone, name, dns.A) is not None
        if below and not glue:
            continue
        if node is None and not glue and name not in zone.names:
            encloser, node = _wildcard(zone, name)
            node_owner = _star(encloser)
        if node is not None:  # glue below a cut is not signed, the zone's own data is
            nodes.append((name.encode("ascii"), node_owner, node, sign and not below))
    out: list[Entry] = []
    for rtype in (dns.A, dns.AAAA):
        for owner, node_owner, node, signed in nodes:
            records = node.get(rtype)
            if records:
                out.extend((owner, r) for r in records)
                if signed:
                    out.extend(signatures(zone, node_owner, rtype, owner))
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


def _wildcard(zone: Zone, name: str) -> tuple[str, Optional[dict[int, list[ZoneRecord]]]]:
    """The closest encloser of ``name`` (which does not exist) and the node of
    ``*.<closest encloser>`` that synthesises it, or None."""
    labels = name.split(".")
    for i in range(1, len(labels) + 1):
        ancestor = ".".join(labels[i:])
        if ancestor in zone.names:
            return ancestor, zone.nodes.get(_star(ancestor))
    return "", None
