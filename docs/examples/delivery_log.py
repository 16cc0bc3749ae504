# docs/examples/delivery_log.py
"""A delivery observer: one JSON line per delivery outcome."""

from __future__ import annotations

import json
import time
from typing import Any

from zope.interface import implementer

from dcrouter.interfaces import IDeliveryObserver


@implementer(IDeliveryObserver)
class JsonDeliveryLog:
    """Appends ``{"event": ..., "id": ..., "recipients": [...]}`` lines to ``path``.

    Observers are called in the reactor thread: keep them quick (this one
    writes a short line; hand anything slow to a thread or a queue).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def _write(self, event: str, item: Any, **extra: Any) -> None:
        line = {"time": round(time.time(), 3), "event": event, "id": item.id,
                "from": item.mail_from,
                "recipients": [r.address for r in item.recipients], **extra}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def on_delivery_start(self, item: Any) -> None:
        """An attempt begins (``item`` is a :class:`dcrouter.queue.item.QueueItem`)."""
        self._write("start", item, attempt=item.attempts)

    def on_delivery_success(self, item: Any, result: Any) -> None:
        """Every recipient was delivered."""
        self._write("delivered", item)

    def on_delivery_failed(self, item: Any, error: Any, permanent: bool) -> None:
        """An attempt failed; ``permanent`` means a bounce goes to the sender."""
        self._write("bounced" if permanent else "deferred", item, error=str(error))
