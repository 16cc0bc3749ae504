"""A small IMessageHandler for the SMTP server's tests.

Mimics the processor's relay policy (Postfix's model): recipients in
``local_domains`` are accepted from anyone, others only when the session may
relay (authenticated or inside relay_networks).  Records every message with
the bytes of its spool file; can be told to reject or fail.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet import defer
from zope.interface import implementer

from dcrouter.errors import PolicyRejection
from dcrouter.interfaces import IEmailEventObserver, IMessageHandler


@implementer(IMessageHandler)
class RecordingHandler:
    """Accepts, records and deletes spooled messages (as the queue would take them)."""

    def __init__(self, local_domains: tuple[str, ...] = ("local.test",)) -> None:
        self.local_domains = local_domains
        self.messages: list[dict[str, Any]] = []
        self.sessions: list[Any] = []
        self.fail_next: Optional[Exception] = None
        self.reject_sender: Optional[PolicyRejection] = None
        self.delay: float = 0.0
        self.reactor: Any = None

    def check_sender(self, session: Any, mail_from: str) -> Any:
        if self.reject_sender is not None:
            raise self.reject_sender
        return None

    def check_recipient(self, session: Any, mail_from: str, recipient: str) -> Any:
        domain = recipient.rpartition("@")[2].lower()
        if domain in self.local_domains or session.may_relay:
            return defer.succeed(None)
        return defer.fail(PolicyRejection(554, "5.7.1", "Relay access denied", "relay"))

    def handle_message(self, message: Any) -> Any:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            return defer.fail(error)
        with open(message.spool_path, "rb") as f:
            data = f.read()
        os.unlink(message.spool_path)
        self.messages.append({"message": message, "data": data})
        self.sessions.append(message.session)
        if self.delay and self.reactor is not None:
            d: defer.Deferred = defer.Deferred()
            self.reactor.callLater(self.delay, d.callback, [message.queue_id])
            return d
        return [message.queue_id]

    def body(self, index: int = -1) -> bytes:
        """A recorded message without dcrouter's Received header."""
        data = self.messages[index]["data"]
        assert data.startswith(b"Received: ")
        end = data.index(b"\r\n")
        while data[end + 2:end + 3] in (b"\t", b" "):  # folded continuation lines
            end = data.index(b"\r\n", end + 2)
        return data[end + 2:]


@implementer(IEmailEventObserver)
class RecordingObserver:
    """Records events by name."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple]] = []

    def _record(self, name: str, *args: Any) -> None:
        self.events.append((name, args))

    def connection_made(self, session: Any) -> None:
        self._record("connection_made", session)

    def connection_lost(self, session: Any, reason: Any) -> None:
        self._record("connection_lost", session)

    def auth_succeeded(self, session: Any, username: str, mechanism: str) -> None:
        self._record("auth_succeeded", session, username, mechanism)

    def auth_failed(self, session: Any, username: str, mechanism: str) -> None:
        self._record("auth_failed", session, username, mechanism)

    def message_received(self, session: Any, message: Any, queue_ids: list) -> None:
        self._record("message_received", session, message, queue_ids)

    def message_rejected(self, session: Any, reason: str, code: int) -> None:
        self._record("message_rejected", session, reason, code)

    def names(self) -> list[str]:
        return [e[0] for e in self.events]


class BrokenObserver:
    """An observer that raises on every event."""

    def __getattr__(self, name: str) -> Any:
        def boom(*args: Any) -> None:
            raise RuntimeError("observer bug")
        return boom
