"""Differential DNS testing: the same generated queries to dcrouter and to NSD, answers compared.

:func:`generate` builds a deterministic list of queries (fixed seed) over a
zone set: every owner name and names around it (missing siblings and
children, wildcard matches one and two labels deep, names at, below and
under delegations, empty non-terminals), names outside every zone, labels
with an escaped dot or odd bytes, random case, every record type plus DS,
DNSKEY, ANY, unknown, meta and zone-transfer types, the classes IN, ANY, CH,
HS, NONE and unassigned ones, with and without EDNS (small, odd and large
buffer sizes, DO, version 1, a cookie, NSID, padding or unknown option), RD
and CD, over UDP and TCP.

:func:`compare` reduces both responses to a canonical form (records sorted
within a section: order inside a section is not meaningful, TTLs kept: both
servers serve the same data) and returns the differences left after the
normalisations for what NSD 4.6 legitimately does otherwise; each one is
counted under its name in :data:`NORMALISATIONS`, and docs/dns.md lists them:

``nsd-apex-ns``
    NSD adds the zone's apex NS RRset to the authority section of positive
    answers (and those names' addresses to the additional section) when
    there is room; dcrouter sends minimal responses.
``truncated``
    both set TC: the client retries over TCP, so what else each put in the
    truncated message does not count (NSD keeps the RRsets that fit,
    dcrouter only the question).
``rfc9471-tc``
    a referral whose in-domain glue does not all fit: dcrouter sets TC (RFC
    9471), NSD 4.6 leaves TC clear with the glue cut short; the rest of the
    two responses is identical.
``question-echo``
    NSD answers a query of class NONE or an unassigned class with REFUSED and
    no question section; dcrouter echoes the question.
``cd-copied``
    dcrouter copies the CD bit into the response (RFC 4035 3.1.6); NSD 4.6
    leaves it clear.
``any-class-aa``
    a QCLASS ANY query whose CNAME leads into a delegation: NSD sets AA (its
    CNAME-then-referral path sets it after the class check), dcrouter keeps
    every QCLASS ANY answer non-authoritative (RFC 1035 6.2).
"""

from __future__ import annotations

import dataclasses
import random
import socket
import struct
from collections import Counter
from typing import Optional

import dns.dnssec
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from dcrouter.dns.zone import ZoneSet, in_zone

NORMALISATIONS = ("nsd-apex-ns", "truncated", "rfc9471-tc", "question-echo", "cd-copied",
                  "any-class-aa")

CORE_TYPES = ["A", "MX", "NS", "DS", "ANY"]
ALL_TYPES = CORE_TYPES + ["AAAA", "TXT", "SOA", "CNAME", "SRV", "CAA", "PTR", "DNSKEY",
                          "RRSIG", "NSEC", "NSEC3PARAM",
                          "HINFO", "TYPE65280", "TYPE0", "OPT", "MAILA", "MAILB", "AXFR",
                          "IXFR", "TLSA", "HTTPS"]
CLASSES = [1] * 12 + [255, 255, 3, 4, 254, 0, 65280]
PAYLOADS = [0, 100, 511, 512, 600, 1232, 1400, 4096, 65535]


@dataclasses.dataclass
class Probe:
    """One generated query."""

    name: str           # presentation form (escapes allowed)
    rdtype: int
    rdclass: int
    edns: int           # -1: none, else the EDNS version
    payload: int
    dnssec: bool
    rd: bool
    cd: bool
    tcp: bool
    option: int = 0     # an EDNS option code to send (0: none)

    def wire(self, qid: int) -> bytes:
        """The query bytes."""
        options = []
        if self.edns >= 0 and self.option:
            data = {10: b"\x01\x02\x03\x04\x05\x06\x07\x08", 3: b"", 12: b"\x00" * 16}.get(
                self.option, b"opaque")
            options.append(dns.edns.GenericOption(self.option, data))
        query = dns.message.make_query(
            dns.name.from_text(self.name), self.rdtype, self.rdclass,
            use_edns=self.edns if self.edns >= 0 else False, payload=self.payload,
            want_dnssec=self.dnssec and self.edns >= 0,  # DO would add an OPT record
            options=options or None)
        query.id = qid
        query.flags = (dns.flags.RD if self.rd else 0) | (dns.flags.CD if self.cd else 0)
        return query.to_wire()

    def __str__(self) -> str:
        edns = "no-edns" if self.edns < 0 else f"edns{self.edns}/{self.payload}" + (
            "+do" if self.dnssec else "")
        return (f"{self.name} {dns.rdataclass.to_text(self.rdclass)} "
                f"{dns.rdatatype.to_text(self.rdtype)} {edns}{' rd' if self.rd else ''}"
                f"{' cd' if self.cd else ''}{f' opt{self.option}' if self.option else ''} "
                f"{'tcp' if self.tcp else 'udp'}")


def _names(zones: ZoneSet) -> list[str]:
    names: set[str] = set()
    for zone in zones:
        for owner in zone.nodes:
            names.add(owner)
            if any(owner.endswith("." + cut) for cut in zone.cuts):
                continue  # glue: below a cut, every name gets the same referral
            if not owner.startswith("*"):
                names.add("nope." + owner)
            names.add("x." + owner.lstrip("*.") if owner.startswith("*") else "x.y." + owner)
        for cut in zone.cuts:
            names.update({cut, "www." + cut, "a.b." + cut})
        for name in zone.names - set(zone.nodes):  # empty non-terminals
            names.add(name)
            names.add("nope." + name)
        names.add("nope." + zone.origin)
    names.update({"example.org", "test", "com", "elsewhere.invalid", "example.test.example",
                  "xexample.test", "other.test.invalid"})
    ordered = sorted(names)
    return [n + "." for n in ordered] + ["."]


SPECIAL_NAMES = [
    r"a\.b.example.test.", r"a\.b.wild.example.test.", r"c.a\.b.wild.example.test.",
    r"x.a\.b.deleg.example.test.", r"a\.b.deleg.example.test.", r"www.example\.test.",
    r"www\.example.test.", r"\..example.test.", r"a\.b.nope.example.test.",
    r"a\.b.sub.example.test.", r"a\.b.d.other.test.", r"www\.sub.example.test.",
    r"a\.b.cw.example.test.", r"mx1\.example.test.example.test.", r"\046.example.test.",
    r"\000.example.test.", r"a\000b.www.example.test.", r"\255.wild.example.test.",
    r"a\032b.example.test.", r"\\.example.test.", r"\".example.test.",
    "WWW.EXAMPLE.TEST.", "Www.Other.Test.", "wWw.DeLeG.example.test.", "CROSS.example.TEST.",
    "X.WILD.example.test.", "Into-Deleg.Example.Test.",
    ".".join(["a" * 63] * 3) + ".example.test.",
    ".".join(["b" * 60] * 3) + ".wild.example.test.",
]


def _random_case(rng: random.Random, name: str) -> str:
    return "".join(c.upper() if c.isalpha() and rng.random() < 0.5 else c for c in name)


def generate(zones: ZoneSet, seed: int = 20260401, extra: int = 1200,
             do_rate: float = 0.3, core_do: bool = False) -> list[Probe]:
    """Every name x the core types (IN, UDP; no EDNS, or EDNS with DO when ``core_do``),
    then ``extra`` random variations (DO set in ``do_rate`` of those with EDNS)."""
    rng = random.Random(seed)
    names = _names(zones) + SPECIAL_NAMES
    core = (0, 1232, True) if core_do else (-1, 0, False)
    probes = [Probe(name, dns.rdatatype.from_text(t), 1, core[0], core[1], core[2], False,
                    False, False)
              for name in names for t in CORE_TYPES]
    # answers near and over the UDP limits: long TXT, a long CNAME chain, big referrals
    for name, rdtype in (("long.example.test.", "TXT"), ("c0.example.test.", "A"),
                         ("www.big.example.test.", "A"), ("big.example.test.", "NS"),
                         ("x.mid.example.test.", "AAAA"), ("example.test.", "MX"),
                         ("into-deleg.example.test.", "A"), ("c10.example.test.", "TXT")):
        for edns, payload in ((-1, 0), (0, 512), (0, 700), (0, 1232), (0, 4096)):
            for rdclass in (1, 255):
                for tcp in (False, True):
                    probes.append(Probe(name, dns.rdatatype.from_text(rdtype), rdclass, edns,
                                        payload, False, True, False, tcp))
    for _ in range(extra):
        name = rng.choice(names)
        if rng.random() < 0.3:
            name = _random_case(rng, name)
        edns = -1 if rng.random() < 0.4 else (1 if rng.random() < 0.05 else 0)
        probes.append(Probe(
            name, dns.rdatatype.from_text(rng.choice(ALL_TYPES)), rng.choice(CLASSES), edns,
            rng.choice(PAYLOADS), rng.random() < do_rate, rng.random() < 0.5, rng.random() < 0.1,
            rng.random() < 0.15, rng.choice([0, 0, 0, 10, 3, 12, 65001])))
    return probes


def exchange(port: int, wire: bytes, tcp: bool, timeout: float = 2.0) -> Optional[bytes]:
    """Send one query to 127.0.0.1:port, return the response bytes (None: no answer)."""
    if tcp:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(struct.pack("!H", len(wire)) + wire)
            data = b""
            while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                chunk = s.recv(65535)
                if not chunk:
                    return None
                data += chunk
            return data[2:2 + struct.unpack("!H", data[:2])[0]]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(wire, ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except socket.timeout:
            return None


Record = tuple[str, int, int, int, str]


#: Types whose rdata holds names (compared case-insensitively, like owners: NSD
#: compresses names against the question regardless of case, so ``ns1.EXAMPLE.TEST.``).
_NAME_TYPES = {dns.rdatatype.NS, dns.rdatatype.CNAME, dns.rdatatype.MX, dns.rdatatype.SRV,
               dns.rdatatype.SOA, dns.rdatatype.PTR}


def _rdata_text(rrset: dns.rrset.RRset, rd: object) -> str:
    text = rd.to_text()  # type: ignore[attr-defined]
    if rrset.rdtype == dns.rdatatype.RRSIG:
        # signatures made at other times by other signers: compare what they cover, with
        # which key, and check them apart (verify_signatures)
        fields = text.split()
        return " ".join(fields[:4] + fields[6:8]).lower()
    return text.lower() if rrset.rdtype in _NAME_TYPES else text


def _records(section: list[dns.rrset.RRset]) -> list[Record]:
    return sorted((rrset.name.to_text().lower(), rrset.ttl, rrset.rdclass, rrset.rdtype,
                   _rdata_text(rrset, rd)) for rrset in section for rd in rrset)


@dataclasses.dataclass
class Canon:
    """A response reduced to what the comparison looks at."""

    rcode: int
    flags: int
    edns: int
    payload: int
    dnssec: bool
    question: list[tuple[str, int, int]]
    answer: list[Record]
    authority: list[Record]
    additional: list[Record]
    chain: list[str]    # owners of the answer section's RRsets, in order (the CNAME chain)
    first_owner: str    # the first answer's owner as sent (the query name's case kept)

    @classmethod
    def of(cls, wire: bytes) -> "Canon":
        """Parse with dnspython."""
        msg = dns.message.from_wire(wire, ignore_trailing=True, one_rr_per_rrset=True)
        chain: list[str] = []
        for rrset in msg.answer:
            owner = rrset.name.to_text().lower()
            if not chain or chain[-1] != owner:
                chain.append(owner)
        return cls(msg.rcode(), msg.flags & ~0x000F, msg.edns, msg.payload if msg.edns >= 0 else 0,
                   bool(msg.ednsflags & dns.flags.DO),
                   [(q.name.to_text(), q.rdclass, q.rdtype) for q in msg.question],
                   _records(msg.answer), _records(msg.authority), _records(msg.additional), chain,
                   msg.answer[0].name.to_text() if msg.answer else "")

    @property
    def tc(self) -> bool:
        """TC set."""
        return bool(self.flags & dns.flags.TC)


class Comparator:
    """Compares responses for one zone set, counting the normalisations applied."""

    def __init__(self, zones: ZoneSet) -> None:
        self.zones = zones
        self.origins = {z.origin + "." for z in zones}
        self.applied: Counter[str] = Counter()

    def compare(self, probe: Probe, ours: Optional[bytes], theirs: Optional[bytes]) -> list[str]:
        """The unexplained differences (empty: the answers agree)."""
        if ours is None or theirs is None:
            return [] if ours is theirs else [f"only one answered: dcrouter {ours is not None}, "
                                              f"nsd {theirs is not None}"]
        a, b = Canon.of(ours), Canon.of(theirs)
        if not b.question and a.question and a.rcode == b.rcode and not a.answer:
            self.applied["question-echo"] += 1
            b.question = a.question
        self._strip_apex_ns(b)
        if a.flags & dns.flags.CD and not b.flags & dns.flags.CD:
            self.applied["cd-copied"] += 1
            a.flags &= ~dns.flags.CD
        if (probe.rdclass == dns.rdataclass.ANY and b.flags & dns.flags.AA and
                not a.flags & dns.flags.AA and a.answer and
                any(r[3] == dns.rdatatype.NS for r in a.authority)):
            self.applied["any-class-aa"] += 1
            b.flags &= ~dns.flags.AA
        if a.tc and b.tc:
            self.applied["truncated"] += 1
            a.answer, a.authority, a.additional, a.chain, a.first_owner = [], [], [], [], ""
            b.answer, b.authority, b.additional, b.chain, b.first_owner = [], [], [], [], ""
        elif a.tc and not b.tc and self._nsd_cut_glue(b):
            self.applied["rfc9471-tc"] += 1
            b.flags |= dns.flags.TC
        diffs = []
        for field in ("rcode", "flags", "edns", "payload", "dnssec", "question", "chain",
                      "first_owner", "answer", "authority", "additional"):
            mine, nsd = getattr(a, field), getattr(b, field)
            if mine != nsd:
                if field in ("answer", "authority", "additional"):
                    mine, nsd = sorted(set(mine) - set(nsd)), sorted(set(nsd) - set(mine))
                    diffs.append(f"{field}: only dcrouter {mine} / only nsd {nsd}")
                    continue
                if field == "flags":
                    mine, nsd = dns.flags.to_text(mine), dns.flags.to_text(nsd)
                diffs.append(f"{field}: dcrouter {mine!r} != nsd {nsd!r}")
        return diffs

    def _strip_apex_ns(self, b: Canon) -> None:
        """Drop NSD's optional apex NS RRset (and its names' addresses) from positive answers."""
        if not b.answer:
            return
        apex_ns = [r for r in b.authority if r[3] == dns.rdatatype.NS and
                   r[0].lower() in self.origins]
        if not apex_ns:
            return
        self.applied["nsd-apex-ns"] += 1
        apex_ns += [r for r in b.authority if r[3] == dns.rdatatype.RRSIG and
                    r[4].startswith("ns ") and r[0].lower() in self.origins]
        b.authority = [r for r in b.authority if r not in apex_ns]
        needed = {_target(r) for r in b.answer + b.authority if _target(r)}
        dropped = {_target(r) for r in apex_ns} - needed
        b.additional = [r for r in b.additional if r[0].lower() not in dropped]

    def _nsd_cut_glue(self, b: Canon) -> bool:
        """NSD's referral lacks some in-domain glue (what RFC 9471 requires, or TC)."""
        cuts = {r[0].lower() for r in b.authority if r[3] == dns.rdatatype.NS}
        if len(cuts) != 1:
            return False
        cut = next(iter(cuts)).rstrip(".")
        zone = self.zones.find(cut)
        if zone is None or cut not in zone.cuts:
            return False
        wanted = set()
        for rec in zone.nodes[cut][dns.rdatatype.NS]:
            target = rec.target()
            if target and in_zone(target, cut):
                for rtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    for glue in zone.nodes.get(target, {}).get(rtype, []):
                        wanted.add((target + ".", rtype, glue.text))
        have = {(r[0].lower(), r[3], r[4]) for r in b.additional}
        return not wanted <= have


def _target(record: Record) -> str:
    """The lower-case target name of an NS, MX or SRV record ('' for others)."""
    if record[3] in (dns.rdatatype.NS, dns.rdatatype.MX, dns.rdatatype.SRV):
        return record[4].split()[-1].lower()
    return ""


def exchange_many(port: int, wires: list[bytes], timeout: float = 3.0) -> list[Optional[bytes]]:
    """Send UDP queries (distinct IDs) in one burst; the responses in query order."""
    ids = [struct.unpack_from("!H", w)[0] for w in wires]
    assert len(set(ids)) == len(ids)
    where = {qid: i for i, qid in enumerate(ids)}
    out: list[Optional[bytes]] = [None] * len(wires)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for wire in wires:
            s.sendto(wire, ("127.0.0.1", port))
        pending = len(wires)
        while pending:
            try:
                data = s.recv(65535)
            except socket.timeout:
                break
            if len(data) >= 2:
                i = where.get(struct.unpack_from("!H", data)[0], -1)
                if i >= 0 and out[i] is None:
                    out[i] = data
                    pending -= 1
    return out


def verify_signatures(wire: bytes, keys: dict[dns.name.Name, dns.rrset.RRset]) -> list[str]:
    """Every RRSIG in the response validates the RRset it covers with ``keys`` (zone apex
    -> DNSKEY set), and every RRSIG has that RRset; the problems found."""
    msg = dns.message.from_wire(wire, ignore_trailing=True)
    problems = []
    for section_name in ("answer", "authority", "additional"):
        section = getattr(msg, section_name)
        for sigs in section:
            if sigs.rdtype != dns.rdatatype.RRSIG:
                continue
            covered = [r for r in section if r.name == sigs.name and r.rdtype == sigs.covers]
            if not covered and section_name == "answer" and msg.question and \
                    msg.question[0].rdtype == dns.rdatatype.RRSIG:
                continue  # QTYPE RRSIG: the signatures alone are the answer
            if not covered:
                problems.append(f"{section_name}: RRSIG {sigs.name} "
                                f"{dns.rdatatype.to_text(sigs.covers)} without its RRset")
                continue
            for sig in sigs:
                try:
                    dns.dnssec.validate_rrsig(covered[0], sig, keys)
                except dns.dnssec.ValidationFailure as e:
                    problems.append(f"{section_name}: {sigs.name} "
                                    f"{dns.rdatatype.to_text(sigs.covers)} key {sig.key_tag}: {e}")
    return problems


def run(probes: list[Probe], ours: tuple[int, int], nsd_port: int, zones: ZoneSet,
        batch: int = 64, keys: Optional[dict[dns.name.Name, dns.rrset.RRset]] = None
        ) -> tuple[list[tuple[str, list[str]]], Comparator]:
    """Send every probe to both servers (``ours``: dcrouter's UDP and TCP ports; UDP in
    bursts of ``batch``); the probes whose answers differ, with why.  With ``keys``
    every signature in dcrouter's answers is validated too."""
    comparator = Comparator(zones)
    failures: list[tuple[str, list[str]]] = []
    udp = [p for p in probes if not p.tcp]
    results: list[tuple[Probe, Optional[bytes], Optional[bytes]]] = []
    for start in range(0, len(udp), batch):
        chunk = udp[start:start + batch]
        wires = [p.wire(i) for i, p in enumerate(chunk)]
        mine = exchange_many(ours[0], wires)
        theirs = exchange_many(nsd_port, wires)
        results.extend(zip(chunk, mine, theirs))
    for i, probe in enumerate(p for p in probes if p.tcp):
        wire = probe.wire(i & 0xFFFF)
        results.append((probe, exchange(ours[1], wire, True), exchange(nsd_port, wire, True)))
    for probe, mine_one, theirs_one in results:
        diffs = comparator.compare(probe, mine_one, theirs_one)
        if keys is not None and mine_one is not None:
            diffs += verify_signatures(mine_one, keys)
        if diffs:
            failures.append((str(probe), diffs))
    return failures, comparator


def summary(failures: list[tuple[str, list[str]]], limit: int = 25) -> str:
    """The first differences, readable in an assertion message."""
    lines = [f"{len(failures)} queries answered differently from NSD:"]
    kinds = Counter(d.split(":")[0] for _p, diffs in failures for d in diffs)
    lines.append(f"  (fields: {dict(kinds)})")
    for probe, diffs in failures[:limit]:
        lines.append(f"  {probe}")
        lines.extend(f"      {d}" for d in diffs)
    return "\n".join(lines)


