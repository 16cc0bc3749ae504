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


def _truncated() -> ValueError:
    return ValueError("truncated ClientHello")


def parse_client_hello_body(body: bytes) -> ClientHello:
    """Server name and ALPN protocols of a ClientHello body (after the handshake header).

    Index arithmetic over the bytes (every length checked against the vector that holds
    it): this runs once per passthrough connection, and a reader object per vector was a
    tenth of the new-connection profile.
    """
    n = len(body)
    pos = 34                                    # legacy_version, random
    if pos + 1 > n:
        raise _truncated()
    pos += 1 + body[pos]                        # session id
    if pos + 2 > n:
        raise _truncated()
    pos += 2 + (body[pos] << 8 | body[pos + 1])     # cipher suites
    if pos + 1 > n:
        raise _truncated()
    pos += 1 + body[pos]                        # compression methods
    if pos > n:
        raise _truncated()
    if pos == n:
        return ClientHello(None)
    if pos + 2 > n:
        raise _truncated()
    end = pos + 2 + (body[pos] << 8 | body[pos + 1])
    if end > n:
        raise _truncated()
    pos += 2
    name: Optional[str] = None
    alpn: list[str] = []
    while pos < end:
        if pos + 4 > end:
            raise _truncated()
        ext_type = body[pos] << 8 | body[pos + 1]
        ext_end = pos + 4 + (body[pos + 2] << 8 | body[pos + 3])
        if ext_end > end:
            raise _truncated()
        pos += 4
        if pos < ext_end and ext_type in (_EXT_SERVER_NAME, _EXT_ALPN):
            if pos + 2 > ext_end:
                raise _truncated()
            list_end = pos + 2 + (body[pos] << 8 | body[pos + 1])
            if list_end > ext_end:
                raise _truncated()
            p = pos + 2
            while p < list_end:
                if ext_type == _EXT_SERVER_NAME:
                    if p + 3 > list_end:
                        raise _truncated()
                    name_type = body[p]
                    start = p + 3
                    p = start + (body[p + 1] << 8 | body[p + 2])
                    if p > list_end:
                        raise _truncated()
                    if name_type == 0 and name is None:
                        try:
                            name = body[start:p].decode("ascii").rstrip(".").lower()
                        except UnicodeDecodeError:
                            raise ValueError("server name is not ASCII") from None
                else:
                    start = p + 1
                    p = start + body[p]
                    if p > list_end:
                        raise _truncated()
                    alpn.append(body[start:p].decode("ascii", "replace"))
        pos = ext_end
    return ClientHello(name or None, tuple(alpn))
