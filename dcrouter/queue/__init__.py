"""The durable delivery queue: items, stores (memory, disk, Redis) and the queue service."""

from __future__ import annotations

from dcrouter.queue.item import QueueItem, RecipientState
from dcrouter.queue.queue import UnifiedDeliveryQueue, build_store

__all__ = ["QueueItem", "RecipientState", "UnifiedDeliveryQueue", "build_store"]
