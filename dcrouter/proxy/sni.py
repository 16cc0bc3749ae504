"""An incremental TLS ClientHello reader: the server name, without terminating TLS.

:class:`ClientHelloParser` is fed bytes as they arrive.  It copes with TLS
records split over several TCP segments and with a ClientHello spread over
several handshake records, and gives up on anything that is not TLS or that
grows past :data:`MAX_CLIENT_HELLO` bytes.  It never answers the client; the
caller closes the connection on :data:`NOT_TLS`.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Optional, Union

#: Largest ClientHello (handshake body) accepted.
MAX_CLIENT_HELLO = 16 * 1024

NEED_MORE = "need-more"
DONE = "done"
NOT_TLS = "not-tls"

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010


@dataclasses.dataclass
class ClientHello:
    """What the proxy needs from a ClientHello."""

    server_name: Optional[str]
    alpn: tuple[str, ...] = ()


class ClientHelloParser:
    """Feed bytes with :meth:`feed` until it returns :data:`DONE` or :data:`NOT_TLS`.

    ``buffered`` holds every byte fed so far (to replay to a backend or a TLS
    engine); ``hello`` is set once the state is :data:`DONE`; ``error``
    says why the bytes are not a usable ClientHello.
    """

    def __init__(self, max_size: int = MAX_CLIENT_HELLO) -> None:
        self.max_size = max_size
        self.buffered = bytearray()
        self._offset = 0            # bytes of self.buffered consumed as whole records
        self._handshake = bytearray()
        self.state = NEED_MORE
        self.hello: Optional[ClientHello] = None
        self.error = ""

    def feed(self, data: bytes) -> str:
        """Add bytes; returns the new state."""
        if self.state != NEED_MORE:
            return self.state
        self.buffered += data
        while self.state == NEED_MORE:
            if len(self.buffered) - self._offset < 5:
                if self._offset == 0 and self.buffered and self.buffered[0] != _HANDSHAKE:
                    return self._fail("first byte is not a TLS handshake record")
                return self.state
            header = self.buffered[self._offset:self._offset + 5]
            rtype, major, _minor, length = header[0], header[1], header[2], \
                struct.unpack("!H", header[3:5])[0]
            if rtype != _HANDSHAKE or major != 3:
                return self._fail("not a TLS handshake record")
            if length == 0 or length > 16384 + 2048:
                return self._fail("bad TLS record length")
            end = self._offset + 5 + length
            if len(self.buffered) < end:
                if len(self._handshake) < 4:   # judge the handshake header early
                    self._check_header(self._handshake + self.buffered[self._offset + 5:])
                return self.state
            self._handshake += self.buffered[self._offset + 5:end]
            self._offset = end
            self._try_parse()
        return self.state

    def _fail(self, why: str) -> str:
        self.state = NOT_TLS
        self.error = why
        return self.state

    def _check_header(self, hs: Union[bytes, bytearray]) -> bool:
        """False (and state NOT_TLS) when the handshake header is not an acceptable ClientHello."""
        if hs and hs[0] != _CLIENT_HELLO:
            self._fail("first handshake message is not a ClientHello")
            return False
        if len(hs) >= 4 and int.from_bytes(hs[1:4], "big") > self.max_size:
            self._fail(f"ClientHello larger than {self.max_size} bytes")
            return False
        return True

    def _try_parse(self) -> None:
        hs = self._handshake
        if len(hs) < 4 or not self._check_header(bytes(hs[:4])):
            return
        body_len = int.from_bytes(hs[1:4], "big")
        if len(hs) < 4 + body_len:
            return
        try:
            self.hello = parse_client_hello_body(bytes(hs[4:4 + body_len]))
        except ValueError as e:
            self._fail(str(e))
            return
        self.state = DONE


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated ClientHello")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.uint(length_bytes))

    def done(self) -> bool:
        return self.pos >= len(self.data)


def parse_client_hello_body(body: bytes) -> ClientHello:
    """Server name and ALPN protocols of a ClientHello body (after the handshake header)."""
    r = _Reader(body)
    r.take(2 + 32)          # legacy_version, random
    r.vector(1)             # session id
    r.vector(2)             # cipher suites
    r.vector(1)             # compression methods
    if r.done():
        return ClientHello(None)
    extensions = _Reader(r.vector(2))
    name: Optional[str] = None
    alpn: list[str] = []
    while not extensions.done():
        ext_type = extensions.uint(2)
        ext = _Reader(extensions.vector(2))
        if ext_type == _EXT_SERVER_NAME and not ext.done():
            names = _Reader(ext.vector(2))
            while not names.done():
                name_type = names.uint(1)
                value = names.vector(2)
                if name_type == 0 and name is None:
                    try:
                        name = value.decode("ascii").rstrip(".").lower()
                    except UnicodeDecodeError:
                        raise ValueError("server name is not ASCII") from None
        elif ext_type == _EXT_ALPN and not ext.done():
            protocols = _Reader(ext.vector(2))
            while not protocols.done():
                alpn.append(protocols.vector(1).decode("ascii", "replace"))
    return ClientHello(name or None, tuple(alpn))
