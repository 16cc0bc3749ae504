"""One destination's waiting jobs, its connections, and their connection cache.

A :class:`DestinationWorker` is the :class:`~dcrouter.delivery.smtpclient.JobSource`
of every connection to one transport: jobs wait in a deque; a connection with
nothing to send parks here for up to ``cache_time`` seconds (Postfix's
``smtp_connection_cache_time_limit``, 2 s) and the next job goes to the most
recently parked connection before any new connection is opened - so a stream of
messages to one next hop keeps a few warm connections instead of opening one per
burst, and a quiet destination holds none for long.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, Optional

from dcrouter.delivery.transport import Transport

if TYPE_CHECKING:  # pragma: no cover
    from dcrouter.delivery.smtpclient import DeliveryClient, Job


class DestinationWorker:
    """Jobs waiting for one transport, the connections serving them, the idle ones."""

    def __init__(self, transport: Transport, reactor: Any = None,
                 cache_time: float = 2.0) -> None:
        self.key = transport
        self.transport = transport
        self.destination = transport.destination
        self.reactor = reactor
        self.cache_time = cache_time
        self.jobs: collections.deque["Job"] = collections.deque()
        self.connections = 0
        #: Parked (idle) clients, the most recent last, with their expiry calls.
        self.idle: "collections.OrderedDict[DeliveryClient, Any]" = collections.OrderedDict()

    # -- JobSource ------------------------------------------------------------------
    def take(self) -> Optional["Job"]:
        """The next waiting job."""
        return self.jobs.popleft() if self.jobs else None

    def park(self, client: "DeliveryClient") -> bool:
        """Keep ``client`` for ``cache_time`` seconds (False: no cache, it quits)."""
        if self.cache_time <= 0 or self.reactor is None:
            return False
        self.idle[client] = self.reactor.callLater(self.cache_time, self._expire, client)
        return True

    def unpark(self, client: "DeliveryClient") -> None:
        """``client``'s connection is gone: forget it."""
        call = self.idle.pop(client, None)
        if call is not None and call.active():
            call.cancel()

    def give_back(self, job: "Job") -> None:
        """First in line again."""
        self.jobs.appendleft(job)

    # -- the delivery system's side ---------------------------------------------------
    def add(self, job: "Job") -> bool:
        """Queue ``job``; wake the most recently parked connection if there is one
        (True: no new connection is needed for it)."""
        self.jobs.append(job)
        return self.wake()

    def wake(self) -> bool:
        """Hand waiting jobs to parked connections; True when some connection took one."""
        woke = False
        while self.jobs and self.idle:
            client, call = self.idle.popitem(last=True)
            if call.active():
                call.cancel()
            client.resume()
            woke = True
        return woke

    def _expire(self, client: "DeliveryClient") -> None:
        if self.idle.pop(client, None) is not None:
            client.quit()

    def close_idle(self) -> list["DeliveryClient"]:
        """QUIT every parked connection (shutdown); returns those clients (their ``done``
        fires when the connection is closed)."""
        clients = []
        while self.idle:
            client, call = self.idle.popitem(last=False)
            if call.active():
                call.cancel()
            client.quit()
            clients.append(client)
        return clients


__all__ = ["DestinationWorker"]
