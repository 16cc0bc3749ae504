"""Zone transfers to secondary servers: AXFR (RFC 5936) and IXFR as a full transfer (RFC 1995).

Only over TCP (over UDP :class:`~dcrouter.dns.server.Responder` refuses
them) and only to clients in ``dns.allow_transfer``:

* :class:`TransferAcl` matches a client address against the configured
  networks (IPv4-mapped IPv6 addresses count as IPv4);
* :class:`TransferHandler` recognises a transfer query among the TCP queries
  and returns the response messages as a lazy iterator, so the TCP protocol
  encodes the next message only when the client has read the previous ones;
* :func:`transfer_messages` encodes a zone snapshot: the SOA, every record,
  the SOA again, packed into messages of about :data:`MESSAGE_SIZE` bytes
  (each with the question, AA set, names compressed within the message).

IXFR is answered with the whole zone, as RFC 1995 section 4 allows; a client
whose serial is already the current one gets the single current SOA.
Refused transfers are logged with the client address and counted.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

from twisted.names import dns

from dcrouter.dns.server import (MalformedQuery, Query, encode_record, parse_query,
                                 response_header)
from dcrouter.dns.zone import Zone, ZoneRecord
from dcrouter.logsetup import get_logger

log = get_logger("dns.transfer")

#: Target size of one transfer message. Compression pointers reach 16 KiB, so every name of
#: such a message can be compressed; a single larger record gets a message of its own.
MESSAGE_SIZE = 16384
#: The TCP message limit (the 2-byte length prefix).
MAX_MESSAGE = 65535
NOTAUTH = 9

#: Finds a served zone by its origin (lower case, no trailing dot).
ZoneLookup = Callable[[str], Optional[Zone]]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def normalize_address(host: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """``host`` as an address object; ``::ffff:a.b.c.d`` becomes IPv4; None when not an IP."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TransferAcl:
    """The networks allowed zone transfers (empty: nobody)."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        nets: list[Network] = []
        for text in networks:
            net = ipaddress.ip_network(text, strict=False)
            if isinstance(net, ipaddress.IPv6Network):
                mapped = net.network_address.ipv4_mapped
                if mapped is not None and net.prefixlen >= 96:  # ::ffff:a.b.c.d/120 → IPv4
                    net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}", strict=False)
            nets.append(net)
        self.networks: tuple[Network, ...] = tuple(nets)

    def allows(self, host: str) -> bool:
        """True when ``host`` lies in one of the networks."""
        addr = normalize_address(host)
        if addr is None:
            return False
        return any(addr.version == net.version and addr in net for net in self.networks)


def serial_newer(a: int, b: int) -> bool:
    """RFC 1982 serial arithmetic: ``a`` is newer than ``b``."""
    return a != b and ((a - b) & 0xFFFFFFFF) < 0x80000000


def _start(q: Query) -> tuple[bytearray, dict[bytes, int]]:
    """A message body holding the question, and the compression table that knows it."""
    out = bytearray(q.question)
    comp: dict[bytes, int] = {}
    offset = 12
    for i, label in enumerate(q.labels):
        comp.setdefault(b".".join(q.labels[i:]), offset)
        offset += 1 + len(label)
    return out, comp


def _finish(q: Query, body: bytearray, count: int, opt: bytes) -> bytes:
    header = response_header(q.id, q.flags1, dns.OK, True, False,
                             (1, count, 0, 1 if opt else 0), q.flags2)
    return header + bytes(body) + opt


def transfer_messages(q: Query, records: Sequence[ZoneRecord], opt: bytes = b"",
                      size: int = MESSAGE_SIZE) -> Iterator[bytes]:
    """Encode ``records`` (the SOA first and last) as response messages to ``q``, lazily.

    Raises :class:`ValueError` for a record that cannot fit a 65535-byte message.
    """
    body, comp = _start(q)
    count = 0
    room = size - 12 - len(opt)
    for rec in records:
        mark = len(body)
        encode_record(body, rec.owner.encode("ascii"), rec, comp)
        if len(body) <= room:
            count += 1
            continue
        # over the target size: close this message without the record, start the next
        if count:
            del body[mark:]
            yield _finish(q, body, count, opt)
            body, comp = _start(q)
            encode_record(body, rec.owner.encode("ascii"), rec, comp)
        if 12 + len(body) + len(opt) > MAX_MESSAGE:
            raise ValueError(f"a {rec.type_name} record at {rec.owner} does not fit a message")
        count = 1
        if len(body) > room:  # one large record: alone in its message
            yield _finish(q, body, count, opt)
            body, comp = _start(q)
            count = 0
    if count:
        yield _finish(q, body, count, opt)


class TransferHandler:
    """Answers AXFR and IXFR queries read over TCP, for allowed clients only.

    ``zones`` is called for the current zones by origin at each transfer, so
    a transfer serves one consistent snapshot even when the zones are
    swapped meanwhile.
    """

    def __init__(self, zones: ZoneLookup, acl: TransferAcl, udp_payload: int = 1232) -> None:
        self.zones = zones
        self.acl = acl
        #: The UDP size advertised in the OPT record of responses (as the responder's).
        self.udp_payload = udp_payload
        self.transfers = 0
        self.refused = 0
        self.up_to_date = 0

    def messages(self, data: bytes, client: str) -> Optional[Iterator[bytes]]:
        """The response messages when ``data`` is a transfer query, else None."""
        if len(data) < 12 or data[2] & 0x80 or (data[2] >> 3) & 0xF != dns.OP_QUERY:
            return None
        try:
            q = parse_query(data)
        except (MalformedQuery, struct.error):
            return None
        if q.qtype not in (dns.AXFR, dns.IXFR):
            return None
        kind = "AXFR" if q.qtype == dns.AXFR else "IXFR"
        name = b".".join(q.labels).decode("latin-1").lower()
        zone = self.zones(name) if not any(b"." in label for label in q.labels) else None
        if q.qclass not in (dns.IN, dns.ANY):
            return self._refuse(q, dns.EREFUSED, kind, name, client, "class is not IN")
        if zone is None:  # checked early, as NSD does (which zones exist is public anyway)
            return self._refuse(q, NOTAUTH, kind, name, client, "not a zone served here")
        if q.qclass != dns.IN:
            return self._refuse(q, dns.EREFUSED, kind, name, client, "class is not IN")
        if not self.acl.allows(client):
            return self._refuse(q, dns.EREFUSED, kind, name, client,
                                "client not in dns.allow_transfer")
        if q.tsig:
            return self._refuse(q, dns.EREFUSED, kind, name, client, "TSIG is not supported")
        opt = _opt(q, self.udp_payload)
        if (q.qtype == dns.IXFR and q.client_serial is not None
                and not serial_newer(zone.serial, q.client_serial)):
            self.up_to_date += 1
            log.info("IXFR {zone} from {client}: serial {serial} is current", zone=name or ".",
                     client=client, serial=zone.serial)
            return transfer_messages(q, [zone.soa], opt)
        self.transfers += 1
        records = zone.records
        log.info("{kind} {zone} serial {serial} to {client}: {count} records", kind=kind,
                 zone=name or ".", serial=zone.serial, client=client, count=len(records) + 1)
        return transfer_messages(q, records + [zone.soa], opt)

    def _refuse(self, q: Query, rcode: int, kind: str, name: str, client: str,
                reason: str) -> Iterator[bytes]:
        self.refused += 1
        log.warn("{kind} {zone} refused to {client}: {reason}", kind=kind, zone=name or ".",
                 client=client, reason=reason, event="dns.transfer_refused")
        opt = _opt(q, self.udp_payload)
        header = response_header(q.id, q.flags1, rcode, False, False,
                                 (1, 0, 0, 1 if opt else 0), q.flags2)
        return iter([header + q.question + opt])

    def stats(self) -> dict:
        """Transfers served, refused, and IXFRs answered 'current'."""
        return {"transfers": self.transfers, "transfers_refused": self.refused,
                "transfers_up_to_date": self.up_to_date}


def _opt(q: Query, udp_payload: int) -> bytes:
    """The OPT record of a response to an EDNS query (payload: what UDP answers may be)."""
    if not q.edns:
        return b""
    return b"\x00" + struct.pack("!HHBBHH", dns.OPT, udp_payload, 0, 0,
                                 0x8000 if q.dnssec_ok else 0, 0)

