"""Signing a zone: DNSKEY, CDS and CDNSKEY at the apex, the NSEC chain, an RRSIG per RRset.

:class:`ZoneSigner` turns a :class:`~dcrouter.dns.zone.ZoneContent` and the
keys of the moment (:class:`SigningKeys`) into
:class:`~dcrouter.dns.denial.DnssecData`, as ``ldns-signzone`` and
``dnssec-signzone`` would sign the same zone (tests/dns/test_dnssec_nsd.py
compares): every authoritative RRset signed with the active ZSK, the DNSKEY,
CDS and CDNSKEY sets with the KSKs, delegation NS and glue unsigned, an NSEC
at every authoritative name and delegation (types present, RRSIG, NSEC; TTL
min(SOA TTL, SOA minimum), RFC 9077).  The SOA is signed last
(:meth:`ZoneSigner.sign_soa`), once the serial is known.

Signatures (dnspython's :func:`dns.dnssec.sign`, deterministic ECDSA) are
kept between runs, keyed by the RRset's content and the key: a rebuild signs
only what changed, and a signature is replaced when less than
``signature_refresh`` of its validity is left.  Signing times are counted
from the start of the hour (:data:`REFRESH_BATCH`): inception is that minus
``inception_offset`` (validators with a slow clock); expiration is
``signature_validity`` after it minus a jitter of up to
``signature_jitter`` drawn from a hash of the RRset and key, so refreshes
spread out instead of arriving together - and every worker process that
signs the same data in the same hour makes the same signature (so the
workers agree on the zone and its serial).  Blocking (about 0.1 ms a
signature): the DNS service runs it in a thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from dcrouter.config.dns import DnssecOptions
from dcrouter.dns.denial import DnssecData, canonical_key
from dcrouter.dns.dnssec_keys import DnssecKey
from dcrouter.dns.zone import (CDNSKEY, CDS, DNSKEY, DS, NSEC, RRSIG, Zone, ZoneContent,
                               ZoneRecord, wire_record)

NS = 2
SOA = 6
IN = dns.rdataclass.IN
#: Signatures due within this much of a refresh are replaced in the same run (batches).
REFRESH_BATCH = 3600
#: Types the KSKs sign (RFC 7344 4.1: CDS and CDNSKEY with a key the parent's DS names).
KSK_TYPES = frozenset({DNSKEY, CDS, CDNSKEY})


@dataclasses.dataclass
class SigningKeys:
    """The keys of one zone at one moment."""

    published: list[DnssecKey]   # the DNSKEY set
    ksk: list[DnssecKey]         # sign DNSKEY, CDS, CDNSKEY
    zsk: list[DnssecKey]         # sign everything else
    parent: list[DnssecKey]      # what CDS/CDNSKEY name


def _type(code: int) -> dns.rdatatype.RdataType:
    return dns.rdatatype.RdataType.make(code)


def _name(owner: str) -> dns.name.Name:
    return dns.name.from_text(owner + "." if owner else ".")


def _rdata_record(owner: str, ttl: int, rd: Any, covered: int = 0) -> ZoneRecord:
    return wire_record(owner, int(rd.rdtype), ttl, rd.to_wire(), rd.to_text(), covered)


def _below_cut(owner: str, origin: str, cuts: set[str]) -> bool:
    """``owner`` lies strictly below a delegation (glue or occluded data)."""
    if not cuts:
        return False
    name = owner
    while name != origin and name:
        name = name.partition(".")[2]
        if name in cuts:
            return True
    return False


class ZoneSigner:
    """Signs one zone, keeping its signatures from one run to the next."""

    def __init__(self, origin: str, options: DnssecOptions) -> None:
        self.origin = origin
        self.options = options
        #: (owner, type, TTL, rdata wires, key tag, algorithm) -> (RRSIG record, expiration)
        self.cache: dict[tuple[Any, ...], tuple[ZoneRecord, int]] = {}
        self._used: dict[tuple[Any, ...], tuple[ZoneRecord, int]] = {}
        #: The SOA's signatures (the serial changes with every build: kept apart).
        self.soa_cache: dict[tuple[Any, ...], tuple[ZoneRecord, int]] = {}
        self.signed = 0
        self.reused = 0

    # -- the zone -----------------------------------------------------------------
    def apex_records(self, content: ZoneContent, keys: SigningKeys) -> list[ZoneRecord]:
        """DNSKEY for every published key; CDS and CDNSKEY for the parent's key."""
        origin = self.origin
        ttl = self.options.dnskey_ttl or content.ttl
        out = [_rdata_record(origin, ttl, k.dnskey) for k in keys.published]
        if self.options.publish_cds:
            for key in keys.parent:
                out.append(_rdata_record(origin, ttl, dns.dnssec.make_cds(
                    _name(origin), key.dnskey, "SHA256")))
            for key in keys.parent:
                out.append(_rdata_record(origin, ttl, dns.rdata.from_wire(
                    IN, _type(CDNSKEY), key.dnskey.to_wire(), 0, len(key.dnskey.to_wire()))))
        return out

    def sign(self, content: ZoneContent, keys: SigningKeys, now: float) -> DnssecData:
        """Everything but the SOA's signature (see :meth:`sign_soa`)."""
        origin = self.origin
        self._used = {}
        apex = self.apex_records(content, keys)
        nodes: dict[str, dict[int, list[ZoneRecord]]] = {origin: {}}
        for rec in content.records + tuple(apex):
            nodes.setdefault(rec.owner, {}).setdefault(rec.rtype, []).append(rec)
        cuts = {o for o, node in nodes.items() if o != origin and NS in node}
        owners = sorted((o for o in nodes if not _below_cut(o, origin, cuts)), key=canonical_key)
        soa = content.soa
        nsec_ttl = min(soa.ttl, soa.minimum)
        nsec: list[ZoneRecord] = []
        sigs: dict[tuple[str, int], list[ZoneRecord]] = {}
        for i, owner in enumerate(owners):
            node = nodes[owner]
            if owner in cuts:
                types = {NS} | ({DS} if DS in node else set())
            else:
                types = set(node) | ({SOA} if owner == origin else set())
            types |= {RRSIG, NSEC}
            following = owners[(i + 1) % len(owners)]
            rd = dns.rdata.from_text(IN, _type(NSEC), " ".join(
                [_name(following).to_text()] +
                [dns.rdatatype.to_text(_type(t)) for t in sorted(types)]))
            record = _rdata_record(owner, nsec_ttl, rd)
            nsec.append(record)
            for rtype, records in node.items():
                if owner in cuts and rtype != DS:
                    continue  # delegation NS and occluded data are not signed
                sigs[(owner, rtype)] = self.sign_rrset(owner, rtype, records, keys, now)
            sigs[(owner, NSEC)] = self.sign_rrset(owner, NSEC, [record], keys, now)
        self.cache = self._used
        refresh = [exp - self.options.signature_refresh for _sig, exp in self.cache.values()]
        digest = hashlib.sha256()
        for line in sorted(f"{r.owner} {r.rtype} {r.ttl} {r.text}"
                           for group in [apex, nsec, *sigs.values()] for r in group):
            digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
        return DnssecData(apex + nsec, sigs, nsec, [canonical_key(r.owner) for r in nsec],
                          digest.hexdigest(), refresh_at=min(refresh) if refresh else 0.0)

    def sign_soa(self, zone: Zone, keys: SigningKeys, now: float) -> None:
        """Sign ``zone``'s SOA (now that its serial is set) into ``zone.dnssec``."""
        data = zone.dnssec
        assert data is not None
        kept = self.cache
        self.cache, self._used = self.soa_cache, {}
        try:
            sigs = self.sign_rrset(zone.origin, SOA, [zone.soa], keys, now)
        finally:
            self.soa_cache, self.cache = self._used, kept
        data.sigs[(zone.origin, SOA)] = sigs
        negative_ttl = zone.negative_soa.ttl
        data.negative_soa_sigs = [dataclasses.replace(s, ttl=negative_ttl) for s in sigs]
        refresh = [exp - self.options.signature_refresh for _s, exp in self.soa_cache.values()]
        if refresh:
            data.refresh_at = min(refresh + ([data.refresh_at] if data.refresh_at else []))

    # -- one RRset ------------------------------------------------------------------
    def sign_rrset(self, owner: str, rtype: int, records: list[ZoneRecord], keys: SigningKeys,
                   now: float) -> list[ZoneRecord]:
        """The RRSIG records of one RRset: cached ones while fresh, new ones otherwise."""
        signers = keys.ksk if rtype in KSK_TYPES else keys.zsk
        ttl = records[0].ttl
        wires = tuple(sorted({r.rdata_wire() for r in records}))
        out = []
        for key in signers:
            cache_key = (owner, rtype, ttl, wires, key.tag, key.times.algorithm)
            hit = self.cache.get(cache_key)
            if hit is not None and self._fresh(hit, now):
                self.reused += 1
                self._used[cache_key] = hit
                out.append(hit[0])
                continue
            record, expiration = self._sign_one(owner, rtype, ttl, wires, key, now)
            self._used[cache_key] = (record, expiration)
            out.append(record)
        return out

    def _fresh(self, hit: tuple[ZoneRecord, int], now: float) -> bool:
        record, expiration = hit
        return expiration - now > self.options.signature_refresh + min(
            REFRESH_BATCH, self.options.signature_jitter or REFRESH_BATCH) and \
            self._inception(record) <= now

    @staticmethod
    def _inception(record: ZoneRecord) -> int:
        wire = record.rdata_wire()
        return int.from_bytes(wire[12:16], "big")

    def _sign_one(self, owner: str, rtype: int, ttl: int, wires: tuple[bytes, ...],
                  key: DnssecKey, now: float) -> tuple[ZoneRecord, int]:
        rrset = dns.rrset.RRset(_name(owner), IN, dns.rdatatype.RdataType.make(rtype))
        for wire in wires:
            rrset.add(dns.rdata.from_wire(IN, _type(rtype), wire, 0, len(wire)))
        rrset.ttl = ttl
        options = self.options
        start = int(now) // REFRESH_BATCH * REFRESH_BATCH
        inception = start - options.inception_offset
        seed = hashlib.sha256(f"{owner}/{rtype}/{key.tag}/{start}".encode("latin-1")).digest()
        jitter = int.from_bytes(seed[:4], "big") % (options.signature_jitter + 1)
        expiration = start + options.signature_validity - jitter
        rrsig = dns.dnssec.sign(rrset, key.private, _name(self.origin), key.dnskey,
                                inception=inception, expiration=expiration)
        self.signed += 1
        return _rdata_record(owner, ttl, rrsig, covered=rtype), expiration
