"""The leases one node holds on a shared (Redis) queue, kept alive by one heartbeat.

Leases are short (``email.queue.lease_time``, 15 s by default) so the other
nodes take a dead node's items soon; the holder renews all of its leases at
once every ``lease_renew_interval`` (default a third of the lease) - one
Redis call per node per interval, however many items it holds (the figures
are in docs/benchmarks.md).

Fencing: the store renews, updates and removes an item only for the node
that holds it.  When a renewal reports that another node has taken an item
(this node could not reach Redis, or its event loop stalled, for a whole
lease), the item is marked lost: it is no longer renewed, and the delivery
still running here will not acknowledge it (no update, no removal), so the
item's outcome is recorded once, by its current holder.  If this node claims
the same item again later, the new lease is adopted by the item object
already in delivery, which may then acknowledge it.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer, task

from dcrouter.logsetup import get_logger
from dcrouter.queue.item import QueueItem

log = get_logger("email.queue")

#: ``lease_owner`` of an item whose lease this node lost (it matches no holder in the store).
LOST = "\x00lost"


class LeaseKeeper:
    """Tracks the items this node leased and renews them in one call per heartbeat."""

    def __init__(self, store: Any, owner: str, lease_time: float, interval: float,
                 reactor: Any) -> None:
        self.store = store
        self.owner = owner
        self.lease_time = lease_time
        self.interval = interval
        self.reactor = reactor
        #: Items leased here and not yet acknowledged, lost ones included, by id.
        self.held: dict[str, QueueItem] = {}
        self.lost = 0
        self.renewals = 0
        self._loop: Optional[task.LoopingCall] = None
        self._busy = False
        self._failing = False

    # -- the heartbeat ------------------------------------------------------------------
    def start(self) -> None:
        """Renew every ``interval`` seconds."""
        self.stop()
        self._loop = task.LoopingCall(self.renew)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        """Stop renewing (the leases then run out unless given back)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def configure(self, lease_time: float, interval: float) -> None:
        """New lease settings (a running heartbeat restarts at the new interval)."""
        changed = interval != self.interval
        self.lease_time, self.interval = lease_time, interval
        if changed and self._loop is not None:
            self.start()

    def renew(self) -> defer.Deferred:
        """Renew every lease held (one store call); fires with how many were renewed."""
        if self._busy:  # the previous renewal is still on its way: do not pile up calls
            return defer.succeed(0)
        items = [item for item in self.held.values() if item.lease_owner != LOST]
        if not items:
            return defer.succeed(0)
        self._busy = True
        d = self.store.renew(items, self.owner, self.lease_time)
        # an answer later than a lease is worthless, and a connection that hangs must not
        # stop the heartbeat for good
        d.addTimeout(self.lease_time, self.reactor)

        def done(lost_ids: Any) -> int:
            self._busy = False
            self.renewals += 1
            if self._failing:
                log.info("queue leases renewed again ({count})", count=len(items))
                self._failing = False
            lost = 0
            for item_id in lost_ids if isinstance(lost_ids, (list, tuple)) else ():
                item = self.held.get(item_id)
                if item is not None and item.lease_owner == self.owner:
                    self._mark_lost(item)
                    lost += 1
            return len(items) - lost

        def failed(failure: Any) -> int:
            self._busy = False
            if not self._failing:  # once per outage
                log.warn("cannot renew {count} queue leases: {error}; they run out "
                         "{seconds:.0f}s after the last renewal", count=len(items),
                         error=str(failure.value), seconds=self.lease_time)
            self._failing = True
            return 0
        return d.addCallbacks(done, failed)

    def _mark_lost(self, item: QueueItem) -> None:
        item.lease_owner = LOST
        self.lost += 1
        log.warn("lease on {queue_id} lost: another node holds it now (or it was deleted), "
                 "so this node will not record the outcome of its delivery", queue_id=item.id,
                 correlation_id=item.correlation_id, event="queue.lease_lost")

    # -- claims and acknowledgements ------------------------------------------------------
    def adopt(self, items: list[QueueItem]) -> list[QueueItem]:
        """Track freshly claimed items; returns those new here.

        An item already held (its lease ran out and this node claimed it again, or
        another node gave it back) keeps its object, which the delivery is working on,
        and takes the new lease.
        """
        fresh = []
        for item in items:
            known = self.held.get(item.id)
            if known is not None:
                if known.lease_owner == LOST:
                    log.info("lease on {queue_id} is this node's again", queue_id=item.id,
                             correlation_id=item.correlation_id)
                known.lease_owner = item.lease_owner
                continue
            self.held[item.id] = item
            fresh.append(item)
        return fresh

    def settle(self, item: QueueItem) -> bool:
        """The delivery is done with ``item`` (it is about to be acknowledged): stop
        renewing it. False when its lease was lost: it must not be acknowledged."""
        self.held.pop(item.id, None)  # whatever the answer, the lease ends with the ack
        return item.lease_owner != LOST

    def holds(self, item: QueueItem) -> bool:
        """False once this node knows it lost ``item``'s lease."""
        return item.lease_owner != LOST

    def leased(self) -> list[QueueItem]:
        """The items whose lease this node still holds."""
        return [item for item in self.held.values() if item.lease_owner != LOST]
