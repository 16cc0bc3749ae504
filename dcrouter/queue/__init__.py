"""The unified delivery queue (placeholder until the queue issue lands)."""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import defer

from dcrouter.config.queue import QueueOptions


class UnifiedDeliveryQueue(Service):
    """Placeholder: keeps requests in memory."""

    def __init__(self, options: QueueOptions, state_dir: str, store: Any = None,
                 reactor: Any = None) -> None:
        self.options = options
        self.items: list[Any] = []

    @classmethod
    def from_options(cls, options: QueueOptions, state_dir: str, store: Any = None,
                     reactor: Any = None) -> "UnifiedDeliveryQueue":
        """Build the queue for ``[email.queue]``."""
        return cls(options, state_dir, store, reactor)

    def enqueue(self, requests: list[Any]) -> defer.Deferred:
        """Keep the requests; fire with their ids."""
        self.items.extend(requests)
        return defer.succeed([r.queue_id for r in requests])

    def update_options(self, options: QueueOptions) -> None:
        """Apply new options."""
        self.options = options

    def get_stats(self) -> dict:
        """Item count."""
        return {"size": len(self.items)}


__all__ = ["UnifiedDeliveryQueue"]
