"""Sender reputation: per sending domain, messages sent, deferred and bounced in a sliding window.

Counts go into one-minute buckets per domain; buckets older than the window
are dropped as new ones are added, so memory stays bounded by
``domains x window/60``.  The seed's SenderReputationMonitor, for the API.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable

KINDS = ("sent", "deferred", "bounced")


class SenderReputation:
    """Sliding-window counters per sending domain."""

    def __init__(self, window: float = 86400.0, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.clock = clock
        self._buckets: dict[str, collections.OrderedDict[int, list[int]]] = {}

    def record(self, domain: str, kind: str, count: int = 1) -> None:
        """Count ``count`` events of ``kind`` (sent/deferred/bounced) for ``domain``."""
        if not domain or kind not in KINDS:
            return
        domain = domain.lower()
        minute = int(self.clock() // 60)
        buckets = self._buckets.setdefault(domain, collections.OrderedDict())
        bucket = buckets.get(minute)
        if bucket is None:
            bucket = buckets[minute] = [0, 0, 0]
            self._expire(buckets, minute)
        bucket[KINDS.index(kind)] += count

    def _expire(self, buckets: "collections.OrderedDict[int, list[int]]", minute: int) -> None:
        oldest = minute - int(self.window // 60)
        while buckets and next(iter(buckets)) < oldest:
            buckets.popitem(last=False)

    def domain_stats(self, domain: str) -> dict[str, Any]:
        """sent/deferred/bounced in the window and the bounce rate for one domain."""
        buckets = self._buckets.get(domain.lower())
        totals = [0, 0, 0]
        if buckets:
            self._expire(buckets, int(self.clock() // 60))
            for counts in buckets.values():
                for i in range(3):
                    totals[i] += counts[i]
        sent, deferred, bounced = totals
        attempts = sent + bounced
        return {"sent": sent, "deferred": deferred, "bounced": bounced,
                "bounce_rate": (bounced / attempts) if attempts else 0.0}

    def get_stats(self) -> dict[str, dict[str, Any]]:
        """Every domain seen in the window."""
        out = {}
        for domain in list(self._buckets):
            stats = self.domain_stats(domain)
            if stats["sent"] or stats["deferred"] or stats["bounced"]:
                out[domain] = stats
            else:
                del self._buckets[domain]
        return out
