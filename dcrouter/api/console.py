"""The JSON behind the operator console's views (every view's state under ``/api/...``).

:class:`ConsoleEndpoints` serves:

* ``/api/history`` - the figures history (:mod:`dcrouter.timeseries`) in
  buckets: mail per minute, queue depth, proxy connections and bytes, DNS
  answers by rcode;
* ``/api/email/routing`` - the domain rules in precedence order with their
  counters (:mod:`dcrouter.api.activity`);
* ``/api/queue/summary`` - the queue by status and by destination with the
  oldest item's age, and its oldest items;
* ``/api/email/deliveries`` - the last deliveries and failures with the
  reply text of the next hop;
* ``/api/certificates`` - certificates served, ACME orders, DKIM keys and
  warnings (:mod:`dcrouter.api.certview`).

Load stays bounded however many consoles poll: each answer is computed at
most once per :data:`CACHE_SECONDS` (certificates: :data:`CERT_CACHE_SECONDS`)
for all clients (:class:`SnapshotCache`), the queue summary reads at most
:data:`QUEUE_SCAN` items, and every list is capped.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Optional

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from dcrouter.api import errors
from dcrouter.api.activity import BOUNCE_KEY, DEFAULT_KEY, MailActivity
from dcrouter.api.certview import (DkimRecords, acme_orders, dkim_keys, served_certificates,
                                   signing_keys, threshold_days, warnings_for)
from dcrouter.api.types import ApiRequest, jsonable
from dcrouter.config.base import unbuild
from dcrouter.logsetup import get_logger
from dcrouter.service import RouterContext

log = get_logger("api.console")

CACHE_SECONDS = 1.0
CERT_CACHE_SECONDS = 10.0
#: Items the queue summary reads (oldest first) to split destinations by status.
QUEUE_SCAN = 2000
#: Oldest items listed by the queue summary.
QUEUE_ITEMS = 50
MAX_DESTINATIONS = 100
QUEUE_STATUSES = ("pending", "processing", "deferred")


class SnapshotCache:
    """Answers computed at most once per ``ttl`` seconds and key, shared by all callers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 64) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self._values: dict[Any, tuple[float, Any]] = {}
        self._running: dict[Any, list[defer.Deferred]] = {}
        self._producing: dict[Any, defer.Deferred] = {}
        self.computed = 0

    def get(self, key: Any, ttl: float, produce: Callable[[], Any]) -> defer.Deferred:
        """The fresh cached value of ``key``, else ``produce()``'s (one call for all waiters)."""
        hit = self._values.get(key)
        if hit is not None and self.clock() - hit[0] < ttl:
            return defer.succeed(hit[1])
        waiters = self._running.get(key)
        d: defer.Deferred = defer.Deferred(canceller=lambda waiter: self._forget(key, waiter))
        if waiters is not None:
            waiters.append(d)
            return d
        self._running[key] = [d]
        self.computed += 1
        running = defer.maybeDeferred(produce)

        def done(result: Any) -> None:
            waiting = self._running.pop(key, [])
            self._producing.pop(key, None)
            if isinstance(result, Failure):
                for waiter in waiting:
                    if not waiter.called:      # a waiter may have timed out (cancelled)
                        waiter.errback(result)
                return None
            if key not in self._values and len(self._values) >= self.max_keys:
                del self._values[next(iter(self._values))]
            self._values[key] = (self.clock(), result)
            for waiter in waiting:
                if not waiter.called:
                    waiter.callback(result)
            return None
        if not running.called:
            self._producing[key] = running
        running.addBoth(done)
        return d

    def _forget(self, key: Any, waiter: defer.Deferred) -> None:
        """A waiter gave up (its request timed out); when none is left, the work is cancelled
        (a hung store is not waited for)."""
        waiting = self._running.get(key, [])
        if waiter in waiting:
            waiting.remove(waiter)
        if not waiting and key in self._producing:
            self._producing.pop(key).cancel()


def _int_arg(request: ApiRequest, name: str, default: int, low: int, high: int) -> int:
    text = request.arg(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise errors.bad_request(f"{name} must be an integer, got '{text[:40]}'") from None
    if not low <= value <= high:
        raise errors.bad_request(f"{name} must be {low}..{high}, got {value}")
    return value


class ConsoleEndpoints:
    """The console's own endpoints (see the module docstring)."""

    def __init__(self, context: RouterContext, activity: MailActivity) -> None:
        self.context = context
        self.activity = activity
        self.cache = SnapshotCache()
        self.dkim_records = DkimRecords()

    # -- history --------------------------------------------------------------------------
    def history(self, request: ApiRequest) -> Any:
        """``?minutes=60&step=60``: buckets of the figures history."""
        history = getattr(self.context.router, "history", None)
        if history is None:
            raise errors.service_unavailable("this router keeps no figures history")
        window_minutes = max(1, int(history.window // 60))
        # more than the window holds is the whole window (the console asks for an hour)
        minutes = min(window_minutes, _int_arg(request, "minutes", 60, 1, 100_000))
        step = _int_arg(request, "step", 60, 1, 3600)
        step = max(step, int(history.interval + 0.999))   # no bucket shorter than a sample
        step = max(step, (minutes * 60 + 1439) // 1440)     # at most 1440 buckets
        return self.cache.get(("history", minutes, step), CACHE_SECONDS,
                              lambda: history.query(minutes * 60, step))

    # -- mail -----------------------------------------------------------------------------
    def _email(self) -> Any:
        email = self.context.services.get("email")
        if email is None or self.context.options.email is None:
            raise errors.service_unavailable("the email service is not configured")
        return email

    def email_routing(self, request: ApiRequest) -> dict[str, Any]:
        """Rules in precedence order with per-rule counters, the default route, the rest."""
        email = self._email()
        options = self.context.options.email
        router = getattr(email, "domain_router", None)
        ordered = router.rules_in_match_order() if router is not None else \
            list(options.domain_rules)
        configured = list(options.domain_rules)
        from dcrouter.email.routing import describe_rule
        rules = []
        seen = set()
        for position, rule in enumerate(ordered, start=1):
            seen.add(rule.pattern)
            index = next((i for i, r in enumerate(configured) if r is rule or r == rule), None)
            detail = describe_rule(rule)
            if detail.startswith(f"{rule.pattern} -> "):
                detail = detail[len(rule.pattern) + 4:]
            rules.append({"position": position, "config_index": index, "pattern": rule.pattern,
                          "mode": rule.mode, "detail": detail,
                          "counters": self.activity.counters_for(rule.pattern)})
        default_detail = str(options.default_mode)
        if options.default_mode == "forward" and options.default_server:
            default_detail += f" to {options.default_server}:{options.default_port}"
        others = [{"pattern": key, "counters": self.activity.counters_for(key),
                   "why": "DSNs (bounces) this router sent" if key == BOUNCE_KEY else
                   "built in, or no longer configured"}
                  for key in sorted(self.activity.rules)
                  if key not in seen and key != DEFAULT_KEY]
        return {"priority_order": getattr(router, "priority_order", options.priority_order),
                "rules": rules,
                "default": {"mode": options.default_mode, "detail": default_detail,
                            "counters": self.activity.counters_for(DEFAULT_KEY)},
                "other": others, "since": self.activity.since}

    def deliveries(self, request: ApiRequest) -> dict[str, Any]:
        """``?limit=``: the newest deliveries and failures with reply texts."""
        self._email()
        limit = _int_arg(request, "limit", 20, 1, self.activity.deliveries.maxlen or 50)
        return self.activity.recent(limit)

    def queue_summary(self, request: ApiRequest) -> Any:
        """By status and destination (oldest item's age each), and the oldest items."""
        self._email()
        return self.cache.get(("queue",), CACHE_SECONDS, self._queue_summary)

    @defer.inlineCallbacks
    def _queue_summary(self) -> Any:
        queue = getattr(self._email(), "queue", None)
        if queue is None or not callable(getattr(queue, "list_items", None)):
            raise errors.service_unavailable("the delivery queue cannot be listed")
        stats = queue.get_stats() if callable(getattr(queue, "get_stats", None)) else {}
        now = time.time()
        items: list[Any] = []
        cursor = None
        while len(items) < QUEUE_SCAN:
            result = yield defer.maybeDeferred(queue.list_items, None,
                                               min(1000, QUEUE_SCAN - len(items)), cursor)
            page, cursor = result if isinstance(result, tuple) else (result, None)
            items.extend(page)
            if not cursor or not page:
                break
        return self._summarise(stats, items, cursor is None, now)

    @staticmethod
    def _summarise(stats: dict, items: list[Any], complete: bool, now: float
                   ) -> dict[str, Any]:
        destinations: dict[str, dict[str, Any]] = {}
        for item in items:
            data = jsonable(item)
            name = str(data.get("destination") or "")
            entry = destinations.get(name)
            if entry is None:
                entry = destinations[name] = {"destination": name, "total": 0,
                                              "by_status": collections.Counter(),
                                              "oldest_created_at": None, "next_attempt": None,
                                              "last_error": ""}
            entry["total"] += 1
            entry["by_status"][str(data.get("status", ""))] += 1
            created = data.get("created_at")
            if isinstance(created, (int, float)) and (entry["oldest_created_at"] is None
                                                      or created < entry["oldest_created_at"]):
                entry["oldest_created_at"] = created
            due = data.get("next_attempt")
            if data.get("status") != "processing" and isinstance(due, (int, float)) and (
                    entry["next_attempt"] is None or due < entry["next_attempt"]):
                entry["next_attempt"] = due
            if data.get("last_error"):
                entry["last_error"] = str(data["last_error"])[:300]
        rows = sorted(destinations.values(), key=lambda e: (-e["total"], e["destination"]))
        for row in rows:
            row["by_status"] = {s: row["by_status"].get(s, 0) for s in QUEUE_STATUSES}
            oldest = row.pop("oldest_created_at")
            row["oldest_age"] = max(0.0, now - oldest) if oldest is not None else 0.0
        by_status = stats.get("by_status", {}) if isinstance(stats, dict) else {}
        return {
            "size": stats.get("size", len(items)),
            "paused": bool(stats.get("paused")),
            "by_status": {s: int(by_status.get(s, 0) or 0) for s in QUEUE_STATUSES},
            "oldest_age": float(stats.get("oldest_age") or 0.0),
            "bytes": stats.get("bytes"),
            "top_destinations": jsonable(stats.get("by_destination", {})),
            "destinations": rows[:MAX_DESTINATIONS],
            "more_destinations": max(0, len(rows) - MAX_DESTINATIONS),
            "scanned": len(items), "complete": complete,
            "items": [jsonable(i) for i in items[:QUEUE_ITEMS]],
            "time": now,
        }

    # -- certificates -----------------------------------------------------------------------
    def certificates(self, request: ApiRequest) -> Any:
        """Certificates served, ACME orders, DKIM keys, warnings."""
        return self.cache.get(("certificates",), CERT_CACHE_SECONDS, self._certificates)

    @defer.inlineCallbacks
    def _certificates(self) -> Any:
        now = time.time()
        certs = served_certificates(self.context, now)
        orders = acme_orders(self.context, now)
        zones = yield self._zone_dicts()
        keys = yield threads.deferToThread(dkim_keys, self.context, self.dkim_records, zones,
                                           signing_keys(self.context))
        threshold = threshold_days(self.context)
        certs.sort(key=lambda c: (c["service"], c["not_after"]))
        return {"certificates": certs, "acme": orders, "dkim": keys,
                "threshold_days": threshold,
                "warnings": warnings_for(certs, orders, keys, threshold), "time": now}

    @defer.inlineCallbacks
    def _zone_dicts(self) -> Any:
        service = self.context.services.get("dns")
        zones_of = getattr(service, "zones", None)
        if not callable(zones_of):
            return []
        try:
            zones = yield defer.maybeDeferred(zones_of)
        except Exception as e:
            log.failure("zones of dns failed", error=str(e))
            return []
        return jsonable(zones)


def zone_overview(context: RouterContext, zones: list[dict], records: bool) -> list[dict]:
    """The DNS zones with record counts, transfer peers and the last NOTIFY per secondary."""
    dns = context.options.dns
    service = context.services.get("dns")
    try:
        stats = service.get_stats() if service is not None else {}
    except Exception as e:
        log.failure("get_stats of dns failed", error=str(e))
        stats = {}
    last = stats.get("notify_last", []) if isinstance(stats, dict) else []
    allow = list(dns.allow_transfer) if dns is not None else []
    targets = list(dns.notify) if dns is not None else []
    out = []
    for zone in zones:
        entry = dict(zone)
        rows = zone.get("records", []) if isinstance(zone.get("records"), list) else []
        by_type: dict[str, int] = collections.Counter(str(r.get("type")) for r in rows)
        entry["record_count"] = len(rows)
        entry["records_by_type"] = dict(sorted(by_type.items()))
        entry["allow_transfer"] = allow
        entry["notify_targets"] = targets
        origin = str(zone.get("origin", ""))
        entry["notify"] = [dict(r) for r in last
                           if isinstance(r, dict) and _same_zone(str(r.get("zone", "")), origin)]
        if not records:
            entry.pop("records", None)
        out.append(entry)
    return out


def _same_zone(a: str, b: str) -> bool:
    return a.rstrip(".").lower() == b.rstrip(".").lower()


def route_entry(route: Any, name: str, stats: Optional[dict]) -> dict[str, Any]:
    """One proxy route as configured (secrets redacted) with its mode and figures."""
    entry = unbuild(route, redact=True)
    entry["name"] = name
    entry["mode"] = getattr(route, "mode", "")
    entry["stats"] = jsonable(stats) if isinstance(stats, dict) else {}
    return entry
