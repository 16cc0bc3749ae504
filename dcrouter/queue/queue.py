"""UnifiedDeliveryQueue: the one queue of every delivery mode.

The queue turns the processor's :class:`~dcrouter.message.DeliveryRequest`
objects into :class:`~dcrouter.queue.item.QueueItem` objects, stores them
durably through an :class:`~dcrouter.interfaces.IQueueStore` before
``enqueue`` fires, hands due items to the delivery system (``claim``) and
records outcomes (``defer_item``/``complete``).  An item keeps its request's
destination - a reference the delivery system resolves at every attempt -
and a scheduling key; requests without a key (MX delivery) are split per
recipient domain so every item has one destination.  Delivered and failed
items leave the store at once and stay listed in memory for
``keep_delivered`` seconds.

On a shared store (Redis) the queue holds its claimed items on short leases
and renews them itself (:class:`~dcrouter.queue.leases.LeaseKeeper`): a node
that dies leaves its items to the others for ``lease_time`` at most, and a
node that lost a lease does not acknowledge the item.
"""

from __future__ import annotations

import collections
import os
import random
import socket
import time
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet import defer

from dcrouter.config.queue import QueueOptions
from dcrouter.errors import QueueError, QueueFullError
from dcrouter.logsetup import get_logger
from dcrouter.message import DeliveryRequest, new_queue_id
from dcrouter.queue.item import (
    DEFERRED, DELIVERED, FAILED, PENDING, STATUSES, WAITING, QueueItem,
)
from dcrouter.queue.leases import LeaseKeeper

log = get_logger("email.queue")

#: Seconds an enqueue waits for a store that is still opening (recovery, Redis connect).
READY_TIMEOUT = 60.0


def build_store(options: QueueOptions, state_dir: str) -> Any:
    """The store named by ``storage_type``."""
    if options.storage_type == "memory":
        from dcrouter.queue.memory import MemoryStore
        return MemoryStore()
    if options.storage_type == "redis":
        from dcrouter.queue.redisstore import RedisStore
        return RedisStore.from_url(options.redis_url, options.redis_prefix)
    from dcrouter.queue.disk import DiskStore
    return DiskStore(options.persistent_path or os.path.join(state_dir or ".", "queue"))


class UnifiedDeliveryQueue(Service):
    """The delivery queue service (a child of the email gateway)."""

    name: Optional[str] = "queue"  # type: ignore[assignment]

    def __init__(self, options: QueueOptions, state_dir: str, store: Any = None,
                 reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.options = options
        self.state_dir = state_dir
        self.store = store if store is not None else build_store(options, state_dir)
        self.reactor = reactor
        self.paused = False
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self._ready: Optional[defer.Deferred] = None
        self._opened = False
        self._waiting: list[defer.Deferred] = []
        self._listeners: list[Callable[[], None]] = []
        self.finished: "collections.OrderedDict[str, tuple[float, QueueItem]]" = \
            collections.OrderedDict()
        self.counters = collections.Counter[str]()
        #: Renews this node's leases on a shared store (None for local stores).
        self.leases: Optional[LeaseKeeper] = LeaseKeeper(
            self.store, self.owner, options.lease_time, options.renew_interval, reactor
        ) if getattr(self.store, "shared", False) else None

    @classmethod
    def from_options(cls, options: QueueOptions, state_dir: str, store: Any = None,
                     reactor: Any = None) -> "UnifiedDeliveryQueue":
        """Build the queue for ``[email.queue]`` (``store`` replaces the configured one)."""
        return cls(options, state_dir, store, reactor)

    # -- service ------------------------------------------------------------------
    def startService(self) -> None:
        """Open the store (the disk store locks its directory now, recovers in a thread)."""
        super().startService()
        try:
            # the disk store takes its directory lock now: a second process fails to start
            self._ready = self.store.open()
        except Exception:
            self.running = False
            raise
        self._ready.addCallback(self._on_open)
        self._ready.addErrback(self._on_open_failed)

    def _on_open(self, _: Any) -> None:
        self._opened = True
        if self.leases is not None and self.running:
            self.leases.start()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        self._notify()

    def _on_open_failed(self, failure: Any) -> None:
        log.failure("queue store failed to open", failure)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def stopService(self) -> Optional[defer.Deferred]:
        """Give the leases still held back (the other nodes take those items at once), then
        close the store."""
        super().stopService()
        d: defer.Deferred = defer.succeed(None)
        if self.leases is not None:
            self.leases.stop()
            held = self.leases.leased()
            give_back = getattr(self.store, "give_back", None)
            if held and self._opened and give_back is not None:
                d = give_back(held, self.owner, time.time())
                d.addCallback(lambda n: log.info("gave {count} leases back to the queue",
                                                 count=n) if n else None)
                d.addErrback(lambda f: log.warn("could not give leases back ({error}): they "
                                                "run out in {seconds:.0f}s",
                                                error=str(f.value),
                                                seconds=self.options.lease_time))
        return d.addCallback(lambda _: self.store.close())

    def when_ready(self, timeout: Optional[float] = None) -> defer.Deferred:
        """Fires once the store is open (items recovered); QueueError after ``timeout``."""
        if self._opened:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        if timeout is not None:
            d.addTimeout(timeout, self.reactor)

            def expired(failure: Any) -> Any:
                failure.trap(defer.TimeoutError)
                if d in self._waiting:
                    self._waiting.remove(d)
                raise QueueError(f"the queue store is not ready after {timeout:.0f}s")
            d.addErrback(expired)
        return d

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when items may have become due (enqueue, retry, resume)."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.failure("queue listener failed")

    # -- accepting ------------------------------------------------------------------
    def check_capacity(self, destinations: list[str]) -> None:
        """Raise QueueFullError when the queue or one destination is full."""
        if self.store.count() + len(destinations) > self.options.max_queue_size:
            raise QueueFullError(f"queue holds {self.store.count()} items "
                                 f"(max_queue_size {self.options.max_queue_size})")
        for dest in set(destinations):
            if self.store.count(dest) >= self.options.max_per_destination:
                raise QueueFullError(f"queue holds {self.store.count(dest)} items for {dest} "
                                     f"(max_per_destination {self.options.max_per_destination})")

    def make_items(self, requests: list[DeliveryRequest]) -> list[tuple[str, list[QueueItem]]]:
        """Items per body path: MX requests split by recipient domain."""
        groups: dict[str, list[QueueItem]] = {}
        used: set[str] = set()
        for request in requests:
            if not request.destination and request.via.per_domain:
                # MX delivery (or a destination only delivery resolves): one item per domain
                by_domain: dict[str, list[str]] = {}
                for rcpt in request.recipients:
                    by_domain.setdefault(rcpt.rpartition("@")[2].lower(), []).append(rcpt)
                subsets = list(by_domain.values())
            else:
                subsets = [list(request.recipients)]
            group = groups.setdefault(request.body_path, [])
            for rcpts in subsets:
                item_id = request.queue_id
                if not item_id or item_id in used or self.store.count() and \
                        self._known(item_id):
                    item_id = new_queue_id()
                used.add(item_id)
                body_ref = group[0].body_ref if group else item_id
                group.append(QueueItem.from_request(request, item_id, body_ref, rcpts))
        return list(groups.items())

    def _known(self, item_id: str) -> bool:
        items = getattr(self.store, "items", None)
        return item_id in items if isinstance(items, dict) else False

    @defer.inlineCallbacks
    def enqueue(self, requests: list[DeliveryRequest]) -> Any:
        """Store requests durably; fires with the new item ids once all are safe."""
        if not self._opened:
            yield self.when_ready(timeout=READY_TIMEOUT)
        groups = self.make_items(requests)
        yield defer.gatherResults([self.store.add(items, path) for path, items in groups],
                                  consumeErrors=True).addErrback(self._unwrap)
        ids = [item.id for _, items in groups for item in items]
        self.counters["enqueued"] += len(ids)
        for _, items in groups:
            for item in items:
                log.info("queued {queue_id} for {destination} ({count} recipients)",
                         queue_id=item.id, destination=item.destination,
                         count=len(item.recipients), correlation_id=item.correlation_id)
        self._notify()
        return ids

    @staticmethod
    def _unwrap(failure: Any) -> Any:
        if isinstance(failure.value, defer.FirstError):
            return failure.value.subFailure
        return failure

    # -- delivering ---------------------------------------------------------------------
    def claim(self, limit: int, accept: Callable[[QueueItem], bool] = lambda item: True
              ) -> defer.Deferred:
        """Take up to ``limit`` due items for delivery (none while paused or opening)."""
        if self.paused or not self._opened or limit <= 0:
            return defer.succeed([])
        d = self.store.claim_due(time.time(), limit, self.owner, self.options.lease_time,
                                 accept)
        if self.leases is not None:
            d.addCallback(self.leases.adopt)
        return d

    def next_due(self) -> Optional[float]:
        """When the next item is due, if the store can tell cheaply."""
        probe = getattr(self.store, "next_due", None)
        return probe() if probe is not None else None

    def read_body(self, item: QueueItem) -> defer.Deferred:
        """The item's message bytes."""
        return self.store.read_body(item)

    def renew(self) -> defer.Deferred:
        """Renew this node's leases now (the heartbeat does it every ``renew_interval``);
        fires with how many were renewed."""
        if self.leases is None:
            return defer.succeed(0)
        return self.leases.renew()

    def holds_lease(self, item: QueueItem) -> bool:
        """False when this node learnt that another node took ``item`` (shared stores):
        side effects of its delivery (a bounce) are then the other node's to produce."""
        return self.leases is None or self.leases.holds(item)

    def _lease_lost(self, item: QueueItem, what: str) -> bool:
        """True (logged, counted) when this node lost ``item``'s lease: its outcome must not
        be recorded here. Either way the lease is no longer renewed."""
        if self.leases is None or self.leases.settle(item):
            return False
        self.counters["lease_lost"] += 1
        log.warn("{what} of {queue_id} not recorded: its lease was lost to another node",
                 what=what, queue_id=item.id, correlation_id=item.correlation_id)
        return True

    def _acknowledge(self, item: QueueItem, store_call: Any, what: str) -> defer.Deferred:
        """Run ``store_call`` (an update or removal of ``item``); on a shared store a refusal
        (another node took the item meanwhile, or it is gone) is logged and counted."""
        d = defer.maybeDeferred(store_call, item)
        if self.leases is not None:
            def refused(changed: Any) -> Any:
                if changed is not None and not int(changed):
                    self.counters["lease_lost"] += 1
                    log.warn("{what} of {queue_id} not recorded: another node holds it, or "
                             "it is gone", what=what, queue_id=item.id,
                             correlation_id=item.correlation_id)
                return changed
            d.addCallback(refused)
        return d

    def retry_delay(self, attempts: int) -> float:
        """Exponential backoff with +-10% jitter, capped at max_retry_delay."""
        base = self.options.base_retry_delay * (2 ** max(0, attempts - 1))
        delay = min(self.options.max_retry_delay, base)
        return delay * random.uniform(0.9, 1.1)

    def defer_item(self, item: QueueItem, error: str, delay: Optional[float] = None
                   ) -> defer.Deferred:
        """Schedule another attempt of ``item`` (status deferred)."""
        if self._lease_lost(item, "deferral"):
            return defer.succeed(0)
        now = time.time()
        item.status = DEFERRED
        item.last_error = error
        item.updated_at = now
        item.next_attempt = now + (self.retry_delay(item.attempts) if delay is None else delay)
        self.counters["deferred"] += 1
        d = self._acknowledge(item, self.store.update, "deferral")
        d.addCallback(lambda _: self._schedule_wakeup(item.next_attempt))
        return d

    def release(self, item: QueueItem) -> defer.Deferred:
        """Give an unattempted item back (pending, due now)."""
        if self._lease_lost(item, "release"):
            return defer.succeed(0)
        item.status = PENDING
        item.next_attempt = time.time()
        return self._acknowledge(item, self.store.update, "release")

    def complete(self, item: QueueItem) -> defer.Deferred:
        """Every recipient is delivered or failed: drop the item from the store."""
        if self._lease_lost(item, "completion"):
            return defer.succeed(0)
        now = time.time()
        item.updated_at = now
        if any(r.status == FAILED for r in item.recipients):
            item.status = FAILED
            self.counters["failed"] += 1
        else:
            item.status = DELIVERED
            item.delivered_at = now
            self.counters["delivered"] += 1
        self._remember(item)
        return self._acknowledge(item, self.store.remove, "completion")

    def _remember(self, item: QueueItem) -> None:
        keep = self.options.keep_delivered
        now = time.time()
        while self.finished:
            oldest_id, (expires, _) = next(iter(self.finished.items()))
            if expires > now and len(self.finished) < 100000:
                break
            del self.finished[oldest_id]
        if keep > 0:
            self.finished[item.id] = (now + keep, item)

    def _schedule_wakeup(self, when: float) -> None:
        delay = max(0.0, when - time.time())
        self.reactor.callLater(delay + 0.01, self._notify)

    # -- operator actions -------------------------------------------------------------
    @defer.inlineCallbacks
    def get_item(self, item_id: str) -> Any:
        """Fires with the item (queued or recently finished) or None."""
        item = yield self.store.get(item_id)
        if item is None and item_id in self.finished:
            item = self.finished[item_id][1]
        return item

    @defer.inlineCallbacks
    def list_items(self, status: Optional[str] = None, limit: int = 100,
                   cursor: Optional[str] = None) -> Any:
        """Fires with (items, next_cursor), ordered by id.

        ``delivered``/``failed`` list the recently finished items kept in memory.
        """
        if status is not None and status not in STATUSES:
            raise QueueError(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
        limit = max(1, min(int(limit), 1000))
        if status in (DELIVERED, FAILED):
            now = time.time()
            found = sorted(i for i, (exp, it) in self.finished.items()
                           if it.status == status and exp > now and i > (cursor or ""))
            page = [self.finished[i][1] for i in found[:limit]]
            return page, (page[-1].id if len(found) > limit else None)
        result = yield self.store.list(status, limit, cursor)
        return result

    @defer.inlineCallbacks
    def retry_now(self, item_id: str) -> Any:
        """Make a waiting item due now; fires True if found."""
        item = yield self.store.get(item_id)
        if item is None or item.status not in WAITING:
            return False
        item.next_attempt = time.time()
        yield self.store.update(item)
        self._notify()
        return True

    @defer.inlineCallbacks
    def retry_all(self) -> Any:
        """Make every waiting item due now; fires with the count."""
        count = yield self.store.reschedule(time.time(), WAITING)
        self._notify()
        return count

    @defer.inlineCallbacks
    def flush(self) -> Any:
        """Make every deferred item due now; fires with the count."""
        count = yield self.store.reschedule(time.time(), (DEFERRED,))
        self._notify()
        return count

    @defer.inlineCallbacks
    def delete(self, item_id: str) -> Any:
        """Remove an item without delivering it; fires True if found."""
        item = yield self.store.get(item_id)
        if item is None:
            return False
        yield self.store.remove(item)
        log.info("deleted {queue_id} by operator", queue_id=item_id,
                 correlation_id=item.correlation_id)
        return True

    def pause(self) -> None:
        """Stop handing out items (acceptance continues)."""
        self.paused = True

    def resume(self) -> None:
        """Hand out items again."""
        self.paused = False
        self._notify()

    def update_options(self, options: QueueOptions) -> None:
        """Apply new limits, retry and lease settings (the store type needs a restart)."""
        self.options = options
        if self.leases is not None:
            self.leases.configure(options.lease_time, options.renew_interval)

    def get_stats(self) -> dict[str, Any]:
        """Counts by status, top destinations, oldest age, bytes, counters."""
        stats = dict(self.store.stats())
        oldest = stats.pop("oldest_created_at", None)
        stats["oldest_age"] = (time.time() - oldest) if oldest else 0.0
        stats["paused"] = self.paused
        stats["storage"] = type(self.store).__name__
        stats["counters"] = dict(self.counters)
        stats["recently_finished"] = len(self.finished)
        if self.leases is not None:
            stats["leases_held"] = len(self.leases.leased())
            stats["leases_lost"] = self.leases.lost
        return stats


__all__ = ["UnifiedDeliveryQueue", "build_store"]
