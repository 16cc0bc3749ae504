"""The DNSSEC data of a signed zone and the proofs answers carry (RFC 4035 section 3.1).

:class:`DnssecData` is what :mod:`dcrouter.dns.signer` adds to a
:class:`~dcrouter.dns.zone.Zone`: DNSKEY, CDS, CDNSKEY and NSEC records, the
RRSIG records of every authoritative RRset, and the NSEC chain in canonical
order.  The helpers here pick the records a response to a DO query needs:

* :func:`signatures` - the RRSIGs of one RRset, with the owner the answer
  uses (a wildcard's signatures go out under the query name, RFC 4035 3.1.3.3);
* :func:`covering` - the NSEC whose owner precedes a name that does not
  exist (its "next" name follows it): the proof of NXDOMAIN, of a wildcard
  expansion, and of an empty non-terminal's NODATA;
* :func:`nsec_at` - the NSEC at an existing name (NODATA: the type is not in
  its bitmap; at a delegation: no DS, so the child is unsigned).

Denial is a precomputed NSEC chain (docs/decisions.md says why): a negative
answer costs no signing, so a flood of random names cannot buy CPU.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING, Optional

from dcrouter.dns.zone import ZoneRecord

if TYPE_CHECKING:
    from dcrouter.dns.zone import Zone

RRSIG = 46
NSEC = 47

#: A record in a response: the owner name as it goes on the wire, and the record.
Entry = tuple[bytes, ZoneRecord]


def canonical_key(name: str) -> tuple[bytes, ...]:
    """The sort key of a lower-case name in DNSSEC canonical order (RFC 4034 6.1): labels
    compared from the root down, as octets."""
    return tuple(reversed(name.encode("latin-1").split(b"."))) if name else ()


@dataclasses.dataclass
class DnssecData:
    """What signing adds to a zone.

    ``records`` (DNSKEY, CDS, CDNSKEY, NSEC) join the zone's nodes;
    ``sigs`` holds the RRSIG records of each (owner, covered type);
    ``nsec`` is the NSEC chain in canonical order with ``nsec_keys`` the
    owners' :func:`canonical_key` for bisection; ``fingerprint`` digests
    all of it but the SOA's signatures (so the serial follows it).
    """

    records: list[ZoneRecord]
    sigs: dict[tuple[str, int], list[ZoneRecord]]
    nsec: list[ZoneRecord]
    nsec_keys: list[tuple[bytes, ...]]
    fingerprint: str
    #: The earliest time a signature needs replacing (the signer runs again then).
    refresh_at: float = 0.0
    #: The SOA signatures with the negative-answer TTL (set when the SOA is signed).
    negative_soa_sigs: list[ZoneRecord] = dataclasses.field(default_factory=list)


def signatures(zone: "Zone", owner: str, rtype: int, wire_owner: bytes) -> list[Entry]:
    """The RRSIGs of ``owner``/``rtype`` in ``zone``, to be sent with owner ``wire_owner``."""
    data = zone.dnssec
    if data is None:
        return []
    return [(wire_owner, sig) for sig in data.sigs.get((owner, rtype), ())]


def with_signatures(zone: "Zone", entries: list[Entry], owner: str) -> list[Entry]:
    """``entries`` (one RRset of ``owner`` in ``zone``) followed by their signatures."""
    if not entries or zone.dnssec is None:
        return entries
    return entries + signatures(zone, owner, entries[0][1].rtype, entries[0][0])


def covering(zone: "Zone", key: tuple[bytes, ...]) -> Optional[ZoneRecord]:
    """The NSEC of the last owner before ``key`` in canonical order (the chain wraps: the
    apex sorts first, so every name below it has one)."""
    data = zone.dnssec
    if data is None or not data.nsec:
        return None
    i = bisect.bisect_right(data.nsec_keys, key) - 1
    return data.nsec[i]


def nsec_at(zone: "Zone", owner: str) -> Optional[ZoneRecord]:
    """The NSEC record at ``owner``, if it has one."""
    node = zone.nodes.get(owner)
    if node is None:
        return None
    records = node.get(NSEC)
    return records[0] if records else None


class Proofs:
    """The NSEC records (and their signatures) an answer's authority section collects,
    each once, in the order they were asked for."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._seen: set[str] = set()

    def add(self, zone: "Zone", nsec: Optional[ZoneRecord]) -> None:
        """Add ``nsec`` of ``zone`` with its signatures, unless already there."""
        if nsec is None or zone.dnssec is None:
            return
        key = nsec.owner + "@" + zone.origin
        if key in self._seen:
            return
        self._seen.add(key)
        owner = nsec.owner.encode("ascii")
        self.entries.append((owner, nsec))
        self.entries.extend(signatures(zone, nsec.owner, NSEC, owner))

    def add_covering(self, zone: "Zone", name: str,
                     key: Optional[tuple[bytes, ...]] = None) -> None:
        """The NSEC proving ``name`` (canonical ``key`` when given) does not exist."""
        self.add(zone, covering(zone, canonical_key(name) if key is None else key))
