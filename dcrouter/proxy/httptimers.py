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
    """The timer of an HTTP connection's current wait (see the module docstring).

    Lazy: a request on a kept-alive connection passes through the ``idle``
    and ``none`` waits every time, so entering a wait only records its
    deadline; one ``callLater`` stays pending and, when it fires, either
    ends the wait whose deadline has passed or sleeps until the current
    wait's deadline (no timer is created or cancelled per request).
    """

    def __init__(self, reactor: Any, on_head_timeout: Callable[[], None],
                 on_idle_timeout: Callable[[], None]) -> None:
        self.reactor = reactor
        self.on_head_timeout = on_head_timeout
        self.on_idle_timeout = on_idle_timeout
        self.wait = NONE
        self.deadline = 0.0
        self._call: Any = None

    def enter(self, wait: str, head_timeout: float, idle_timeout: float) -> None:
        """The connection now waits for ``wait`` (HEAD, IDLE or NONE); a wait's clock starts
        when the wait changes and keeps running while it stays the same."""
        if wait == self.wait:
            return
        self.wait = wait
        if wait == NONE:
            return                          # a pending call finds nothing to end
        timeout = head_timeout if wait == HEAD else idle_timeout
        self.deadline = self.reactor.seconds() + timeout
        call = self._call
        if call is None:
            self._call = self.reactor.callLater(timeout, self._fire)
        elif call.getTime() > self.deadline:
            call.reset(timeout)

    def cancel(self) -> None:
        """No timer (the connection closes, or leaves its wait)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.wait = NONE

    def _fire(self) -> None:
        self._call = None
        wait = self.wait
        if wait == NONE:
            return
        left = self.deadline - self.reactor.seconds()
        if left > 0:
            self._call = self.reactor.callLater(left, self._fire)
            return
        self.wait = NONE
        if wait == HEAD:
            self.on_head_timeout()
        else:
            self.on_idle_timeout()
