"""Per-request timeouts of HTTP connections (HAProxy's ``timeout http-request`` and
``timeout http-keep-alive``).

A relayed HTTP connection is, between its bytes, in one of three waits:

* ``head`` - part of a request head has arrived: the whole head must follow
  within the route's ``http_request_timeout`` of entering this wait, else
  the client gets ``408 Request Timeout`` (a head trickled byte by byte
  cannot hold the connection for the ``connection_timeout``);
* ``idle`` - every response is relayed and nothing of a next request has
  arrived: after ``http_keep_alive_timeout`` the connection is closed
  (silently, as HAProxy does);
* none - a body is streaming, a response is due, the connection waits on a
  backend or is a tunnel after ``101``: only ``connection_timeout`` applies.

:class:`RequestTimers` keeps the one timer of the current wait; the relay
tells it which wait it is in after every event (:meth:`RequestTimers.enter`).
"""

from __future__ import annotations

from typing import Any, Callable

HEAD = "head"
IDLE = "idle"
NONE = ""


class RequestTimers:
    """The timer of an HTTP connection's current wait (see the module docstring)."""

    def __init__(self, reactor: Any, on_head_timeout: Callable[[], None],
                 on_idle_timeout: Callable[[], None]) -> None:
        self.reactor = reactor
        self.on_head_timeout = on_head_timeout
        self.on_idle_timeout = on_idle_timeout
        self.wait = NONE
        self._call: Any = None

    def enter(self, wait: str, head_timeout: float, idle_timeout: float) -> None:
        """The connection now waits for ``wait`` (HEAD, IDLE or NONE); a timer starts
        when the wait changes and keeps running while it stays the same."""
        if wait == self.wait:
            return
        self.cancel()
        self.wait = wait
        if wait == HEAD:
            self._call = self.reactor.callLater(head_timeout, self._fire, HEAD)
        elif wait == IDLE:
            self._call = self.reactor.callLater(idle_timeout, self._fire, IDLE)

    def cancel(self) -> None:
        """No timer (the connection closes, or leaves its wait)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.wait = NONE

    def _fire(self, wait: str) -> None:
        self._call = None
        self.wait = NONE
        if wait == HEAD:
            self.on_head_timeout()
        else:
            self.on_idle_timeout()
