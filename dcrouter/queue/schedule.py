"""The due-item schedule of local stores: a binary heap with lazy deletion.

Scheduling and taking the next due item are O(log n); an item that is
rescheduled or removed leaves a stale heap entry behind that is skipped when
it surfaces (each item remembers the sequence number of its live entry).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Iterator, Optional

from dcrouter.queue.item import WAITING, QueueItem


class DueSchedule:
    """Items ordered by ``next_attempt``."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count(1)

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, item: QueueItem, when: Optional[float] = None) -> None:
        """(Re)schedule ``item`` at its ``next_attempt`` (or ``when``); the older entry goes stale."""
        seq = next(self._seq)
        item.sched = seq
        heapq.heappush(self._heap, (item.next_attempt if when is None else when, seq, item.id))

    def pop_due(self, now: float, lookup: Callable[[str], Optional[QueueItem]],
                limit: int, accept: Callable[[QueueItem], bool] = lambda item: True
                ) -> list[QueueItem]:
        """Take up to ``limit`` items due at ``now`` (waiting, live entry, accepted).

        Items refused by ``accept`` (their destination is busy) stay due but move behind
        the other due items, so a large backlog for one destination neither starves the
        others nor makes every call walk the whole backlog: at most ``max_refused``
        refusals are looked at per call.
        """
        taken: list[QueueItem] = []
        refused: list[QueueItem] = []
        heap = self._heap
        max_refused = max(64, 4 * limit)
        while heap and len(taken) < limit and heap[0][0] <= now and len(refused) < max_refused:
            _, seq, item_id = heapq.heappop(heap)
            item = lookup(item_id)
            if item is None or item.sched != seq or item.status not in WAITING:
                continue
            if accept(item):
                item.sched = 0
                taken.append(item)
            else:
                refused.append(item)
        behind = now + 1e-6   # after every entry due now, in the order they were refused
        for item in refused:
            self.schedule(item, behind)
        return taken

    def next_due(self, lookup: Callable[[str], Optional[QueueItem]]) -> Optional[float]:
        """When the earliest live entry is due (stale entries are dropped on the way)."""
        heap = self._heap
        while heap:
            when, seq, item_id = heap[0]
            item = lookup(item_id)
            if item is not None and item.sched == seq and item.status in WAITING:
                return when
            heapq.heappop(heap)
        return None

    def compact(self, items: Iterator[QueueItem]) -> None:
        """Rebuild the heap from the live items (drops stale entries)."""
        self._heap = []
        for item in items:
            if item.status in WAITING:
                seq = next(self._seq)
                item.sched = seq
                self._heap.append((item.next_attempt, seq, item.id))
        heapq.heapify(self._heap)
