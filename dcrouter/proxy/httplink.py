"""One backend connection of an HTTP/1.1 relay: its admission, transport and response FIFO."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from twisted.python.failure import Failure

from dcrouter.proxy.httpio import write_now
from dcrouter.proxy.httpstream import ResponseFramer
from dcrouter.proxy.routes import Route
from dcrouter.proxy.stats import RouteStats

if TYPE_CHECKING:  # pragma: no cover
    from dcrouter.proxy.frontend import Connection
    from dcrouter.proxy.httprelay import HttpRelay


class BackendLink:
    """One backend connection of a relay: its route's admission, transport and response FIFO."""

    def __init__(self, relay: "HttpRelay", connection: "Connection", owned: bool) -> None:
        self.relay = relay
        self.connection = connection
        self.owned = owned
        self.route: Route = connection.route
        self.stats: RouteStats = connection.stats
        self.transport: Any = None
        self.pending: list[bytes] = []
        self.methods: deque[str] = deque()
        self.framer = ResponseFramer(self.methods)
        self.connecting = True
        self.sent = 0                   # requests sent on this connection
        self.answered = 0               # final responses relayed
        self.last_request = 0           # the request that said "Connection: close" (0: none)
        self.ended = False
        self.eof = False

    @property
    def busy(self) -> bool:
        """Responses are outstanding (or the connection is still being made)."""
        return self.connecting or bool(self.methods) or not self.framer.idle

    def write(self, data: bytes) -> None:
        """Send bytes to the backend (queued until connected)."""
        self.stats.bytes_in += len(data)
        if self.transport is None:
            self.pending.append(data)
        else:
            write_now(self.transport, data)

    # BackendSink
    def backend_data(self, data: bytes) -> None:
        """Bytes from the target."""
        self.relay.backend_data(self, data)

    def backend_read_closed(self) -> None:
        """The target sent EOF."""
        self.relay.backend_eof(self)

    def backend_lost(self, reason: Optional[Failure] = None) -> None:
        """The target connection is gone."""
        self.relay.backend_gone(self)
