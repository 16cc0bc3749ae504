"""A client for ClamAV's ``clamd`` over its INSTREAM command.

``zINSTREAM\\0``, then the file in chunks each prefixed by its 4-byte
big-endian length, then a zero length; clamd answers
``stream: OK\\0`` or ``stream: <signature> FOUND\\0`` (or ``... ERROR``).
The file is streamed by a pull producer, so a large message is never
read whole and the reactor is not held up.
"""

from __future__ import annotations

import struct
from typing import IO, Any, Optional

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.email.scanning.types import ScannerError


@implementer(IPullProducer)
class _ChunkProducer:
    """Writes the file as INSTREAM chunks, one per resumeProducing."""

    def __init__(self, transport: Any, fileobj: IO[bytes], chunk_size: int) -> None:
        self.transport = transport
        self.file = fileobj
        self.chunk_size = chunk_size

    def resumeProducing(self) -> None:
        data = self.file.read(self.chunk_size)
        if data:
            self.transport.write(struct.pack(">I", len(data)) + data)
            return
        self.transport.write(struct.pack(">I", 0))
        self.transport.unregisterProducer()
        self.file.close()

    def stopProducing(self) -> None:
        self.file.close()


class InstreamProtocol(Protocol):
    """One INSTREAM exchange; ``done`` fires with the signature name or None when clean."""

    def __init__(self, path: str, chunk_size: int) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self.buffer = bytearray()
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        try:
            fileobj = open(self.path, "rb")
        except OSError as e:
            self.done.errback(ScannerError(f"clamd: cannot read spool file: {e.strerror}"))
            self.transport.loseConnection()
            return
        self.transport.write(b"zINSTREAM\0")
        self.transport.registerProducer(_ChunkProducer(self.transport, fileobj,
                                                       self.chunk_size), False)

    def dataReceived(self, data: bytes) -> None:
        self.buffer.extend(data)
        if b"\0" in self.buffer:
            reply = bytes(self.buffer).split(b"\0", 1)[0].decode("utf-8", "replace")
            self.transport.loseConnection()
            if not self.done.called:
                try:
                    self.done.callback(parse_reply(reply))
                except ScannerError as e:
                    self.done.errback(e)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            if self.buffer:
                try:
                    self.done.callback(parse_reply(bytes(self.buffer).decode("utf-8",
                                                                              "replace")))
                    return
                except ScannerError as e:
                    self.done.errback(e)
                    return
            self.done.errback(ScannerError("clamd closed the connection without a verdict"))


def parse_reply(reply: str) -> Optional[str]:
    """``stream: OK`` -> None; ``stream: X FOUND`` -> ``X``; anything else -> ScannerError."""
    text = reply.strip().rstrip("\0")
    if text.startswith("stream:"):
        text = text[len("stream:"):].strip()
    if text == "OK":
        return None
    if text.endswith(" FOUND"):
        return text[:-len(" FOUND")].strip()
    raise ScannerError(f"clamd: {text or 'empty reply'}")


class ClamdClient:
    """Asks clamd about a message file; fires with the signature name or None."""

    def __init__(self, reactor: Any, host: str = "127.0.0.1", port: int = 3310,
                 timeout: float = 30.0, chunk_size: int = 65536) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.chunk_size = chunk_size

    @classmethod
    def from_options(cls, reactor: Any, options: Any) -> "ClamdClient":
        """From ``[email.clamd]``."""
        return cls(reactor, options.host, options.port, options.timeout, options.chunk_size)

    def scan_file(self, path: str) -> defer.Deferred:
        """Scan the file; ScannerError on failure or timeout."""
        endpoint = HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)
        protocol = InstreamProtocol(path, self.chunk_size)

        def failed(failure: Failure) -> Failure:
            if failure.check(ScannerError):
                return failure
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
            if failure.check(defer.TimeoutError, defer.CancelledError):
                raise ScannerError(f"clamd at {self.host}:{self.port} timed out")
            raise ScannerError(f"clamd at {self.host}:{self.port}: {failure.getErrorMessage()}")

        d = connectProtocol(endpoint, protocol)
        d.addCallback(lambda proto: proto.done)
        d.addTimeout(self.timeout, self.reactor)
        d.addErrback(failed)
        return d
