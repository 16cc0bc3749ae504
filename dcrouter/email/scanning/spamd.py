"""A client for SpamAssassin's ``spamd`` over the SPAMC/1.5 protocol.

Request: ``SYMBOLS SPAMC/1.5`` with ``Content-length`` and the message;
spamd answers ``SPAMD/1.1 0 EX_OK``, a ``Spam: True ; 1005.3 / 5.0``
header and the names of the rules that fired, then closes.  Messages over
``max_size`` are not sent (as spamc does) and count as unscanned.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional

from twisted.internet import defer, threads
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from dcrouter.email.scanning.types import ScannerError

_STATUS = re.compile(rb"^SPAMD/(\d+\.\d+) (\d+) (.*)$")
_SPAM = re.compile(rb"^Spam:\s*(\w+)\s*;\s*(-?[\d.]+)\s*/\s*(-?[\d.]+)", re.IGNORECASE)


@dataclasses.dataclass
class SpamdResult:
    """spamd's verdict: spam flag, score, its threshold and the rules that fired."""

    is_spam: bool
    score: float
    threshold: float
    symbols: list[str]


class SpamcProtocol(Protocol):
    """One SPAMC exchange: send the request on connect, collect the reply until close."""

    def __init__(self, message: bytes, command: bytes = b"SYMBOLS") -> None:
        self.message = message
        self.command = command
        self.buffer = bytearray()
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        head = (self.command + b" SPAMC/1.5\r\n"
                + b"Content-length: " + str(len(self.message)).encode() + b"\r\n\r\n")
        self.transport.write(head + self.message)

    def dataReceived(self, data: bytes) -> None:
        self.buffer.extend(data)
        if len(self.buffer) > 1024 * 1024:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        try:
            self.done.callback(parse_reply(bytes(self.buffer)))
        except ScannerError as e:
            self.done.errback(e)


def parse_reply(data: bytes) -> SpamdResult:
    """Parse a SYMBOLS/CHECK reply; raises ScannerError when it is not EX_OK."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = _STATUS.match(lines[0]) if lines and lines[0] else None
    if status is None:
        raise ScannerError("spamd: no valid reply", reply=data[:100].decode("latin-1"))
    if status.group(2) != b"0":
        raise ScannerError(f"spamd: {status.group(3).decode('latin-1')}",
                           code=int(status.group(2)))
    for line in lines[1:]:
        m = _SPAM.match(line)
        if m:
            symbols = [s for s in body.decode("latin-1").strip().split(",") if s]
            return SpamdResult(m.group(1).lower() in (b"true", b"yes"), float(m.group(2)),
                               float(m.group(3)), symbols)
    raise ScannerError("spamd: reply without a Spam header")


def _read_head(path: str, limit: int) -> Optional[bytes]:
    if os.path.getsize(path) > limit:
        return None
    with open(path, "rb") as f:
        return f.read(limit + 1)


class SpamdClient:
    """Asks spamd about a message file; fires with a SpamdResult, or None when too big."""

    def __init__(self, reactor: Any, host: str = "127.0.0.1", port: int = 783,
                 timeout: float = 30.0, max_size: int = 512000) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_size = max_size

    @classmethod
    def from_options(cls, reactor: Any, options: Any) -> "SpamdClient":
        """From ``[email.spamd]``."""
        return cls(reactor, options.host, options.port, options.timeout, options.max_size)

    @defer.inlineCallbacks
    def check_file(self, path: str, size: int = 0) -> Any:
        """Scan the message at ``path``; ScannerError on failure or timeout."""
        data = yield threads.deferToThread(_read_head, path, self.max_size)
        if data is None:
            return None
        result = yield self.check_bytes(data)
        return result

    def check_bytes(self, message: bytes) -> defer.Deferred:
        """Scan message bytes; fires with a SpamdResult."""
        if not message.endswith(b"\n"):
            message += b"\r\n"  # spamd reads by lines: a last line without an end never ends
        endpoint = HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)
        protocol = SpamcProtocol(message)

        def connected(proto: SpamcProtocol) -> defer.Deferred:
            return proto.done

        def failed(failure: Failure) -> Failure:
            if failure.check(ScannerError):
                return failure
            if failure.check(defer.TimeoutError, defer.CancelledError):
                if protocol.transport is not None:
                    protocol.transport.abortConnection()  # type: ignore[attr-defined]
                raise ScannerError(f"spamd at {self.host}:{self.port} timed out")
            raise ScannerError(f"spamd at {self.host}:{self.port}: "
                               f"{failure.getErrorMessage()}")

        d = connectProtocol(endpoint, protocol)
        d.addCallback(connected)
        d.addTimeout(self.timeout, self.reactor)
        d.addErrback(failed)
        return d
