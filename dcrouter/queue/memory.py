"""In-memory queue storage: the local index shared by the memory and disk stores.

:class:`LocalStore` keeps items in a dict, due items in a heap
(:class:`~dcrouter.queue.schedule.DueSchedule`) and counters by status and
destination, so enqueue, lease and complete are O(1)/O(log n).
:class:`MemoryStore` adds bodies kept in memory: **everything is lost when the
process stops** - use it for tests or when losing queued mail is acceptable.
"""

from __future__ import annotations

import collections
import heapq
import os
import time
from typing import Any, Callable, Optional

from twisted.internet import defer, threads
from zope.interface import implementer

from dcrouter.errors import QueueError
from dcrouter.interfaces import IQueueStore
from dcrouter.queue.item import PROCESSING, STATUSES, WAITING, QueueItem
from dcrouter.queue.schedule import DueSchedule


class LocalStore:
    """Items, schedule and counters held in this process."""

    durable = False
    shared = False

    def __init__(self) -> None:
        self.items: dict[str, Any] = {}  # QueueItem, or StoredItem until first use
        self.schedule = DueSchedule()
        self.body_refs: collections.Counter[str] = collections.Counter()
        self.dest_counts: collections.Counter[str] = collections.Counter()
        self.status_counts: collections.Counter[str] = collections.Counter()
        self.total_bytes = 0
        self._oldest: Optional[float] = None
        self._oldest_at = 0.0

    # -- index ---------------------------------------------------------------
    def _index_add(self, item: Any) -> None:
        self.items[item.id] = item
        self.body_refs[item.body_ref] += 1
        self.dest_counts[item.destination] += 1
        self.status_counts[item.status] += 1
        item.stored_status = item.status
        self.total_bytes += item.size
        if item.status in WAITING:
            self.schedule.schedule(item)

    def _index_status(self, item: QueueItem) -> None:
        if item.stored_status != item.status:
            self.status_counts[item.stored_status] -= 1
            self.status_counts[item.status] += 1
            item.stored_status = item.status

    def _index_remove(self, item: Any) -> bool:
        """Drop ``item``; True when its body has no other user."""
        if self.items.pop(item.id, None) is None:
            return False
        self.dest_counts[item.destination] -= 1
        if self.dest_counts[item.destination] <= 0:
            del self.dest_counts[item.destination]
        self.status_counts[item.stored_status] -= 1
        self.total_bytes -= item.size
        item.sched = 0
        self.body_refs[item.body_ref] -= 1
        if self.body_refs[item.body_ref] <= 0:
            del self.body_refs[item.body_ref]
            return True
        return False

    # -- IQueueStore (shared parts) -------------------------------------------
    def update(self, item: QueueItem) -> defer.Deferred:
        """Record a changed item; waiting items are rescheduled."""
        if item.id not in self.items:
            return defer.succeed(False)
        self._index_status(item)
        item.lease_owner = ""
        if item.status in WAITING:
            self.schedule.schedule(item)
        return self._persist(item)

    def _persist(self, item: QueueItem) -> defer.Deferred:
        return defer.succeed(True)

    def _full(self, item: Any) -> Optional[QueueItem]:
        """The full item for an index entry (parsing a recovered one on first use)."""
        if not item.lazy:
            return item  # type: ignore[no-any-return]
        try:
            full = item.materialize()
        except (ValueError, KeyError, TypeError, IndexError) as e:
            self._damaged(item, str(e))
            return None
        self.items[full.id] = full
        return full  # type: ignore[no-any-return]

    def _damaged(self, item: Any, reason: str) -> None:
        """An index entry whose item cannot be read: drop it (stores may keep a copy)."""
        self._index_remove(item)

    def claim_due(self, now: float, limit: int, owner: str, lease_seconds: float,
                  accept: Callable[[QueueItem], bool] = lambda item: True) -> defer.Deferred:
        """Take up to ``limit`` due items for ``owner`` (status processing, not persisted)."""
        taken = self.schedule.pop_due(now, self.items.get, limit, accept)
        out = []
        for entry in taken:
            item = self._full(entry)
            if item is None:
                continue
            item.status = PROCESSING
            item.lease_owner = owner
            self._index_status(item)
            out.append(item)
        return defer.succeed(out)

    def renew(self, items: list[QueueItem], owner: str, seconds: float) -> defer.Deferred:
        """Leases of a local store never expire: nothing to do."""
        return defer.succeed(None)

    def get(self, item_id: str) -> defer.Deferred:
        """The item with ``item_id`` or None."""
        entry = self.items.get(item_id)
        return defer.succeed(self._full(entry) if entry is not None else None)

    def list(self, status: Optional[str] = None, limit: int = 100,
             cursor: Optional[str] = None) -> defer.Deferred:
        """Items ordered by id after ``cursor``: fires with (items, next_cursor)."""
        if status is not None and status not in STATUSES:
            raise QueueError(f"unknown status {status!r}")
        after = cursor or ""
        ids = heapq.nsmallest(limit + 1, (i for i, item in self.items.items()
                                          if i > after and (status is None
                                                            or item.status == status)))
        page = [p for p in (self._full(self.items[i]) for i in ids[:limit]) if p is not None]
        next_cursor = page[-1].id if len(ids) > limit and page else None
        return defer.succeed((page, next_cursor))

    def reschedule(self, when: float, statuses: tuple[str, ...] = WAITING) -> defer.Deferred:
        """Make every waiting item with a status in ``statuses`` due at ``when``."""
        count = 0
        for item in self.items.values():
            if item.status in statuses and item.status in WAITING:
                item.next_attempt = when
                count += 1
        self.schedule.compact(iter(self.items.values()))
        return defer.succeed(count)

    def count(self, destination: Optional[str] = None) -> int:
        """Items held (for one destination)."""
        if destination is None:
            return len(self.items)
        return self.dest_counts.get(destination, 0)

    def next_due(self) -> Optional[float]:
        """When the next item is due (None: nothing waits)."""
        return self.schedule.next_due(self.items.get)

    def stats(self, top: int = 10) -> dict[str, Any]:
        """Counts by status, biggest destinations, oldest age, bytes."""
        now = time.monotonic()
        if now - self._oldest_at > 5.0 or self._oldest is None and self.items:
            # O(n): recomputed at most every 5 seconds
            self._oldest = min((item.created_at for item in self.items.values()), default=None)
            self._oldest_at = now
        oldest = self._oldest if self.items else None
        return {
            "size": len(self.items),
            "by_status": {s: self.status_counts.get(s, 0) for s in STATUSES},
            "by_destination": dict(self.dest_counts.most_common(top)),
            "oldest_created_at": oldest,
            "bytes": self.total_bytes,
        }


@implementer(IQueueStore)
class MemoryStore(LocalStore):
    """Bodies and items in memory only: lost on restart (documented as lossy)."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: dict[str, bytes] = {}

    def open(self) -> defer.Deferred:
        """Nothing to recover."""
        return defer.succeed(list(self.items.values()))

    def add(self, items: list[QueueItem], body_path: str) -> defer.Deferred:
        """Read the body file (then delete it) and index the items."""
        def read() -> bytes:
            try:
                with open(body_path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise QueueError(f"cannot take over the message file: {e}") from None
            try:
                os.unlink(body_path)
            except OSError:
                pass
            return data

        def store(data: bytes) -> None:
            for item in items:
                self.bodies[item.body_ref] = data
                self._index_add(item)
        if items and items[0].body_ref in self.bodies:
            for item in items:
                self._index_add(item)
            return defer.succeed(None)
        return threads.deferToThread(read).addCallback(store)

    def add_bytes(self, items: list[QueueItem], body: bytes) -> defer.Deferred:
        """Index items whose body is given in memory."""
        for item in items:
            self.bodies[item.body_ref] = body
            self._index_add(item)
        return defer.succeed(None)

    def remove(self, item: QueueItem) -> defer.Deferred:
        """Forget an item and, when unused, its body."""
        if self._index_remove(item):
            self.bodies.pop(item.body_ref, None)
        return defer.succeed(None)

    def read_body(self, item: QueueItem) -> defer.Deferred:
        """The body bytes."""
        try:
            return defer.succeed(self.bodies[item.body_ref])
        except KeyError:
            return defer.fail(QueueError(f"body of {item.id} is missing"))

    def close(self) -> defer.Deferred:
        """Nothing to flush."""
        return defer.succeed(None)
