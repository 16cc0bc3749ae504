"""The zone model: records parsed from presentation format, indexed for look-ups.

A zone is built in two steps so that the serial can follow content changes:

* :func:`build_zone_content` parses ``[[dns.zones]]`` options (plus records
  added by the email publisher) into a :class:`ZoneContent`: validated
  records and the SOA fields, with a fingerprint of everything but the serial;
* :class:`Zone` indexes a content with a given serial: nodes by lower-case
  name, every existing name including empty non-terminals, the SOA.

Names are handled as lower-case ASCII text without the trailing dot
(``www.example.test``); the root is ``""``.  Values use zone-file
presentation format: ``MX "10 mail.example.test."``, ``TXT "v=spf1 -all"``
(a value that does not start with a quote is one string), ``CAA '0 issue
"ca.test"'``, ``SOA "ns1 hostmaster 1 3600 600 604800 300"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import ipaddress
import re
import struct
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from dns import exception as dp_exception
from dns import name as dp_name
from dns import rdata as dp_rdata
from dns import rdataclass as dp_rdataclass
from dns import rdatatype as dp_rdatatype
from twisted.names import dns

from dcrouter.config.dns import RecordOptions, ZoneOptions
from dcrouter.dns.presentation import caa_rdata_text, split_txt, tokenize  # noqa: F401
from dcrouter.dns.presentation import quote as _quote
from dcrouter.errors import ConfigError

if TYPE_CHECKING:
    from dcrouter.dns.denial import DnssecData

CAA = 257
DS, TLSA, RRSIG, NSEC, DNSKEY, CDS, CDNSKEY = 43, 52, 46, 47, 48, 59, 60
TYPE_CODES: dict[str, int] = {
    "A": dns.A, "AAAA": dns.AAAA, "CNAME": dns.CNAME, "MX": dns.MX, "TXT": dns.TXT,
    "NS": dns.NS, "SOA": dns.SOA, "SRV": dns.SRV, "CAA": CAA, "PTR": dns.PTR, "DS": DS,
    "TLSA": TLSA,
}
TYPE_NAMES: dict[int, str] = {v: k for k, v in TYPE_CODES.items()}
TYPE_NAMES.update({RRSIG: "RRSIG", NSEC: "NSEC", DNSKEY: "DNSKEY", CDS: "CDS",
                   CDNSKEY: "CDNSKEY"})
#: Configured types parsed (and printed) by dnspython: no names inside, nothing to compress.
GENERIC_TYPES = frozenset({DS, TLSA})

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_CAA_TAG = re.compile(r"^[a-z0-9]{1,15}$", re.IGNORECASE)
#: Largest rdata accepted: a record must fit one 65535-byte message with its question and owner.
MAX_RDATA = 65000
#: SOA timers of a generated SOA: refresh, retry, expire, minimum (negative-caching TTL cap).
SOA_TIMERS = (3600, 600, 604800, 300)


def type_name(rtype: int) -> str:
    """'A', 'MX', ... or 'TYPE123' for a type code."""
    return TYPE_NAMES.get(rtype) or dns.QUERY_TYPES.get(rtype) or f"TYPE{rtype}"


def to_ascii(name: str, path: str) -> str:
    """A name as lower-case ASCII (IDNA for non-ASCII labels), without the trailing dot."""
    name = name.strip().rstrip(".")
    try:
        name.encode("ascii")
    except UnicodeEncodeError:
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise ConfigError(path, f"invalid domain name {name!r}: {e}") from None
    return name.lower()


def check_name(name: str, path: str, wildcard: bool = False) -> str:
    """Validate a lower-case absolute name (labels of 1-63 characters, 253 in total)."""
    if name == "":
        return name
    if len(name) > 253:
        raise ConfigError(path, f"name too long ({len(name)} characters, at most 253)")
    labels = name.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and wildcard:
            continue
        if not _LABEL.match(label):
            raise ConfigError(path, f"invalid label {label!r} in {name!r}")
    return name


def absolute_name(name: str, origin: str, path: str, wildcard: bool = False) -> str:
    """Resolve '@', relative and absolute ('...' + '.') names against ``origin``."""
    raw = name.strip()
    if raw in ("@", ""):
        return origin
    if raw == ".":
        return ""
    if raw.endswith("."):
        full = to_ascii(raw, path)
    else:
        rel = to_ascii(raw, path)
        full = f"{rel}.{origin}" if origin else rel
    return check_name(full, path, wildcard)


def in_zone(name: str, origin: str) -> bool:
    """True when ``name`` is ``origin`` or below it."""
    return origin == "" or name == origin or name.endswith("." + origin)


def _int(token: bytes, path: str, what: str, maximum: int) -> int:
    try:
        value = int(token)
    except ValueError:
        raise ConfigError(path, f"{what} must be a number, got {token.decode('utf-8', 'replace')!r}"
                          ) from None
    if not 0 <= value <= maximum:
        raise ConfigError(path, f"{what} must be 0..{maximum}, got {value}")
    return value


def _fields(value: str, path: str, count: int, example: str) -> list[bytes]:
    tokens = tokenize(value, path)
    if len(tokens) != count:
        raise ConfigError(path, f"expected {count} fields like '{example}', got {value!r}")
    return tokens


def _dname(name: str) -> str:
    return name + "." if name else "."


@dataclasses.dataclass(frozen=True)
class ZoneRecord:
    """One parsed record: owner name, type code, TTL, twisted.names payload, canonical text.

    ``fixed`` (type, class, TTL) and ``parts`` (the rdata as byte strings and
    names to compress) are computed once, so answering encodes a record by
    concatenation.
    """

    owner: str
    rtype: int
    ttl: int
    payload: Any
    text: str
    #: RRSIG records: the type they cover.
    covered: int = 0
    fixed: bytes = dataclasses.field(init=False, repr=False, compare=False)
    parts: tuple[tuple[bool, bytes], ...] = dataclasses.field(init=False, repr=False,
                                                              compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fixed", struct.pack("!HHI", self.rtype, dns.IN, self.ttl))
        object.__setattr__(self, "parts", rdata_parts(self.rtype, self.payload))

    @property
    def type_name(self) -> str:
        """'A', 'MX', ..."""
        return type_name(self.rtype)

    def target(self) -> Optional[str]:
        """The name this record points at (CNAME, NS, PTR, MX, SRV), lower-case."""
        p = self.payload
        if self.rtype in (dns.CNAME, dns.NS, dns.PTR, dns.MX):
            return p.name.name.decode("ascii").lower()
        if self.rtype == dns.SRV:
            return p.target.name.decode("ascii").lower()
        return None

    def as_dict(self) -> dict:
        """For the API: name, type, ttl, value."""
        return {"name": _dname(self.owner), "type": self.type_name, "ttl": self.ttl,
                "value": self.text}

    def rdata_wire(self) -> bytes:
        """The rdata as on the wire with no compression (what DNSSEC signs, RFC 4034 6.2)."""
        out = bytearray()
        for is_name, part in self.parts:
            if is_name:
                out += name_wire(part)
            else:
                out += part
        return bytes(out)


def name_wire(name: bytes) -> bytes:
    """A dotted name (no trailing dot; b"" is the root) in uncompressed wire format."""
    out = bytearray()
    if name:
        for label in name.split(b"."):
            out.append(len(label))
            out += label
    out.append(0)
    return bytes(out)


def wire_record(owner: str, rtype: int, ttl: int, wire: bytes, text: str,
                covered: int = 0) -> ZoneRecord:
    """A record from its rdata wire bytes (DNSSEC types: written as they are, never
    compressed) and presentation ``text``; ``covered``: an RRSIG's type covered."""
    return ZoneRecord(owner, rtype, ttl, dns.UnknownRecord(wire, ttl), text, covered)


def rdata_parts(rtype: int, payload: Any) -> tuple[tuple[bool, bytes], ...]:
    """The rdata as ``(is_name, bytes)`` parts: names that RFC 1035 lets a server compress
    (CNAME, NS, PTR, MX exchange, SOA names) are kept apart; everything else is
    encoded once by twisted.names."""
    p = payload
    if rtype in (dns.CNAME, dns.NS, dns.PTR):
        return ((True, p.name.name),)
    if rtype == dns.MX:
        return ((False, struct.pack("!H", p.preference)), (True, p.name.name))
    if rtype == dns.SOA:
        return ((True, p.mname.name), (True, p.rname.name),
                (False, struct.pack("!IIIII", p.serial, p.refresh, p.retry, p.expire,
                                    p.minimum)))
    buf = io.BytesIO()
    p.encode(buf, None)
    return ((False, buf.getvalue()),)


def parse_record(rec: RecordOptions, origin: str, default_ttl: int, path: str) -> ZoneRecord:
    """Parse one configured record (``path`` names it in errors)."""
    owner = absolute_name(rec.name, origin, f"{path}.name", wildcard=True)
    if not in_zone(owner, origin):
        raise ConfigError(f"{path}.name", f"{_dname(owner)} is not inside zone {_dname(origin)}")
    ttl = default_ttl if rec.ttl is None else rec.ttl
    rtype = TYPE_CODES[rec.type]
    vpath = f"{path}.value"
    value = rec.value.strip()
    payload: Any
    if rtype == dns.A:
        try:
            addr = str(ipaddress.IPv4Address(value))
        except ValueError:
            raise ConfigError(vpath, f"not an IPv4 address: {value!r}") from None
        payload, text = dns.Record_A(addr, ttl), addr
    elif rtype == dns.AAAA:
        try:
            addr = ipaddress.IPv6Address(value).compressed
        except ValueError:
            raise ConfigError(vpath, f"not an IPv6 address: {value!r}") from None
        payload, text = dns.Record_AAAA(addr, ttl), addr
    elif rtype in (dns.CNAME, dns.NS, dns.PTR):
        target = absolute_name(value, origin, vpath)
        cls = {dns.CNAME: dns.Record_CNAME, dns.NS: dns.Record_NS, dns.PTR: dns.Record_PTR}[rtype]
        payload, text = cls(target.encode("ascii"), ttl), _dname(target)
    elif rtype == dns.MX:
        pref, host = _fields(value, vpath, 2, "10 mail.example.test.")
        prio = _int(pref, vpath, "MX preference", 65535)
        target = absolute_name(host.decode("utf-8"), origin, vpath)
        payload = dns.Record_MX(prio, target.encode("ascii"), ttl)
        text = f"{prio} {_dname(target)}"
    elif rtype == dns.TXT:
        strings = tokenize(value, vpath) if value.startswith('"') else [value.encode("utf-8")]
        chunks = [c for s in strings for c in split_txt(s)]
        size = sum(len(c) + 1 for c in chunks)
        if size > MAX_RDATA:
            raise ConfigError(vpath, f"TXT data of {size} bytes is too long for a DNS message "
                              f"(at most {MAX_RDATA})")
        payload = dns.Record_TXT(*chunks, ttl=ttl)
        text = " ".join(_quote(c) for c in chunks)
    elif rtype == dns.SRV:
        prio_t, weight_t, port_t, host = _fields(value, vpath, 4, "10 5 5060 sip.example.test.")
        prio = _int(prio_t, vpath, "SRV priority", 65535)
        weight = _int(weight_t, vpath, "SRV weight", 65535)
        port = _int(port_t, vpath, "SRV port", 65535)
        target = absolute_name(host.decode("utf-8"), origin, vpath)
        payload = dns.Record_SRV(prio, weight, port, target.encode("ascii"), ttl)
        text = f"{prio} {weight} {port} {_dname(target)}"
    elif rtype == CAA:
        tokens = tokenize(value, vpath)
        if len(tokens) < 3:
            raise ConfigError(vpath, f"expected '0 issue \"ca.example\"', got {value!r}")
        flags = _int(tokens[0], vpath, "CAA flags", 255)
        tag = tokens[1].decode("utf-8", "replace")
        if not _CAA_TAG.match(tag):
            raise ConfigError(vpath, f"invalid CAA tag {tag!r}")
        data = b" ".join(tokens[2:])
        payload = dns.UnknownRecord(bytes([flags, len(tag)]) + tag.encode("ascii") + data, ttl)
        text = f"{flags} {tag} {_quote(data)}"
    elif rtype in GENERIC_TYPES:
        try:
            rd = dp_rdata.from_text(dp_rdataclass.IN, dp_rdatatype.RdataType.make(rtype), value,
                                    origin=dp_name.from_text(origin or "."))
            wire = rd.to_wire()
        except (dp_exception.DNSException, ValueError, TypeError) as e:
            raise ConfigError(vpath, f"invalid {rec.type} value {value!r}: {e}") from None
        payload, text = dns.UnknownRecord(wire, ttl), rd.to_text()
    elif rtype == dns.SOA:
        raise AssertionError("SOA records are handled by build_zone_content")
    else:  # pragma: no cover - RECORD_TYPES and TYPE_CODES agree
        raise ConfigError(f"{path}.type", f"unsupported type {rec.type}")
    return ZoneRecord(owner, rtype, ttl, payload, text)


@dataclasses.dataclass(frozen=True)
class SoaFields:
    """The SOA of a zone minus the serial (``serial`` is the configured one, if any)."""

    mname: str
    rname: str
    refresh: int
    retry: int
    expire: int
    minimum: int
    ttl: int
    serial: Optional[int] = None


def _rname(value: str, origin: str, path: str) -> str:
    value = value.strip()
    if "@" in value:
        local, _, domain = value.partition("@")
        if "." in local:
            raise ConfigError(path, f"the mailbox {value!r} has a dot in its local part")
        return absolute_name(f"{local}.{domain.rstrip('.')}.", origin, path)
    return absolute_name(value, origin, path)


def parse_soa(rec: RecordOptions, origin: str, default_ttl: int, path: str) -> SoaFields:
    """A configured SOA: 'mname rname serial refresh retry expire minimum'."""
    vpath = f"{path}.value"
    tokens = _fields(rec.value, vpath, 7, "ns1 hostmaster 1 3600 600 604800 300")
    owner = absolute_name(rec.name, origin, f"{path}.name")
    if owner != origin:
        raise ConfigError(f"{path}.name", "the SOA must be at the zone apex '@'")
    mname = absolute_name(tokens[0].decode("utf-8"), origin, vpath)
    rname = _rname(tokens[1].decode("utf-8"), origin, vpath)
    nums = [_int(t, vpath, "SOA field", 0xFFFFFFFF) for t in tokens[2:]]
    return SoaFields(mname, rname, nums[1], nums[2], nums[3], nums[4],
                     default_ttl if rec.ttl is None else rec.ttl, serial=nums[0])


@dataclasses.dataclass(frozen=True)
class ZoneContent:
    """A zone's validated records and SOA fields, before a serial is chosen."""

    origin: str
    ttl: int
    records: tuple[ZoneRecord, ...]
    soa: SoaFields

    def fingerprint(self) -> str:
        """A digest of everything but the serial: equal digests, equal zones (computed once)."""
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return str(cached)
        h = hashlib.sha256()
        s = self.soa
        h.update(repr((self.origin, s.mname, s.rname, s.refresh, s.retry, s.expire, s.minimum,
                       s.ttl)).encode())
        for line in sorted(f"{r.owner} {r.ttl} {r.rtype} {r.text}" for r in self.records):
            h.update(line.encode("utf-8", "surrogateescape"))
            h.update(b"\n")
        object.__setattr__(self, "_fingerprint", h.hexdigest())
        return h.hexdigest()


def normalize_origin(origin: str, path: str) -> str:
    """``Example.Test.`` -> ``example.test`` (validated)."""
    return check_name(to_ascii(origin, path), path)


def build_zone_content(options: ZoneOptions, path: str,
                       extra: Iterable[RecordOptions] = (),
                       transient: Iterable[RecordOptions] = (),
                       published: Iterable[RecordOptions] = ()) -> ZoneContent:
    """Parse a configured zone plus ``extra`` records (skipped where they clash).

    An extra record is left out when the configured zone already has data of
    its kind at that name (an explicit MX, an SPF TXT, a TXT at a DKIM or
    DMARC name, any CNAME), so the operator's records always win.
    ``transient`` records (ACME challenge TXT values, several may share a
    name) are added as they are; ``published`` ones (TLSA and what other
    parts ask for, :mod:`dcrouter.dnsrecords`: several may share a name) are
    left out only where they clash with the configured records.
    """
    origin = normalize_origin(options.origin, f"{path}.origin")
    records: list[ZoneRecord] = []
    soa: Optional[SoaFields] = None
    for i, rec in enumerate(options.records):
        rpath = f"{path}.records[{i}]"
        if rec.type == "SOA":
            if soa is not None:
                raise ConfigError(rpath, "a zone has one SOA")
            soa = parse_soa(rec, origin, options.ttl, rpath)
            continue
        records.append(parse_record(rec, origin, options.ttl, rpath))
    configured = list(records)
    for rec in published:
        parsed = parse_record(rec, origin, options.ttl, f"{path}.(published record {rec.name})")
        if not _clashes(parsed, configured):
            records.append(parsed)
    for rec in extra:
        parsed = parse_record(rec, origin, options.ttl, f"{path}.(email record {rec.name})")
        if not _clashes(parsed, records):
            records.append(parsed)
    for rec in transient:
        records.append(parse_record(rec, origin, options.ttl,
                                    f"{path}.(challenge record {rec.name})"))
    if soa is None:
        mname = (absolute_name(options.primary_ns, origin, f"{path}.primary_ns")
                 if options.primary_ns else absolute_name("ns1", origin, path))
        rname = (_rname(options.admin_email, origin, f"{path}.admin_email")
                 if options.admin_email else absolute_name("hostmaster", origin, path))
        refresh, retry, expire, minimum = SOA_TIMERS
        soa = SoaFields(mname, rname, refresh, retry, expire, min(minimum, options.ttl),
                        options.ttl)
    if not any(r.owner == origin and r.rtype == dns.NS for r in records):
        records.append(ZoneRecord(origin, dns.NS, options.ttl,
                                  dns.Record_NS(soa.mname.encode("ascii"), options.ttl),
                                  _dname(soa.mname)))
    _check_cnames(records, origin, path)
    return ZoneContent(origin, options.ttl, tuple(records), soa)


def _clashes(new: ZoneRecord, records: Sequence[ZoneRecord]) -> bool:
    for r in records:
        if r.owner != new.owner:
            continue
        if r.rtype == dns.CNAME or new.rtype == dns.CNAME:
            return True
        if r.rtype == new.rtype == dns.TXT:
            if new.text.startswith('"v=spf1') and not r.text.startswith('"v=spf1'):
                continue
            return True
        if r.rtype == new.rtype:
            return True
    return False


def _check_cnames(records: Sequence[ZoneRecord], origin: str, path: str) -> None:
    by_owner: dict[str, list[ZoneRecord]] = {}
    for r in records:
        by_owner.setdefault(r.owner, []).append(r)
    for owner, recs in by_owner.items():
        cnames = [r for r in recs if r.rtype == dns.CNAME]
        if not cnames:
            continue
        if owner == origin:
            raise ConfigError(f"{path}.records", "a CNAME cannot be at the zone apex")
        if len(recs) > 1:
            raise ConfigError(f"{path}.records",
                              f"{_dname(owner)} has a CNAME and other records")


class Zone:
    """An indexed zone with its serial: what the authority answers from."""

    def __init__(self, content: ZoneContent, serial: int,
                 dnssec: Optional["DnssecData"] = None) -> None:
        self.content = content
        #: Set for a signed zone: NSEC chain, signatures, keys.
        self.dnssec = dnssec
        self.origin = content.origin
        self.serial = serial & 0xFFFFFFFF
        s = content.soa
        soa_payload = dns.Record_SOA(mname=s.mname.encode("ascii"), rname=s.rname.encode("ascii"),
                                     serial=self.serial, refresh=s.refresh, retry=s.retry,
                                     expire=s.expire, minimum=s.minimum, ttl=s.ttl)
        soa_text = (f"{_dname(s.mname)} {_dname(s.rname)} {self.serial} {s.refresh} {s.retry} "
                    f"{s.expire} {s.minimum}")
        self.soa = ZoneRecord(self.origin, dns.SOA, s.ttl, soa_payload, soa_text)
        #: SOA for negative answers: TTL is min(SOA TTL, minimum) (RFC 2308).
        self.negative_soa = ZoneRecord(self.origin, dns.SOA, min(s.ttl, s.minimum),
                                       soa_payload, soa_text)
        self.nodes: dict[str, dict[int, list[ZoneRecord]]] = {}
        extra = tuple(dnssec.records) if dnssec is not None else ()
        for rec in (self.soa,) + content.records + extra:
            self.nodes.setdefault(rec.owner, {}).setdefault(rec.rtype, []).append(rec)
        #: Every name that exists, including empty non-terminals (RFC 4592).
        self.names: set[str] = set()
        suffix_len = len(self.origin.split(".")) if self.origin else 0
        for owner in self.nodes:
            labels = owner.split(".") if owner else []
            for i in range(0, len(labels) - suffix_len + 1):
                self.names.add(".".join(labels[i:]))
        self.names.add(self.origin)
        #: Delegation points: names below the apex with NS records (RFC 1034 4.2.1).
        self.cuts: frozenset[str] = frozenset(
            owner for owner, node in self.nodes.items()
            if owner != self.origin and dns.NS in node)

    @property
    def records(self) -> list[ZoneRecord]:
        """SOA first, then the records in configuration order; in a signed zone then the
        DNSKEY, CDS, CDNSKEY and NSEC records and every signature."""
        if self.dnssec is None:
            return [self.soa, *self.content.records]
        sigs = [sig for group in self.dnssec.sigs.values() for sig in group]
        return [self.soa, *self.content.records, *self.dnssec.records, *sigs]

    @property
    def fingerprint(self) -> str:
        """A digest of everything but the serial (and the SOA's signatures)."""
        if self.dnssec is None:
            return self.content.fingerprint()
        return self.content.fingerprint() + ":" + self.dnssec.fingerprint

    def as_dict(self) -> dict:
        """For the API: origin, serial, records."""
        return {"origin": _dname(self.origin), "serial": self.serial,
                "records": [r.as_dict() for r in self.records]}

    def to_zone_file(self) -> str:
        """RFC 1035 master-file text of this zone (used to feed NSD in the benchmark)."""
        lines = [f"$ORIGIN {_dname(self.origin)}", f"$TTL {self.content.ttl}"]
        for r in self.records:
            lines.append(f"{_dname(r.owner)} {r.ttl} IN {r.type_name} {r.text}")
        return "\n".join(lines) + "\n"


class ZoneSet:
    """An immutable set of zones; the authority holds one and swaps it whole."""

    def __init__(self, zones: Iterable[Zone] = ()) -> None:
        self.zones: dict[str, Zone] = {z.origin: z for z in zones}
        self._depths = sorted({len(o.split(".")) if o else 0 for o in self.zones}, reverse=True)

    def find(self, name: str) -> Optional[Zone]:
        """The zone with the longest origin containing ``name``, or None."""
        labels = name.split(".") if name else []
        zones = self.zones
        for depth in self._depths:
            if depth > len(labels):
                continue
            zone = zones.get(".".join(labels[len(labels) - depth:]) if depth else "")
            if zone is not None:
                return zone
        return None

    def __iter__(self) -> Any:
        return iter(self.zones.values())

    def __len__(self) -> int:
        return len(self.zones)
