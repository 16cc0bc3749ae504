"""Prometheus metrics of one router: event counters plus figures read at scrape time.

Two sources feed one :class:`prometheus_client.CollectorRegistry` per
:class:`~dcrouter.api.service.ApiService` (never the global registry, so a
process or a test may run several routers):

* **events** - :class:`EmailEventMetrics` (an ``IEmailEventObserver``: SMTP
  sessions, AUTH, accepted messages by mode, rejections) and
  :class:`DeliveryMetrics` (an ``IDeliveryObserver``: attempts by mode and
  outcome, latency histogram, delivered/deferred/bounced messages);
* **state** - :class:`StatsCollector`, a custom collector that calls every
  service's ``get_stats()`` when Prometheus scrapes: queue depth by status,
  proxy connections and bytes per route, DNS queries by rcode, scan
  verdicts, and every other numeric figure as ``dcrouter_service_stat``.

:class:`ApiMetrics` owns the registry and wires the observers into the
email service.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from zope.interface import implementer

from dcrouter import __version__
from dcrouter.interfaces import IDeliveryObserver, IEmailEventObserver
from dcrouter.logsetup import get_logger
from dcrouter.service import RouterContext

log = get_logger("api.metrics")

#: Delivery latency buckets in seconds: local Maildir writes up to slow remote MXs.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 52428800)

_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def _number(value: Any) -> Optional[float]:
    """``value`` as a float when it is a plain number (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _item_id(item: Any) -> str:
    for name in ("id", "queue_id", "item_id"):
        value = getattr(item, name, None)
        if value:
            return str(value)
    return f"obj-{id(item)}"


def _item_mode(item: Any) -> str:
    mode = getattr(item, "mode", None)
    if not mode:
        request = getattr(item, "request", None)
        mode = getattr(request, "mode", None)
    return str(mode or "unknown")


def metric_total(metric: Any) -> float:
    """The sum of a counter's ``_total`` samples over all label values."""
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return total


@implementer(IEmailEventObserver)
class EmailEventMetrics:
    """Counts the SMTP server's events (sessions, AUTH, messages, rejections)."""

    def __init__(self, registry: CollectorRegistry,
                 modes_for: Callable[[list[str]], set[str]]) -> None:
        self.modes_for = modes_for
        #: Messages accepted (once each, whatever the number of modes their recipients use).
        self.accepted_messages = 0
        self.sessions = Counter("dcrouter_smtp_sessions", "SMTP sessions opened.",
                                registry=registry)
        self.sessions_active = Gauge("dcrouter_smtp_sessions_active", "SMTP sessions open now.",
                                     registry=registry)
        self.auth = Counter("dcrouter_smtp_auth", "SMTP AUTH attempts by mechanism and result.",
                            ["mechanism", "result"], registry=registry)
        self.messages = Counter("dcrouter_messages",
                                "Messages by routing mode and outcome: accepted (SMTP), "
                                "delivered, deferred, bounced (delivery; one per queue item).",
                                ["mode", "outcome"], registry=registry)
        self.message_size = Histogram("dcrouter_message_size_bytes",
                                      "Size of accepted messages.", buckets=SIZE_BUCKETS,
                                      registry=registry)
        self.rejections = Counter("dcrouter_smtp_rejections",
                                  "Refused SMTP commands or messages by reason and reply class.",
                                  ["reason", "reply_class"], registry=registry)

    def connection_made(self, session: Any) -> None:
        """A client connected."""
        self.sessions.inc()
        self.sessions_active.inc()

    def connection_lost(self, session: Any, reason: Any = None) -> None:
        """A client went away."""
        self.sessions_active.dec()

    def auth_succeeded(self, session: Any, username: Any, mechanism: Any) -> None:
        """AUTH succeeded."""
        self.auth.labels(mechanism=_text(mechanism), result="success").inc()

    def auth_failed(self, session: Any, username: Any, mechanism: Any) -> None:
        """AUTH failed."""
        self.auth.labels(mechanism=_text(mechanism), result="failure").inc()

    def message_received(self, session: Any, message: Any, queue_ids: Any) -> None:
        """A message was accepted: one count per routing mode its recipients use."""
        self.accepted_messages += 1
        recipients = [str(r) for r in getattr(message, "recipients", []) or []]
        for mode in sorted(self.modes_for(recipients) or {"unknown"}):
            self.messages.labels(mode=mode, outcome="accepted").inc()
        size = _number(getattr(message, "size", None))
        if size is not None:
            self.message_size.observe(size)

    def message_rejected(self, session: Any, reason: Any, code: Any) -> None:
        """A command or message was refused."""
        try:
            reply_class = f"{int(code) // 100}xx"
        except (TypeError, ValueError):
            reply_class = "unknown"
        self.rejections.labels(reason=_text(reason) or "unknown", reply_class=reply_class).inc()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value) if value is not None else ""


@implementer(IDeliveryObserver)
class DeliveryMetrics:
    """Counts delivery attempts and measures their latency, by routing mode."""

    #: Start times older than this are forgotten (an attempt that never reported back).
    STALE_AFTER = 3600.0

    def __init__(self, registry: CollectorRegistry, messages: Counter,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.messages = messages
        self.attempts = Counter("dcrouter_delivery_attempts",
                                "Delivery attempts by mode and outcome "
                                "(success, transient, permanent).",
                                ["mode", "outcome"], registry=registry)
        self.latency = Histogram("dcrouter_delivery_duration_seconds",
                                 "Duration of delivery attempts by mode.", ["mode"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.in_progress = Gauge("dcrouter_delivery_in_progress", "Delivery attempts running now.",
                                 registry=registry)
        self._started: dict[str, float] = {}

    def on_delivery_start(self, item: Any) -> None:
        """An attempt begins."""
        now = self.clock()
        if len(self._started) > 10000:
            self._started = {k: t for k, t in self._started.items()
                             if now - t < self.STALE_AFTER}
        self._started[_item_id(item)] = now
        self.in_progress.set(len(self._started))

    def _finish(self, item: Any, outcome: str) -> None:
        mode = _item_mode(item)
        started = self._started.pop(_item_id(item), None)
        self.in_progress.set(len(self._started))
        self.attempts.labels(mode=mode, outcome=outcome).inc()
        if started is not None:
            self.latency.labels(mode=mode).observe(max(0.0, self.clock() - started))

    def on_delivery_success(self, item: Any, result: Any = None) -> None:
        """Every recipient of the item was delivered."""
        self._finish(item, "success")
        self.messages.labels(mode=_item_mode(item), outcome="delivered").inc()

    def on_delivery_failed(self, item: Any, error: Any = None, permanent: bool = False) -> None:
        """The attempt failed; ``permanent`` means the item bounced."""
        self._finish(item, "permanent" if permanent else "transient")
        self.messages.labels(mode=_item_mode(item),
                             outcome="bounced" if permanent else "deferred").inc()


class StatsCollector(Collector):
    """Reads every service's ``get_stats()`` at scrape time and exposes the figures."""

    def __init__(self, context: RouterContext) -> None:
        self.context = context
        self.errors = 0

    def _stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, service in list(self.context.services.items()):
            try:
                stats = service.get_stats()
            except Exception as e:  # one broken service must not break the scrape
                self.errors += 1
                log.failure("get_stats of {service} failed", service=name, error=str(e))
                continue
            out[name] = stats if isinstance(stats, dict) else {}
        return out

    def collect(self) -> Iterable[Metric]:
        """Build the metric families from the current figures."""
        stats = self._stats()
        info = GaugeMetricFamily("dcrouter_info", "dcrouter version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        router = self.context.router
        started = getattr(router, "started_at", None)
        uptime = GaugeMetricFamily("dcrouter_uptime_seconds", "Seconds since the router started.")
        uptime.add_metric([], (time.time() - started) if started else 0.0)
        yield uptime
        up = GaugeMetricFamily("dcrouter_service_running", "1 when the service is running.",
                               labels=["service"])
        for name, service in list(self.context.services.items()):
            up.add_metric([name], 1.0 if getattr(service, "running", False) else 0.0)
        yield up
        yield from self._queue(stats.get("email", {}))
        yield from self._scans(stats.get("email", {}))
        yield from self._proxy(stats.get("proxy", {}))
        yield from self._dns(stats.get("dns", {}))
        generic = GaugeMetricFamily("dcrouter_service_stat",
                                    "Every numeric figure of the services' get_stats(), "
                                    "by service and dotted key.", labels=["service", "key"])
        for name, figures in stats.items():
            for key, value in flatten(figures):
                generic.add_metric([name, key], value)
        yield generic
        errors = CounterMetricFamily("dcrouter_stats_errors", "Failed get_stats() calls.")
        errors.add_metric([], self.errors)
        yield errors

    @staticmethod
    def _queue(email: dict[str, Any]) -> Iterator[Metric]:
        queue = email.get("queue") if isinstance(email, dict) else None
        if not isinstance(queue, dict):
            return
        depth = GaugeMetricFamily("dcrouter_queue_depth", "Queue items by status.",
                                  labels=["status"])
        by_status = queue.get("by_status") or queue.get("statuses")
        if isinstance(by_status, dict):
            for status, count in sorted(by_status.items()):
                value = _number(count)
                if value is not None:
                    depth.add_metric([str(status)], value)
        else:
            for key in ("size", "depth", "total", "items"):
                value = _number(queue.get(key))
                if value is not None:
                    depth.add_metric(["all"], value)
                    break
        yield depth

    @staticmethod
    def _scans(email: dict[str, Any]) -> Iterator[Metric]:
        processor = email.get("processor") if isinstance(email, dict) else None
        if not isinstance(processor, dict):
            return
        verdicts = processor.get("scan_verdicts") or processor.get("scans")
        if not isinstance(verdicts, dict):
            # the processor's flat counters: scan_<scanner>_<verdict>
            counters = processor.get("counters")
            if not isinstance(counters, dict):
                return
            verdicts = {}
            for key, count in counters.items():
                if str(key).startswith("scan_") and str(key).count("_") >= 2:
                    scanner, _, verdict = str(key)[5:].rpartition("_")
                    verdicts.setdefault(scanner, {})[verdict] = count
            if not verdicts:
                return
        family = CounterMetricFamily("dcrouter_scan_verdicts",
                                     "Content-scan verdicts by scanner and verdict.",
                                     labels=["scanner", "verdict"])
        for scanner, by_verdict in sorted(verdicts.items()):
            if isinstance(by_verdict, dict):
                for verdict, count in sorted(by_verdict.items()):
                    value = _number(count)
                    if value is not None:
                        family.add_metric([str(scanner), str(verdict)], value)
        yield family

    @staticmethod
    def _proxy(proxy: dict[str, Any]) -> Iterator[Metric]:
        routes = proxy.get("routes") if isinstance(proxy, dict) else None
        if not isinstance(routes, dict):
            return
        connections = CounterMetricFamily("dcrouter_proxy_connections",
                                          "Proxied connections per route.", labels=["route"])
        active = GaugeMetricFamily("dcrouter_proxy_connections_active",
                                   "Open proxied connections per route.", labels=["route"])
        transferred = CounterMetricFamily("dcrouter_proxy_bytes",
                                          "Bytes proxied per route and direction "
                                          "(in: client to target, out: target to client).",
                                          labels=["route", "direction"])
        requests = CounterMetricFamily("dcrouter_proxy_http_requests",
                                       "HTTP requests relayed per route (HTTP routes).",
                                       labels=["route"])
        failures = CounterMetricFamily("dcrouter_proxy_errors",
                                       "Proxy errors per route and kind.",
                                       labels=["route", "kind"])
        for name, figures in sorted(routes.items()):
            if not isinstance(figures, dict):
                continue
            total = _first(figures, ("connections_total", "connections", "total_connections"))
            if total is not None:
                connections.add_metric([str(name)], total)
            if isinstance(figures.get("requests"), (int, float)):
                requests.add_metric([str(name)], figures["requests"])
            current = _first(figures, ("active_connections", "active", "connections_active"))
            if current is not None:
                active.add_metric([str(name)], current)
            for direction, keys in (("in", ("bytes_in", "bytes_received", "bytes_from_client")),
                                    ("out", ("bytes_out", "bytes_sent", "bytes_to_client"))):
                value = _first(figures, keys)
                if value is not None:
                    transferred.add_metric([str(name), direction], value)
            kinds = figures.get("errors")
            if isinstance(kinds, dict):
                for kind, count in sorted(kinds.items()):
                    value = _number(count)
                    if value is not None:
                        failures.add_metric([str(name), str(kind)], value)
        yield connections
        yield active
        yield requests
        yield transferred
        yield failures

    @staticmethod
    def _dns(dns: dict[str, Any]) -> Iterator[Metric]:
        if not isinstance(dns, dict):
            return
        rcodes = dns.get("by_rcode") or dns.get("queries_by_rcode") or dns.get("rcodes")
        if isinstance(rcodes, dict):
            family = CounterMetricFamily("dcrouter_dns_queries", "DNS queries answered by rcode.",
                                         labels=["rcode"])
            for rcode, count in sorted(rcodes.items()):
                value = _number(count)
                if value is not None:
                    family.add_metric([str(rcode)], value)
            yield family
        types = dns.get("by_type") or dns.get("queries_by_type")
        if isinstance(types, dict):
            family = CounterMetricFamily("dcrouter_dns_queries_by_type",
                                         "DNS queries by question type.", labels=["qtype"])
            for qtype, count in sorted(types.items()):
                value = _number(count)
                if value is not None:
                    family.add_metric([str(qtype)], value)
            yield family


def _first(figures: dict[str, Any], keys: Iterable[str]) -> Optional[float]:
    for key in keys:
        value = _number(figures.get(key))
        if value is not None:
            return value
    return None


def flatten(figures: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(dotted key, value)`` of every numeric leaf of nested dicts."""
    if isinstance(figures, dict):
        for key, value in figures.items():
            yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return
    value = _number(figures)
    if value is not None and prefix:
        yield prefix, value


def find_number(figures: Any, *paths: str) -> Optional[float]:
    """The first of the dotted ``paths`` that leads to a number in nested dicts."""
    for path in paths:
        node = figures
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        value = _number(node)
        if value is not None:
            return value
    return None


class ApiMetrics:
    """One router's metrics: the registry, its observers and the scrape-time collector."""

    def __init__(self, context: RouterContext) -> None:
        self.context = context
        self.registry = CollectorRegistry(auto_describe=False)
        self.email_events = EmailEventMetrics(self.registry, self._modes_for)
        self.delivery = DeliveryMetrics(self.registry, self.email_events.messages)
        self.api_requests = Counter("dcrouter_api_requests", "API requests by method and status.",
                                    ["method", "status"], registry=self.registry)
        self.api_auth_failures = Counter("dcrouter_api_auth_failures",
                                         "Refused API authentications (401 and 429).",
                                         ["status"], registry=self.registry)
        self.collector = StatsCollector(context)
        self.registry.register(self.collector)
        self._wired: set[tuple[str, int]] = set()
        self.wire_observers()

    # -- observers ---------------------------------------------------------
    def wire_observers(self) -> None:
        """Register the observers with the email service (again after a reload adds it).

        Uses the parts' ``add_observer`` when they have one; otherwise the
        shared ``context.extensions`` lists the router hands to the parts.
        """
        email = self.context.services.get("email")
        if ("extensions", id(self.context.extensions)) not in self._wired:
            self._wired.add(("extensions", id(self.context.extensions)))
            server = getattr(email, "server", None)
            delivery = getattr(email, "delivery", None)
            if not callable(getattr(server, "add_observer", None)):
                self.context.extensions.email_observers.append(self.email_events)
            if not callable(getattr(delivery, "add_observer", None)):
                self.context.extensions.delivery_observers.append(self.delivery)
        if email is None:
            return
        for part_name, observer in (("server", self.email_events), ("delivery", self.delivery)):
            part = getattr(email, part_name, None)
            add = getattr(part, "add_observer", None)
            if callable(add) and ("part", id(part)) not in self._wired:
                self._wired.add(("part", id(part)))
                add(observer)

    def _modes_for(self, recipients: list[str]) -> set[str]:
        """The routing modes of ``recipients`` under the current rules."""
        email = self.context.services.get("email")
        domain_router = getattr(email, "domain_router", None)
        options = self.context.options.email
        default = options.default_mode if options is not None else "unknown"
        match = getattr(domain_router, "match_rule", None)
        modes = set()
        for recipient in recipients:
            rule = None
            if callable(match):
                try:
                    rule = match(recipient)
                except Exception:
                    rule = None
            mode = getattr(rule, "mode", None)
            if mode is None and isinstance(rule, tuple) and rule:
                mode = getattr(rule[0], "mode", None)
            modes.add(str(mode or default))
        return modes

    # -- exposition ----------------------------------------------------------
    def render(self, accept: Optional[str]) -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def summary(self) -> dict[str, float]:
        """Totals the status page turns into rates."""
        return {
            "smtp_sessions_total": metric_total(self.email_events.sessions),
            "smtp_sessions_active": self.registry.get_sample_value(
                "dcrouter_smtp_sessions_active") or 0.0,
            "messages_accepted_total": float(self.email_events.accepted_messages),
            "delivery_attempts_total": metric_total(self.delivery.attempts),
        }
