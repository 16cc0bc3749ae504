"""Per-route counters of the proxy (the ``proxy`` part of ``get_stats``)."""

from __future__ import annotations

from typing import Any


class RouteStats:
    """Connections, HTTP requests, bytes each way and errors by kind for one route."""

    def __init__(self) -> None:
        self.active = 0
        self.total = 0
        self.requests = 0       # HTTP requests relayed (HTTP routes only)
        self.bytes_in = 0       # client -> target
        self.bytes_out = 0      # target -> client
        self.errors: dict[str, int] = {}

    def error(self, kind: str) -> None:
        """Count one error of ``kind`` (``blocked``, ``connect``, ``timeout``...)."""
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable figures."""
        return {"active_connections": self.active, "total_connections": self.total,
                "requests": self.requests, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "errors": dict(self.errors)}
