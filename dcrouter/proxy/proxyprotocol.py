"""The PROXY protocol (HAProxy's, versions 1 and 2): keeping client addresses across proxies.

* :func:`encode_v1` / :func:`encode_v2` build the header the proxy sends to a
  target when a route sets ``send_proxy_protocol``.
* :class:`ProxyHeaderParser` reads a v1 or v2 header from a trusted load
  balancer (``proxy_ips``) before anything else on the connection.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Optional

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107

NEED_MORE = "need-more"
DONE = "done"
INVALID = "invalid"

Address = tuple[str, int]


def _pair(src: Address, dst: Address) -> tuple[Any, Any]:
    s = ipaddress.ip_address(src[0].split("%")[0])
    d = ipaddress.ip_address(dst[0].split("%")[0])
    if s.version != d.version:
        s = s if s.version == 6 else ipaddress.IPv6Address(f"::ffff:{s}")
        d = d if d.version == 6 else ipaddress.IPv6Address(f"::ffff:{d}")
    return s, d


def encode_v1(src: Address, dst: Address) -> bytes:
    """``PROXY TCP4 1.2.3.4 5.6.7.8 1234 443\\r\\n``."""
    s, d = _pair(src, dst)
    family = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {family} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(src: Address, dst: Address) -> bytes:
    """The binary v2 header (command PROXY, stream transport)."""
    s, d = _pair(src, dst)
    if s.version == 4:
        fam, body = 0x11, s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    else:
        fam, body = 0x21, s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(body)) + body


def encode(version: str, src: Address, dst: Address) -> bytes:
    """``encode_v1`` or ``encode_v2`` by name."""
    return encode_v1(src, dst) if version == "v1" else encode_v2(src, dst)


class ProxyHeaderParser:
    """Incremental reader of one PROXY header.

    After :data:`DONE`, ``source``/``destination`` are the addresses it
    carried (None for ``UNKNOWN``/``LOCAL``) and ``rest`` the bytes after it.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.state = NEED_MORE
        self.source: Optional[Address] = None
        self.destination: Optional[Address] = None
        self.rest = b""
        self.error = ""

    def feed(self, data: bytes) -> str:
        """Add bytes; returns the new state."""
        if self.state != NEED_MORE:
            return self.state
        self.buffer += data
        head = self.buffer[:len(V2_SIGNATURE)]
        if V2_SIGNATURE.startswith(head):
            if len(self.buffer) >= len(V2_SIGNATURE):
                return self._v2()
            return self.state
        if b"PROXY "[:len(head)] != head[:6]:
            return self._fail("no PROXY header")
        return self._v1()

    def _fail(self, why: str) -> str:
        self.state = INVALID
        self.error = why
        return self.state

    def _v1(self) -> str:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            if len(self.buffer) > V1_MAX:
                return self._fail("PROXY v1 line too long")
            return self.state
        line = self.buffer[:end].decode("ascii", "replace")
        self.rest = self.buffer[end + 2:]
        parts = line.split(" ")
        if len(parts) >= 2 and parts[1] == "UNKNOWN":
            self.state = DONE
            return self.state
        if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
            return self._fail("malformed PROXY v1 line")
        try:
            src = ipaddress.ip_address(parts[2])
            dst = ipaddress.ip_address(parts[3])
            sport, dport = int(parts[4]), int(parts[5])
        except ValueError:
            return self._fail("malformed PROXY v1 addresses")
        if not (0 <= sport <= 65535 and 0 <= dport <= 65535):
            return self._fail("PROXY v1 port out of range")
        self.source = (str(src), sport)
        self.destination = (str(dst), dport)
        self.state = DONE
        return self.state

    def _v2(self) -> str:
        if len(self.buffer) < 16:
            return self.state
        ver_cmd, fam, length = struct.unpack("!BBH", self.buffer[12:16])
        if ver_cmd >> 4 != 2:
            return self._fail("PROXY v2 with a bad version")
        if len(self.buffer) < 16 + length:
            return self.state
        body = self.buffer[16:16 + length]
        self.rest = self.buffer[16 + length:]
        command = ver_cmd & 0x0F
        self.state = DONE
        if command == 0:        # LOCAL: the balancer's own health check
            return self.state
        if command != 1:
            return self._fail("PROXY v2 with an unknown command")
        if fam == 0x11 and length >= 12:
            src4, dst4 = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
            sport, dport = struct.unpack("!HH", body[8:12])
            self.source, self.destination = (str(src4), sport), (str(dst4), dport)
        elif fam == 0x21 and length >= 36:
            src6, dst6 = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
            sport, dport = struct.unpack("!HH", body[32:36])
            self.source, self.destination = (str(src6), sport), (str(dst6), dport)
        return self.state
