"""NOTIFY (RFC 1996): tell secondary servers that a zone's serial changed.

:class:`Notifier` keeps, for every zone and every ``dns.notify`` target, the
serial last announced.  When the served zones change it sends a NOTIFY
(opcode 4, AA set, the zone's SOA as question and the new SOA in the answer
section) over UDP to each target whose announced serial differs, and sends
it again after :attr:`Notifier.delays` seconds until a reply with the same
ID, opcode and question arrives from that target.  A newer serial replaces
a NOTIFY still waiting for its reply.  Everything runs on the reactor:
datagrams and timers, nothing blocks.

The datagrams leave from ``dns.listen`` when it is a specific address of the
target's family (secondaries usually accept NOTIFY from the primary's
address only), else from the wildcard address, on an ephemeral port.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import secrets
import struct
from typing import Any, Iterable, Optional, Sequence

from twisted.internet.protocol import DatagramProtocol
from twisted.names import dns

from dcrouter.config.base import split_host_port
from dcrouter.dns.server import response_header, write_name
from dcrouter.dns.server import encode_record
from dcrouter.dns.transfer import normalize_address
from dcrouter.dns.zone import Zone
from dcrouter.logsetup import get_logger

log = get_logger("dns.notify")

#: Seconds before each resend (RFC 1996 leaves the interval to the primary).
DELAYS = (1.0, 2.0, 4.0, 8.0)
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
           5: "REFUSED", 9: "NOTAUTH"}


@dataclasses.dataclass(frozen=True)
class Target:
    """A secondary: address (normalised text) and port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Target":
        """``IP:port``, ``[IPv6]:port`` or a bare IP (port 53)."""
        host, port = split_host_port(text, "dns.notify", default_port=53)
        addr = normalize_address(host)
        if addr is None:
            raise ValueError(f"not an IP address: {host!r}")
        return cls(str(addr), port)

    @property
    def family(self) -> int:
        """4 or 6."""
        return ipaddress.ip_address(self.host).version

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def notify_message(qid: int, zone: Zone) -> bytes:
    """A NOTIFY for ``zone``: SOA question, the current SOA in the answer section, AA set."""
    name = zone.origin.encode("ascii")
    labels = b"".join(bytes([len(p)]) + p for p in name.split(b".") if p) + b"\x00"
    question = labels + struct.pack("!HH", dns.SOA, dns.IN)
    body = bytearray(question)
    comp: dict[bytes, int] = {}
    if name:
        comp[name] = 12
    encode_record(body, name, zone.soa, comp)
    # response_header sets QR; a NOTIFY request has it clear.
    header = bytearray(response_header(qid, dns.OP_NOTIFY << 3, dns.OK, True, False,
                                       (1, 1, 0, 0)))
    header[2] &= 0x7F
    return bytes(header) + bytes(body)


@dataclasses.dataclass
class _Pending:
    qid: int
    origin: str
    serial: int
    message: bytes
    attempts: int = 0
    call: Any = None


class _NotifyProtocol(DatagramProtocol):
    """The UDP socket NOTIFYs leave from; replies go to the notifier."""

    noisy = False

    def __init__(self, notifier: "Notifier") -> None:
        self.notifier = notifier

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """A reply (or anything else) from a secondary."""
        self.notifier.reply_received(datagram, addr[0], addr[1])


class Notifier:
    """Sends NOTIFY to the secondaries whenever a zone's serial changes, with retries."""

    def __init__(self, reactor: Any, targets: Sequence[str] = (), source: str = "",
                 delays: Sequence[float] = DELAYS) -> None:
        self.reactor = reactor
        self.delays = tuple(delays)
        self.targets: tuple[Target, ...] = tuple(Target.parse(t) for t in targets)
        self.source = source
        self.announced: dict[tuple[str, Target], int] = {}
        self.pending: dict[tuple[str, Target], _Pending] = {}
        #: The last NOTIFY per (zone, target): serial, result, when (for the console).
        self.results: dict[tuple[str, Target], dict[str, Any]] = {}
        self.ports: dict[int, Any] = {}
        self.sent = 0
        self.acknowledged = 0
        self.rejected = 0
        self.failed = 0

    def configure(self, targets: Sequence[str], source: str) -> None:
        """New targets (those dropped are forgotten) and source address."""
        self.targets = tuple(Target.parse(t) for t in targets)
        keep = set(self.targets)
        for key in [k for k in self.announced if k[1] not in keep]:
            del self.announced[key]
            self.results.pop(key, None)
        for key in [k for k in self.pending if k[1] not in keep]:
            self._cancel(key)
        if source != self.source:
            self.source = source
            self._close_ports()

    def zones_changed(self, zones: Iterable[Zone]) -> None:
        """Announce every zone whose serial a target has not been told yet."""
        current = {z.origin: z for z in zones}
        for key in [k for k in self.announced if k[0] not in current]:
            del self.announced[key]
            self.results.pop(key, None)
        for key in [k for k in self.pending if k[0] not in current]:
            self._cancel(key)
        for zone in current.values():
            for target in self.targets:
                key = (zone.origin, target)
                if self.announced.get(key) != zone.serial:
                    self.announced[key] = zone.serial
                    self._start(key, zone)

    def _start(self, key: tuple[str, Target], zone: Zone) -> None:
        self._cancel(key)
        qid = secrets.randbelow(0x10000)
        pending = _Pending(qid, zone.origin, zone.serial, notify_message(qid, zone))
        self.pending[key] = pending
        self._result(key, zone.serial, "pending")
        self._send(key, pending)

    def _result(self, key: tuple[str, Target], serial: int, result: str) -> None:
        self.results[key] = {"zone": key[0] or ".", "target": str(key[1]), "serial": serial,
                             "result": result, "at": self.reactor.seconds()}

    def _send(self, key: tuple[str, Target], pending: _Pending) -> None:
        target = key[1]
        pending.attempts += 1
        try:
            self._port(target.family).write(pending.message, (target.host, target.port))
            self.sent += 1
        except Exception as e:  # unreachable network, no IPv6: count it as a lost datagram
            log.warn("cannot send NOTIFY {zone} to {target}: {error}", zone=pending.origin or ".",
                     target=str(target), error=str(e))
        if pending.attempts > len(self.delays):
            pending.call = self.reactor.callLater(self.delays[-1] if self.delays else 1.0,
                                                  self._give_up, key, pending)
        else:
            pending.call = self.reactor.callLater(self.delays[pending.attempts - 1],
                                                  self._send_again, key, pending)

    def _send_again(self, key: tuple[str, Target], pending: _Pending) -> None:
        if self.pending.get(key) is pending:
            self._send(key, pending)

    def _give_up(self, key: tuple[str, Target], pending: _Pending) -> None:
        if self.pending.get(key) is not pending:
            return
        del self.pending[key]
        self.failed += 1
        self._result(key, pending.serial, f"no reply after {pending.attempts} tries")
        log.warn("NOTIFY {zone} serial {serial} to {target}: no reply after {attempts} tries",
                 zone=pending.origin or ".", serial=pending.serial, target=str(key[1]),
                 attempts=pending.attempts)

    def reply_received(self, data: bytes, host: str, port: int) -> None:
        """Match a reply to its NOTIFY by sender, ID, opcode and question."""
        if len(data) < 12 or not data[2] & 0x80 or (data[2] >> 3) & 0xF != dns.OP_NOTIFY:
            return
        addr = normalize_address(host)
        (qid,) = struct.unpack_from("!H", data)
        for key, pending in self.pending.items():
            target = key[1]
            if (pending.qid != qid or target.port != port or addr is None
                    or str(addr) != target.host):
                continue
            question_end = pending.message.index(b"\x00", 12) + 5
            qdcount = struct.unpack_from("!H", data, 4)[0]
            if qdcount and data[12:question_end].lower() != pending.message[12:question_end]:
                return  # the reply is about another question: not ours
            self._cancel(key)
            rcode = data[3] & 0xF
            self._result(key, pending.serial, "acknowledged" if rcode == dns.OK
                         else _RCODES.get(rcode, str(rcode)))
            if rcode == dns.OK:
                self.acknowledged += 1
                log.info("NOTIFY {zone} serial {serial} acknowledged by {target}",
                         zone=pending.origin or ".", serial=pending.serial, target=str(target))
            else:
                self.rejected += 1
                log.warn("NOTIFY {zone} serial {serial} answered {rcode} by {target}",
                         zone=pending.origin or ".", serial=pending.serial, target=str(target),
                         rcode=_RCODES.get(rcode, str(rcode)))
            return

    def _cancel(self, key: tuple[str, Target]) -> None:
        pending = self.pending.pop(key, None)
        if pending is not None and pending.call is not None and pending.call.active():
            pending.call.cancel()

    def _port(self, family: int) -> Any:
        port = self.ports.get(family)
        if port is None:
            interface = "::" if family == 6 else ""
            source = normalize_address(self.source) if self.source else None
            if source is not None and source.version == family and not source.is_unspecified:
                interface = str(source)
            port = self.reactor.listenUDP(0, _NotifyProtocol(self), interface=interface)
            self.ports[family] = port
        return port

    def _close_ports(self) -> Optional[Any]:
        ports, self.ports = list(self.ports.values()), {}
        for port in ports:
            port.stopListening()
        return None

    def stop(self) -> None:
        """Cancel every retry and close the sockets."""
        for key in list(self.pending):
            self._cancel(key)
        self._close_ports()

    def stats(self) -> dict:
        """NOTIFY datagrams sent, replies (NOERROR or not), gave up, waiting, and the last
        result per zone and target."""
        return {"notify_sent": self.sent, "notify_acknowledged": self.acknowledged,
                "notify_rejected": self.rejected, "notify_failed": self.failed,
                "notify_pending": len(self.pending),
                "notify_last": [dict(r) for _k, r in sorted(self.results.items(),
                                                             key=lambda kv: (kv[0][0],
                                                                             str(kv[0][1])))]}
