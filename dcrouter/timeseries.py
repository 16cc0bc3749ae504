"""A ring buffer of the router's figures over the last hour, for the console's charts.

:class:`StatsHistory` samples a figures source (the router's ``get_stats()``,
every service's figures in one dict) every ``interval`` seconds and keeps the
samples of the last ``window`` seconds in a ring of fixed size: memory is
bounded by ``window / interval`` samples of :data:`SERIES` values, whatever
the traffic.  Nothing is written anywhere; Prometheus (``/metrics``) stays the
long-term store.

Each series is a *counter* (a total that only grows: messages accepted, bytes
relayed) or a *gauge* (a level: queue depth, open connections).
:meth:`StatsHistory.query` cuts the samples into buckets of ``step`` seconds:
a counter's bucket is what it grew by in that bucket (per minute with the
default step), a gauge's bucket its last value there.  A counter that goes
down (a proxy route removed by a reload) adds nothing to that bucket, rather
than a spike of its whole value; a counter absent from a sample (a figure
not created yet, like the first NXDOMAIN) counts from zero when it appears.

This module sits below the services: it knows the *shape* of their figures
(the keys of ``get_stats()``), never the services themselves.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Iterable, Optional

from twisted.application.service import Service
from twisted.internet.task import LoopingCall

from dcrouter.logsetup import get_logger

log = get_logger("router.history")

#: Default seconds between samples and seconds kept (one hour).
DEFAULT_INTERVAL = 10.0
DEFAULT_WINDOW = 3600.0
#: Most samples kept, whatever interval and window say (bounded memory).
MAX_SAMPLES = 10_000
#: Fewest and most buckets one query may ask for.
MAX_BUCKETS = 1440


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return float(value)


def _path(stats: Any, dotted: str) -> Optional[float]:
    """The number at ``a.b.c`` of nested dicts, or None."""
    node = stats
    for key in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return _number(node)


def _route_sum(field: str) -> Callable[[dict], Optional[float]]:
    """Sum of ``field`` over every proxy route (None without a proxy)."""
    def extract(stats: dict) -> Optional[float]:
        routes = stats.get("proxy", {}).get("routes") if isinstance(stats.get("proxy"),
                                                                    dict) else None
        if not isinstance(routes, dict):
            return None
        total = 0.0
        for route in routes.values():
            if not isinstance(route, dict):
                continue
            value = route.get(field)
            if field == "errors" and isinstance(value, dict):
                total += sum(v for v in (_number(x) for x in value.values()) if v is not None)
            else:
                total += _number(value) or 0.0
        return total
    return extract


def _dotted(dotted: str) -> Callable[[dict], Optional[float]]:
    return lambda stats: _path(stats, dotted)


@dataclasses.dataclass(frozen=True)
class SeriesSpec:
    """One series: its name, ``counter`` or ``gauge``, a label and how to read it."""

    name: str
    kind: str
    label: str
    extract: Callable[[dict], Optional[float]]


#: The series every sample records (DNS queries by rcode are added per rcode seen).
SERIES: tuple[SeriesSpec, ...] = (
    SeriesSpec("email.accepted", "counter", "messages accepted",
               _dotted("email.server.messages_accepted")),
    SeriesSpec("email.delivered", "counter", "recipients delivered",
               _dotted("email.delivery.counters.delivered")),
    SeriesSpec("email.deferred", "counter", "delivery attempts deferred",
               _dotted("email.delivery.counters.deferred")),
    SeriesSpec("email.bounced", "counter", "recipients bounced",
               _dotted("email.delivery.counters.failed")),
    SeriesSpec("queue.depth", "gauge", "queue items", _dotted("email.queue.size")),
    SeriesSpec("queue.deferred", "gauge", "deferred queue items",
               _dotted("email.queue.by_status.deferred")),
    SeriesSpec("proxy.connections", "counter", "proxy connections",
               _route_sum("total_connections")),
    SeriesSpec("proxy.active", "gauge", "open proxy connections",
               _dotted("proxy.active_connections")),
    SeriesSpec("proxy.bytes_in", "counter", "bytes client to target", _route_sum("bytes_in")),
    SeriesSpec("proxy.bytes_out", "counter", "bytes target to client", _route_sum("bytes_out")),
    SeriesSpec("proxy.requests", "counter", "HTTP requests", _route_sum("requests")),
    SeriesSpec("proxy.errors", "counter", "proxy errors", _route_sum("errors")),
    SeriesSpec("smtp.sessions", "counter", "SMTP sessions",
               _dotted("email.server.connections_total")),
)
_SPECS = {s.name: s for s in SERIES}
#: Prefix of the per-rcode DNS series (``dns.queries.NOERROR``...), all counters.
DNS_PREFIX = "dns.queries."
#: Most distinct rcodes kept as series (there are 16 in the header, a few more with EDNS).
MAX_RCODES = 24


def extract(stats: dict) -> dict[str, float]:
    """Every series' current value in ``stats`` (absent figures are left out)."""
    values: dict[str, float] = {}
    for spec in SERIES:
        try:
            value = spec.extract(stats)
        except Exception:  # a figure of an unexpected shape is skipped, not fatal
            value = None
        if value is not None:
            values[spec.name] = value
    dns = stats.get("dns")
    by_rcode = dns.get("queries_by_rcode") if isinstance(dns, dict) else None
    if isinstance(by_rcode, dict):
        for rcode, count in list(by_rcode.items())[:MAX_RCODES]:
            number = _number(count)
            if number is not None:
                values[DNS_PREFIX + str(rcode)[:16]] = number
    return values


def kind_of(name: str) -> str:
    """``counter`` or ``gauge``."""
    spec = _SPECS.get(name)
    return spec.kind if spec is not None else "counter"


def label_of(name: str) -> str:
    """A short human label of a series."""
    spec = _SPECS.get(name)
    if spec is not None:
        return spec.label
    if name.startswith(DNS_PREFIX):
        return f"DNS {name[len(DNS_PREFIX):]} answers"
    return name


class StatsHistory(Service):
    """Samples ``source()`` every ``interval`` seconds into a ring of ``window`` seconds."""

    def __init__(self, source: Callable[[], dict], clock: Any,
                 interval: float = DEFAULT_INTERVAL, window: float = DEFAULT_WINDOW) -> None:
        self.setName("history")
        self.source = source
        self.clock = clock
        self.interval = interval
        self.window = window
        self.samples: collections.deque[tuple[float, dict[str, float]]] = collections.deque(
            maxlen=self._capacity(interval, window))
        self.failures = 0
        self._loop: Optional[LoopingCall] = None
        self._failing = False

    @staticmethod
    def _capacity(interval: float, window: float) -> int:
        return max(2, min(MAX_SAMPLES, int(math.ceil(window / interval)) + 1))

    # -- lifecycle --------------------------------------------------------------------
    def startService(self) -> None:
        """Take a first sample now, then one every ``interval``."""
        super().startService()
        self._start_loop()

    def _start_loop(self) -> None:
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("figures history stopped", f))

    def stopService(self) -> Any:
        """Stop sampling (the samples stay readable)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def configure(self, interval: float, window: float) -> None:
        """New interval and window; samples already taken are kept (the newest ones)."""
        if interval == self.interval and window == self.window:
            return
        self.interval, self.window = interval, window
        self.samples = collections.deque(self.samples, maxlen=self._capacity(interval, window))
        if self._loop is not None and self._loop.running:
            self._loop.stop()
            self._start_loop()

    # -- sampling ---------------------------------------------------------------------
    def sample(self) -> None:
        """Record the current figures (a source that raises is logged once, then skipped)."""
        try:
            values = extract(self.source())
        except Exception:
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.failure("cannot sample the router's figures for the history")
            return
        self._failing = False
        self.samples.append((self.clock.seconds(), values))

    # -- reading ----------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every series name present in the kept samples, in :data:`SERIES` order."""
        seen: set[str] = set()
        for _t, values in self.samples:
            seen.update(values)
        ordered = [s.name for s in SERIES if s.name in seen]
        return ordered + sorted(n for n in seen if n not in _SPECS)

    def query(self, seconds: float, step: float,
              names: Optional[Iterable[str]] = None) -> dict[str, Any]:
        """Buckets of ``step`` seconds over the last ``seconds`` (see the module docstring).

        Bucket ``i`` covers ``[start + i*step, start + (i+1)*step)``; the last one
        ends at the next multiple of ``step`` after now, so buckets line up with
        the clock (whole minutes by default).  ``None`` marks a bucket without
        samples (before the router started, or a gap).
        """
        step = max(step, 1.0)
        now = self.clock.seconds()
        buckets = max(1, min(MAX_BUCKETS, int(math.ceil(seconds / step))))
        end = (math.floor(now / step) + 1) * step
        start = end - buckets * step
        wanted = list(names) if names is not None else self.names()
        series: dict[str, list[Optional[float]]] = {n: [None] * buckets for n in wanted}
        previous: dict[str, float] = {}
        for when, values in self.samples:
            index = int((when - start) // step)
            for name in wanted:
                value = values.get(name)
                if value is None:       # absent: a counter not yet created counts from 0
                    if kind_of(name) == "gauge":
                        previous.pop(name, None)
                    else:
                        previous[name] = 0.0
                    continue
                before = previous.get(name)
                previous[name] = value
                if not 0 <= index < buckets:
                    continue
                points = series[name]
                if kind_of(name) == "gauge":
                    points[index] = value
                else:
                    grown = max(0.0, value - before) if before is not None else 0.0
                    points[index] = (points[index] or 0.0) + grown
        return {
            "start": start, "end": end, "step": step, "interval": self.interval,
            "window": self.window, "now": now,
            "times": [start + i * step for i in range(buckets)],
            "series": {name: {"kind": kind_of(name), "label": label_of(name), "points": points}
                       for name, points in series.items()},
        }

    def latest(self) -> Optional[tuple[float, dict[str, float]]]:
        """The newest sample, or None."""
        return self.samples[-1] if self.samples else None
