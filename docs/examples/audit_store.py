# docs/examples/audit_store.py
"""A queue store plug-in: wraps another store and keeps an audit trail."""

from __future__ import annotations

import time
from typing import Any

from zope.interface import implementer

from dcrouter.interfaces import IQueueStore


@implementer(IQueueStore)
class AuditedStore:
    """Delegates to ``inner`` (any IQueueStore) and appends one line per change to ``path``.

    Pass it from a ``.tac`` file: ``Extensions(queue_store=AuditedStore(DiskStore(...), ...))``.
    """

    def __init__(self, inner: Any, path: str) -> None:
        self.inner = inner
        self.path = path
        self.durable = inner.durable
        self.shared = inner.shared

    def _audit(self, event: str, item: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{time.time():.3f} {event} {item.id} {item.status} "
                    f"{','.join(r.address for r in item.recipients)}\n")

    def open(self) -> Any:
        """Recover through the inner store."""
        return self.inner.open()

    def add(self, items: list[Any], body_path: str) -> Any:
        """Store durably, then record each new item."""
        d = self.inner.add(items, body_path)

        def added(result: Any) -> Any:
            for item in items:
                self._audit("add", item)
            return result
        return d.addCallback(added)

    def update(self, item: Any) -> Any:
        """Record changes of waiting items (deferred with a new next attempt...)."""
        self._audit("update", item)
        return self.inner.update(item)

    def remove(self, item: Any) -> Any:
        """Record removals: finished items (status delivered or failed) leave the store."""
        self._audit("remove", item)
        return self.inner.remove(item)

    # everything else is the inner store's business
    def read_body(self, item: Any) -> Any:
        """The message bytes."""
        return self.inner.read_body(item)

    def claim_due(self, now: float, limit: int, owner: str, lease_seconds: float,
                  accept: Any = None) -> Any:
        """Lease due items."""
        return self.inner.claim_due(now, limit, owner, lease_seconds, accept)

    def renew(self, items: list[Any], owner: str, seconds: float) -> Any:
        """Extend leases."""
        return self.inner.renew(items, owner, seconds)

    def get(self, item_id: str) -> Any:
        """One item or None."""
        return self.inner.get(item_id)

    def list(self, status: Any, limit: int, cursor: Any) -> Any:
        """A page of items."""
        return self.inner.list(status, limit, cursor)

    def reschedule(self, when: float, statuses: Any) -> Any:
        """Make waiting items due."""
        return self.inner.reschedule(when, statuses)

    def count(self, destination: Any = None) -> int:
        """Items held."""
        return self.inner.count(destination)

    def stats(self) -> Any:
        """Counts by status and destination."""
        return self.inner.stats()

    def close(self) -> Any:
        """Flush and close the inner store."""
        return self.inner.close()
