"""The query engine: wire bytes in, wire bytes out, for UDP and TCP alike.

:class:`Responder` parses a query with a small strict parser (the question
must be one uncompressed name; at most one OPT record; every length is
checked against the packet, so truncated packets, compression-pointer loops,
thousands of questions or records cannot make it loop or allocate), asks the
:class:`~dcrouter.dns.authority.Authority` and encodes the answer with
twisted.names' record encoders:

* the question is echoed byte for byte (case preserved, RFC 4343);
* EDNS(0) (RFC 6891): the UDP limit is the client's payload size, at least
  512 and at most ``dns.max_udp_payload``; DO is copied and, for signed
  zones, adds signatures and NSEC proofs (RFC 3225, RFC 4035); a version
  other than 0 gets BADVERS;
* over the limit additional RRsets (each with its RRSIGs) are left out from
  the last one that does not fit (TC is set when that drops in-domain glue of a referral, RFC
  9471); if the answer and authority sections do not fit, the response is
  the question with TC set, so the client retries over TCP, where the whole
  answer is sent;
* QCLASS ANY is answered like IN but without AA, and without the SOA of
  negative answers (RFC 1035 6.2, as NSD does); a name with a dot inside a
  label (``a\\.b.example.test``) is a name no zone holds: NXDOMAIN, or what
  a wildcard or delegation above it gives;
* malformed queries get FORMERR when their header can be read, responses
  (QR set) and runts are dropped, other opcodes get NOTIMP, other classes
  REFUSED; AXFR over UDP gets NOTIMP, a transfer of a name that is not a
  zone apex NOTAUTH, IXFR over UDP REFUSED (all as NSD); every other type,
  meta and reserved ones included, is looked up like any type.

UDP responses are cached per query bytes after the ID (which include the
name as spelled, the type, the flags and the OPT record): a zone swap
starts a new cache, so a cached answer never outlives its zone data.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import Counter
from typing import Optional

from twisted.names import dns

from dcrouter.dns.authority import Answer, Authority, Entry
from dcrouter.dns.zone import ZoneRecord, type_name

#: Largest TCP query accepted; longer length prefixes close the connection.
MAX_TCP_QUERY = 16384
#: Cached UDP responses at most; the cache starts over when full.
CACHE_ENTRIES = 10000
#: Queries longer than this are answered but not cached.
CACHE_KEY_MAX = 512
EDNS_BADVERS = 16
NOTAUTH = 9
TSIG = 250
#: The owner that stands for the query name when one of its labels holds a dot: a key
#: no joined name can equal (labels are never empty), seeded to the question's offset.
QNAME_KEY = b"."
_HEADER = struct.Struct("!HBBHHHH")
_OPT = struct.Struct("!HHBBHH")
_RCODE_NAMES = {dns.OK: "NOERROR", dns.EFORMAT: "FORMERR", dns.ESERVER: "SERVFAIL",
                dns.ENAME: "NXDOMAIN", dns.ENOTIMP: "NOTIMP", dns.EREFUSED: "REFUSED",
                NOTAUTH: "NOTAUTH", EDNS_BADVERS: "BADVERS"}


def write_name(out: bytearray, name: bytes, comp: dict[bytes, int]) -> None:
    """Append ``name`` (dotted bytes) with RFC 1035 compression against ``comp``.

    Offsets a pointer cannot hold (past 16 KiB, in large TCP answers) are
    not remembered, so later names are written in full rather than wrongly.
    """
    while name:
        known = comp.get(name)
        if known is not None:
            out.append(0xC0 | known >> 8)
            out.append(known & 0xFF)
            return
        position = len(out) + 12
        if position <= 0x3FFF:
            comp[name] = position
        label, _dot, name = name.partition(b".")
        out.append(len(label))
        out += label
    out.append(0)


def encode_record(out: bytearray, owner: bytes, rec: ZoneRecord,
                  comp: dict[bytes, int]) -> None:
    """Append ``rec`` with owner ``owner`` to the message body ``out`` (names compressed)."""
    write_name(out, owner, comp)
    out += rec.fixed
    at = len(out)
    out += b"\x00\x00"
    for is_name, part in rec.parts:
        if is_name:
            write_name(out, part, comp)
        else:
            out += part
    struct.pack_into("!H", out, at, len(out) - at - 2)


def _last_dotted(labels: list[bytes]) -> int:
    """The index of the last label with a dot in it, or -1."""
    for i in range(len(labels) - 1, -1, -1):
        if b"." in labels[i]:
            return i
    return -1


class MalformedQuery(ValueError):
    """A query that cannot be parsed (answered with FORMERR)."""


class Query:
    """A parsed query: the question and EDNS parameters."""

    __slots__ = ("id", "flags1", "flags2", "question", "labels", "qtype", "qclass",
                 "edns", "payload", "version", "dnssec_ok", "client_serial", "tsig")

    def __init__(self) -> None:
        self.id = 0
        self.flags1 = 0
        self.flags2 = 0
        self.question = b""
        self.labels: list[bytes] = []
        self.qtype = 0
        self.qclass = 0
        self.edns = False
        self.payload = 512
        self.version = 0
        self.dnssec_ok = False
        #: The serial of the SOA in the authority section of an IXFR query (RFC 1995).
        self.client_serial: Optional[int] = None
        #: A TSIG record was present (not supported: such transfers are refused).
        self.tsig = False


def _skip_name(data: bytes, pos: int) -> int:
    """Offset after a (possibly compressed) name; never follows pointers."""
    end = len(data)
    while True:
        if pos >= end:
            raise MalformedQuery("truncated name")
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > end:
                raise MalformedQuery("truncated pointer")
            return pos + 2
        if length & 0xC0:
            raise MalformedQuery("bad label type")
        pos += 1 + length


def parse_query(data: bytes) -> Query:
    """Parse a query; raises :class:`MalformedQuery` (the header is valid when it does)."""
    q = Query()
    q.id, q.flags1, q.flags2, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if qdcount != 1:
        raise MalformedQuery(f"{qdcount} questions")
    pos, end, total = 12, len(data), 0
    labels = []
    while True:
        if pos >= end:
            raise MalformedQuery("truncated question")
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length & 0xC0:
            raise MalformedQuery("compressed or extended label in the question")
        total += length + 1
        if total > 254 or pos + 1 + length > end:
            raise MalformedQuery("name too long or truncated")
        labels.append(data[pos + 1:pos + 1 + length])
        pos += 1 + length
    if pos + 4 > end:
        raise MalformedQuery("truncated question")
    q.qtype, q.qclass = struct.unpack_from("!HH", data, pos)
    pos += 4
    q.question = data[12:pos]
    q.labels = labels
    if ancount or (nscount and not (q.qtype == dns.IXFR and nscount == 1)):
        raise MalformedQuery("records in the answer or authority section of a query")
    if nscount:  # IXFR: the client's SOA; its serial is 20 bytes before the rdata's end
        pos = _skip_name(data, pos)
        if pos + 10 > end:
            raise MalformedQuery("truncated authority record")
        rtype, _rclass, _ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10 + rdlen
        if rtype != dns.SOA or rdlen < 22 or pos > end:
            raise MalformedQuery("IXFR without a valid SOA in the authority section")
        (q.client_serial,) = struct.unpack_from("!I", data, pos - 20)
    for _ in range(arcount):
        start = pos
        pos = _skip_name(data, pos)
        if pos + 10 > end:
            raise MalformedQuery("truncated additional record")
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10 + rdlen
        if pos > end:
            raise MalformedQuery("truncated rdata")
        if rtype == TSIG:
            q.tsig = True
        elif rtype == dns.OPT:
            if q.edns or data[start] != 0:
                raise MalformedQuery("more than one OPT, or OPT not at the root")
            q.edns = True
            q.payload = rclass
            q.version = (ttl >> 16) & 0xFF
            q.dnssec_ok = bool(ttl & 0x8000)
    return q


def response_header(qid: int, flags1: int, rcode: int, aa: bool, tc: bool,
                    counts: tuple[int, int, int, int], flags2: int = 0) -> bytes:
    """The 12-byte header of a response to a query with ``flags1`` (opcode and RD kept)."""
    opcode_rd = flags1 & 0x79  # opcode and RD from the query; RA stays clear
    byte3 = 0x80 | opcode_rd | (0x04 if aa else 0) | (0x02 if tc else 0)
    return _HEADER.pack(qid, byte3, (flags2 & 0x10) | (rcode & 0xF), *counts)


class Responder:
    """Turns query bytes into response bytes; holds the cache and the counters."""

    def __init__(self, authority: Authority, max_udp_payload: int = 1232) -> None:
        self.authority = authority
        self.max_udp_payload = max(512, max_udp_payload)
        self.cache: dict[bytes, tuple[bytes, int, int]] = {}
        self.by_rcode: Counter[int] = Counter()
        self.by_type: Counter[int] = Counter()
        self.dropped = 0
        self.malformed = 0
        self.truncated = 0

    def set_authority(self, authority: Authority) -> None:
        """Swap the zone data atomically; the next query sees the new data."""
        self.authority = authority
        self.cache = {}

    def handle_udp(self, data: bytes) -> Optional[bytes]:
        """The response to a UDP datagram, or None to send nothing."""
        key = data[2:]
        hit = self.cache.get(key)
        if hit is not None:
            tail, rcode, qtype = hit
            self.by_rcode[rcode] += 1
            self.by_type[qtype] += 1
            if tail[0] & 0x02:
                self.truncated += 1
            return data[:2] + tail
        out = self._respond(data, udp=True)
        if out is None:
            return None
        response, rcode, qtype = out
        if len(data) <= CACHE_KEY_MAX and rcode != dns.EFORMAT:
            cache = self.cache
            if len(cache) >= CACHE_ENTRIES:
                cache.clear()
            cache[key] = (response[2:], rcode, qtype)
        return response

    def handle_tcp(self, data: bytes) -> Optional[bytes]:
        """The response to a query read from TCP, or None."""
        out = self._respond(data, udp=False)
        return None if out is None else out[0]

    def slip_response(self, data: bytes) -> Optional[bytes]:
        """A TC answer to ``data`` with no records (rate-limit slip), never longer than it."""
        if len(data) < 12 or data[2] & 0x80 or (data[2] >> 3) & 0xF != dns.OP_QUERY:
            return None
        try:
            q = parse_query(data)
        except (MalformedQuery, struct.error):
            return None
        opt = self._opt(q, 0) if q.edns else b""
        response = (response_header(q.id, q.flags1, dns.OK, False, True,
                                    (1, 0, 0, 1 if opt else 0), q.flags2) + q.question + opt)
        return response if len(response) <= len(data) else None

    def _respond(self, data: bytes, udp: bool) -> Optional[tuple[bytes, int, int]]:
        if len(data) < 12 or data[2] & 0x80:
            self.dropped += 1
            return None
        qid, flags1 = struct.unpack_from("!HB", data)
        if (flags1 >> 3) & 0xF != dns.OP_QUERY:
            return self._count(response_header(qid, flags1, dns.ENOTIMP, False, False,
                                               (0, 0, 0, 0)), dns.ENOTIMP, 0)
        try:
            q = parse_query(data)
        except (MalformedQuery, struct.error):
            self.malformed += 1
            return self._count(response_header(qid, flags1, dns.EFORMAT, False, False,
                                               (0, 0, 0, 0)), dns.EFORMAT, 0)
        if q.edns and q.version != 0:
            q.dnssec_ok = False  # nothing of the query is answered, DO neither (as NSD)
            return self._count(self._encode(q, Answer(EDNS_BADVERS, False), 65535),
                               EDNS_BADVERS, q.qtype)
        if udp:
            limit = min(max(q.payload, 512), self.max_udp_payload) if q.edns else 512
        else:
            limit = 65535
        answer = self._answer(q, udp)
        return self._count(self._encode(q, answer, limit), answer.rcode, q.qtype)

    def _answer(self, q: Query, udp: bool) -> Answer:
        if q.qclass not in (dns.IN, dns.ANY):
            return Answer(dns.EREFUSED, False)
        if q.qtype in (dns.AXFR, dns.IXFR):
            return self._transfer_refusal(q, udp)
        labels = q.labels
        dotted = _last_dotted(labels) if b"." in q.question else -1
        if dotted < 0:
            owner = b".".join(labels)
            name = owner.lower().decode("latin-1")
        else:
            # a label with a dot in it (a\.b.example.test): such a name exists in no zone,
            # nor does any name below it; look up a stand-in no zone can hold in its place
            # (so wildcards and delegations above it still apply) and write the owner as a
            # pointer to the question, which keeps the label as sent
            owner = QNAME_KEY
            name = ".".join(["\x00"] + [x.lower().decode("latin-1")
                                          for x in labels[dotted + 1:]])
        qkey = None
        if dotted >= 0 and q.dnssec_ok:  # NSEC proofs need the name's real sort key
            qkey = tuple(reversed([x.lower() for x in labels]))
        answer = self.authority.lookup(name, q.qtype, owner, q.dnssec_ok, qkey)
        if q.qclass == dns.ANY:
            # RFC 1035 6.2: an answer for every class cannot be authoritative (NSD clears
            # AA too), and a negative one has no SOA to cache
            answer = dataclasses.replace(answer, authoritative=False, authority=[
                e for e in answer.authority
                if e[1].rtype != dns.SOA and e[1].covered != dns.SOA])
        return answer

    def _transfer_refusal(self, q: Query, udp: bool) -> Answer:
        """Transfers are served over TCP (:mod:`dcrouter.dns.transfer`); what reaches the
        responder gets NSD's answers: AXFR over UDP NOTIMP (RFC 5936 4.2), a name that is
        not a zone's apex NOTAUTH, the rest REFUSED."""
        if udp and q.qtype == dns.AXFR:
            return Answer(dns.ENOTIMP, False)
        name = b".".join(q.labels).lower().decode("latin-1")
        if name not in self.authority.zones.zones or _last_dotted(q.labels) >= 0:
            return Answer(NOTAUTH, False)
        return Answer(dns.EREFUSED, False)

    def _count(self, response: bytes, rcode: int, qtype: int) -> tuple[bytes, int, int]:
        self.by_rcode[rcode] += 1
        self.by_type[qtype] += 1
        return response, rcode, qtype

    def _opt(self, q: Query, rcode: int) -> bytes:
        return b"\x00" + _OPT.pack(dns.OPT, self.max_udp_payload, rcode >> 4, 0,
                                   0x8000 if q.dnssec_ok else 0, 0)

    def _encode(self, q: Query, answer: Answer, limit: int) -> bytes:
        """The response within ``limit`` bytes.

        The answer and authority sections go whole or not at all (TC and only
        the question); additional RRsets follow in order while they fit, and
        TC is set when one of the ``required`` in-domain glue records of a
        referral is left out (RFC 9471); other additional data is optional
        (RFC 2181 section 9).
        """
        opt = self._opt(q, answer.rcode) if q.edns else b""
        room = limit - 12 - len(opt)
        out, comp = self._start(q)
        for section in (answer.answers, answer.authority):
            for owner, rec in section:
                encode_record(out, owner, rec, comp)
        counts = [1, len(answer.answers), len(answer.authority), 0]
        tc = len(out) > room
        if tc:
            out = bytearray(q.question)
            counts = [1, 0, 0, 0]
        else:
            additional = answer.additional
            i, n = 0, len(additional)
            while i < n:
                owner, rec = additional[i]
                j = i + 1
                while j < n and additional[j][0] == owner and (
                        additional[j][1].rtype == rec.rtype or
                        additional[j][1].covered == rec.rtype):  # an RRset and its RRSIGs
                    j += 1
                mark = len(out)
                for k in range(i, j):
                    encode_record(out, additional[k][0], additional[k][1], comp)
                if len(out) > room:  # this RRset does not fit: it and the rest stay out
                    del out[mark:]
                    break
                i = j
            counts[3] = i
            tc = i < answer.required
        if tc:
            self.truncated += 1
        if opt:
            counts[3] += 1
        return (response_header(q.id, q.flags1, answer.rcode, answer.authoritative, tc,
                                (counts[0], counts[1], counts[2], counts[3]), q.flags2)
                + bytes(out) + opt)

    @staticmethod
    def _start(q: Query) -> tuple[bytearray, dict[bytes, int]]:
        """The message body so far (the question) and the compression table seeded with
        the question's names as spelled and in lower case (not those that include a
        label with a dot in it: the query name itself is then known as
        :data:`QNAME_KEY`)."""
        out = bytearray(q.question)
        comp: dict[bytes, int] = {}
        offset = 12
        labels = q.labels
        first = _last_dotted(labels) + 1 if b"." in q.question else 0
        if first:
            comp[QNAME_KEY] = offset
        for i, label in enumerate(labels):
            if i >= first:
                suffix = b".".join(labels[i:])
                comp.setdefault(suffix, offset)
                # zone data is lower case: let it point into a question spelled otherwise,
                # as NSD does (names compare without case), so answers are as small
                comp.setdefault(suffix.lower(), offset)
            offset += 1 + len(label)
        return out, comp

    def stats(self) -> dict:
        """Queries by rcode and type, malformed, dropped and truncated counts."""
        return {
            "queries": sum(self.by_rcode.values()),
            "queries_by_rcode": {_RCODE_NAMES.get(k, str(k)): v for k, v in self.by_rcode.items()},
            "queries_by_type": {type_name(k): v for k, v in self.by_type.items()},
            "malformed": self.malformed,
            "dropped": self.dropped,
            "truncated": self.truncated,
            "cached_answers": len(self.cache),
        }
