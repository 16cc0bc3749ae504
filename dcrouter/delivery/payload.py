"""One delivery attempt's message bytes: read once, prepared once per kind of transport.

An item may go to SMTP next hops and into Maildirs in the same attempt (its
recipients resolved to several transports).  :class:`Payload` reads the stored
body once and prepares it once per kind - for SMTP brought to CRLF lines of at
most 998 octets, then DKIM-signed when the item says so - with the work in a
thread when it is large or involves signing.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer, threads

#: Bodies up to this size are prepared in the reactor; larger ones (and signing) in a thread.
INLINE_PREPARE_LIMIT = 262144


class Payload:
    """The stored body (``read``) and its prepared forms (``prepare(data, smtp)``)."""

    def __init__(self, read: Callable[[], defer.Deferred],
                 prepare: Callable[[bytes, bool], bytes], in_thread: bool = False) -> None:
        self._read = read
        self._prepare = prepare
        self._in_thread = in_thread
        self.raw: Optional[bytes] = None
        self._prepared: dict[bool, bytes] = {}

    async def read(self) -> bytes:
        """The stored body."""
        if self.raw is None:
            self.raw = await self._read()
        return self.raw

    async def prepared(self, smtp: bool) -> bytes:
        """The bytes to deliver over SMTP (``smtp``) or into a Maildir."""
        found = self._prepared.get(smtp)
        if found is not None:
            return found
        raw = await self.read()
        if self._in_thread or len(raw) > INLINE_PREPARE_LIMIT:
            data: bytes = await threads.deferToThread(self._prepare, raw, smtp)
        else:
            data = self._prepare(raw, smtp)
        self._prepared[smtp] = data
        return data


__all__ = ["INLINE_PREPARE_LIMIT", "Payload"]
