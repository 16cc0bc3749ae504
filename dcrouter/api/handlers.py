"""The endpoint table of the API and the router-wide endpoints.

:data:`ENDPOINTS` is the table the dispatcher (:mod:`dcrouter.api.resources`)
routes by and the OpenAPI document (:mod:`dcrouter.api.openapi`) is built
from.  Each endpoint names a group and a method: :class:`RouterEndpoints`
(status, stats, reload, proxy routes, DNS zones, the OpenAPI document),
:class:`~dcrouter.api.rules.RuleEndpoints` and
:class:`~dcrouter.api.queue_ops.QueueEndpoints`.  Handlers take an
:class:`~dcrouter.api.types.ApiRequest` and return a
:class:`~dcrouter.api.types.Reply`, a plain dict (200), or a Deferred of
either; they raise :class:`~dcrouter.api.errors.ApiError` for every refusal.

Services are reached duck-typed through the router context: a service or
method that is absent gives a clear 503, never an AttributeError.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Callable, Optional
from urllib.parse import unquote

from twisted.internet import defer, threads

from dcrouter import __version__
from dcrouter.api import errors
from dcrouter.api.activity import MailActivity
from dcrouter.api.console import ConsoleEndpoints, route_entry, zone_overview
from dcrouter.api.metrics import ApiMetrics, find_number
from dcrouter.api.persist import apply_persisted_rules
from dcrouter.api.queue_ops import QueueEndpoints
from dcrouter.api.rules import RuleEndpoints
from dcrouter.api.types import ApiRequest, jsonable, router_method
from dcrouter.config.base import unbuild
from dcrouter.config.loader import load_config
from dcrouter.errors import ConfigError
from dcrouter.logsetup import get_logger
from dcrouter.service import RouterContext

log = get_logger("api")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One method on one path template (``/api/queue/{id}``)."""

    method: str
    template: str
    handler: str
    summary: str
    public: bool = False
    tag: str = ""
    #: The handler group when it is not implied by the tag (``console``).
    handlers: str = ""

    @property
    def group(self) -> str:
        """The handler group: ``rules``, ``queue``, ``console``, or ``router`` for the rest."""
        if self.handlers:
            return self.handlers
        return self.tag if self.tag in ("rules", "queue") else "router"

    @property
    def regex(self) -> re.Pattern[str]:
        """The template as a regex over the raw (still percent-encoded) path."""
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template)
        return re.compile(f"^{pattern}$")

    def match(self, path: str) -> Optional[dict[str, str]]:
        """Decoded path parameters when ``path`` fits the template."""
        m = self.regex.match(path)
        if m is None:
            return None
        return {k: unquote(v) for k, v in m.groupdict().items()}


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("GET", "/api/status", "status", "Services, their listeners, uptime and version.",
             tag="router"),
    Endpoint("GET", "/api/stats", "stats", "Figures of every service plus a summary for rates.",
             tag="router"),
    Endpoint("POST", "/api/reload", "reload", "Re-read the configuration file (as SIGHUP).",
             tag="router"),
    Endpoint("GET", "/api/openapi.json", "openapi", "This OpenAPI 3 document.", public=True,
             tag="router"),
    Endpoint("GET", "/api/history", "history",
             "The last hour of figures in buckets (mail per minute, queue depth, proxy "
             "connections and bytes, DNS answers by rcode).", tag="router", handlers="console"),
    Endpoint("GET", "/api/certificates", "certificates",
             "Certificates served (proxy, SMTP, API) with issuer and expiry, ACME orders, DKIM "
             "keys and their DNS records, expiry warnings.", tag="router", handlers="console"),
    Endpoint("GET", "/api/email/routing", "email_routing",
             "Domain rules in precedence order with per-rule counters.", tag="email",
             handlers="console"),
    Endpoint("GET", "/api/email/deliveries", "deliveries",
             "The last deliveries and failures with the next hop's reply text.", tag="email",
             handlers="console"),
    Endpoint("GET", "/api/email/rules", "list_rules", "The email domain rules, in order.",
             tag="rules"),
    Endpoint("POST", "/api/email/rules", "add_rule",
             "Add a domain rule (validated like [[email.domain_rules]]).", tag="rules"),
    Endpoint("GET", "/api/email/rules/{pattern}", "get_rule", "One domain rule.", tag="rules"),
    Endpoint("PUT", "/api/email/rules/{pattern}", "replace_rule",
             "Replace a domain rule in place.", tag="rules"),
    Endpoint("DELETE", "/api/email/rules/{pattern}", "remove_rule", "Remove a domain rule.",
             tag="rules"),
    Endpoint("GET", "/api/queue", "list_queue", "Queue items, paginated.", tag="queue"),
    Endpoint("GET", "/api/queue/summary", "queue_summary",
             "The queue by status and by destination with the oldest item's age, and its "
             "oldest items.", tag="queue", handlers="console"),
    Endpoint("POST", "/api/queue/pause", "pause_queue", "Stop starting deliveries.",
             tag="queue"),
    Endpoint("POST", "/api/queue/resume", "resume_queue", "Start deliveries again.",
             tag="queue"),
    Endpoint("POST", "/api/queue/flush", "flush_queue",
             "Attempt every deferred item now (postqueue -f).", tag="queue"),
    Endpoint("POST", "/api/queue/retry", "retry_all", "Retry every deferred item now.",
             tag="queue"),
    Endpoint("GET", "/api/queue/{id}", "get_item", "One queue item.", tag="queue"),
    Endpoint("POST", "/api/queue/{id}/retry", "retry_item", "Retry one item now.", tag="queue"),
    Endpoint("DELETE", "/api/queue/{id}", "delete_item", "Delete one item (no bounce).",
             tag="queue"),
    Endpoint("GET", "/api/proxy/routes", "proxy_routes", "Proxy routes and their figures.",
             tag="proxy"),
    Endpoint("GET", "/api/dns/zones", "dns_zones", "Authoritative DNS zones.", tag="dns"),
    Endpoint("GET", "/api/dns/zones/{zone}/ds", "dns_ds",
             "A signed zone's DS records for the registrar and its DNSSEC keys.", tag="dns"),
    Endpoint("POST", "/api/dns/zones/{zone}/ds/submitted", "dns_ds_submitted",
             "The parent now serves the new KSK's DS: the rollover may finish.", tag="dns"),
    Endpoint("GET", "/api/email/suppression", "list_suppressed",
             "Recipients refused at RCPT after a hard bounce, with reason and expiry.",
             tag="email"),
    Endpoint("DELETE", "/api/email/suppression/{address}", "unsuppress",
             "Lift the suppression of one recipient.", tag="email"),
    Endpoint("GET", "/metrics", "prometheus_metrics",
             "Prometheus metrics (text exposition format).",
             tag="metrics"),
)


class RouterEndpoints:
    """Router-wide endpoints: status, stats, reload, proxy routes, DNS zones, OpenAPI."""

    def __init__(self, context: RouterContext, metrics: ApiMetrics,
                 openapi: Callable[[], dict]) -> None:
        self.context = context
        self.metrics = metrics
        self._openapi = openapi

    def status(self, request: ApiRequest) -> dict:
        """Services, listeners, uptime and version."""
        started = getattr(self.context.router, "started_at", None)
        services = {}
        for name, service in list(self.context.services.items()):
            try:
                listeners = [{"protocol": p, "host": h, "port": port}
                             for p, h, port in service.bound_addresses()]
            except Exception as e:
                log.failure("bound_addresses of {service} failed", service=name, error=str(e))
                listeners = []
            services[name] = {"running": bool(getattr(service, "running", False)),
                              "listeners": listeners}
        api = self.context.options.api
        return {
            "version": __version__,
            "started_at": started,
            "uptime": (time.time() - started) if started else 0.0,
            "services": services,
            "console": {"interval": api.console_interval if api is not None else 5.0},
        }

    def stats(self, request: ApiRequest) -> dict:
        """Every service's ``get_stats()`` plus a summary of totals."""
        started = getattr(self.context.router, "started_at", None)
        out: dict[str, Any] = {
            "version": __version__,
            "uptime": (time.time() - started) if started else 0.0,
        }
        worker = getattr(self.context, "worker", None)
        if worker is not None:  # router.workers > 1: these figures are worker 0's own
            out["worker"] = {"index": worker.index, "count": worker.count, "pid": os.getpid()}
        for name, service in list(self.context.services.items()):
            try:
                out[name] = jsonable(service.get_stats())
            except Exception as e:
                log.failure("get_stats of {service} failed", service=name, error=str(e))
                out[name] = {"error": "figures unavailable; see the log"}
        out["summary"] = self._summary(out)
        return out

    def _summary(self, stats: dict[str, Any]) -> dict[str, Any]:
        summary: dict[str, Any] = dict(self.metrics.summary())
        email = stats.get("email", {})
        depth = find_number(email, "queue.size", "queue.depth", "queue.total", "queue.items")
        if depth is None:
            by_status = email.get("queue", {}).get("by_status") if isinstance(email, dict) \
                else None
            if isinstance(by_status, dict):
                depth = float(sum(v for v in by_status.values()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)))
        summary["queue_depth"] = depth
        summary["queue_paused"] = bool(isinstance(email, dict) and isinstance(
            email.get("queue"), dict) and email["queue"].get("paused"))
        proxy = stats.get("proxy", {})
        total = find_number(proxy, "connections_total", "total_connections", "connections")
        if total is None and isinstance(proxy, dict) and isinstance(proxy.get("routes"), dict):
            total = float(sum(find_number(r, "connections_total", "connections",
                                          "total_connections") or 0
                              for r in proxy["routes"].values()))
        summary["proxy_connections_total"] = total
        summary["dns_queries_total"] = find_number(stats.get("dns", {}), "queries_total",
                                                   "queries", "total_queries")
        summary["time"] = time.time()
        return summary

    @defer.inlineCallbacks
    def reload(self, request: ApiRequest) -> Any:
        """Re-read the configuration file; a broken file is a 422 naming the key."""
        router = router_method(self.context, "reload")
        path = getattr(router, "config_path", None) or self.context.config_path
        if not path:
            raise errors.conflict("dcrouter was not started from a configuration file; "
                                  "there is nothing to reload")
        try:
            yield threads.deferToThread(lambda: apply_persisted_rules(load_config(path)))
        except ConfigError as e:
            log.warn("reload through the API refused: {error}", error=str(e), path=e.path)
            raise errors.invalid_config(e)
        ok = yield defer.maybeDeferred(router.reload)
        if not ok:
            raise errors.conflict("the configuration was not reloaded; see the dcrouter log")
        log.info("configuration reloaded through the API", client_ip=request.client_ip)
        return {"reloaded": True, "config_path": path}

    def openapi(self, request: ApiRequest) -> dict:
        """The OpenAPI document."""
        return self._openapi()

    def proxy_routes(self, request: ApiRequest) -> dict:
        """Configured routes with each route's figures when the proxy reports them."""
        proxy = self.context.options.proxy
        service = self.context.services.get("proxy")
        if proxy is None or service is None:
            raise errors.service_unavailable("the proxy service is not configured")
        try:
            figures = service.get_stats()
        except Exception as e:
            log.failure("get_stats of proxy failed", error=str(e))
            figures = {}
        per_route = figures.get("routes", {}) if isinstance(figures, dict) else {}
        routes = []
        for i, route in enumerate(proxy.routes):
            name = route.name or f"routes[{i}]"
            stats = per_route.get(name) if isinstance(per_route, dict) else None
            routes.append(route_entry(route, name, stats))
        unrouted = figures.get("unrouted", {}) if isinstance(figures, dict) else {}
        return {"routes": routes, "unrouted": jsonable(unrouted),
                "active_connections": figures.get("active_connections", 0)
                if isinstance(figures, dict) else 0}

    @defer.inlineCallbacks
    def dns_zones(self, request: ApiRequest) -> Any:
        """The DNS service's zones (its own view when it offers ``zones()``) with record
        counts, transfer peers and NOTIFY results; ``?records=false`` leaves the records out."""
        dns = self.context.options.dns
        service = self.context.services.get("dns")
        if dns is None or service is None:
            raise errors.service_unavailable("the DNS service is not configured")
        wanted = (request.arg("records") or "true").lower()
        if wanted not in ("true", "false", "1", "0"):
            raise errors.bad_request(f"records must be true or false, got '{wanted[:20]}'")
        zones_of = getattr(service, "zones", None)
        if callable(zones_of):
            zones = jsonable((yield defer.maybeDeferred(zones_of)))
        else:
            zones = [unbuild(z, redact=True) for z in dns.zones]
        return {"zones": zone_overview(self.context, zones, wanted in ("true", "1"))}

    @defer.inlineCallbacks
    def dns_ds(self, request: ApiRequest) -> Any:
        """DS records of a signed zone (``dcrouterctl dns ds ZONE``)."""
        return (yield self._dnssec_call("dnssec_status", request.params["zone"]))

    @defer.inlineCallbacks
    def dns_ds_submitted(self, request: ApiRequest) -> Any:
        """Confirm the parent serves the new DS (``dcrouterctl dns ds ZONE --submitted``)."""
        zone = request.params["zone"]
        result = yield self._dnssec_call("ds_submitted", zone)
        log.info("DS of {zone} confirmed through the API", zone=zone, tag=result.get("marked"),
                 client_ip=request.client_ip)
        return result

    @defer.inlineCallbacks
    def _dnssec_call(self, method: str, zone: str) -> Any:
        call = getattr(self.context.services.get("dns"), method, None)
        if call is None:
            raise errors.service_unavailable("the DNS service is not configured")
        result = yield defer.maybeDeferred(call, zone)
        if result is None:
            raise errors.not_found(f"{zone} is not a signed zone served here "
                                   "(dnssec = true in its [[dns.zones]] entry)")
        return jsonable(result)

    def _suppression(self) -> Any:
        email = self.context.services.get("email")
        suppression = getattr(getattr(email, "delivery", None), "suppression", None)
        if suppression is None:
            raise errors.service_unavailable("the email service is not configured")
        return suppression

    def list_suppressed(self, request: ApiRequest) -> dict:
        """Suppressed recipients: address, reason, added, expires."""
        entries = self._suppression().list()
        return {"suppressed": jsonable(entries), "count": len(entries)}

    def unsuppress(self, request: ApiRequest) -> dict:
        """Lift one suppression; 404 when the address is not suppressed."""
        address = request.params["address"]
        if not self._suppression().remove(address):
            raise errors.not_found(f"{address} is not suppressed")
        log.info("suppression of {address} lifted through the API", address=address,
                 client_ip=request.client_ip)
        return {"removed": address}


class ApiHandlers:
    """Every endpoint group of one router's API."""

    def __init__(self, context: RouterContext, metrics: ApiMetrics,
                 openapi: Callable[[], dict], activity: Optional[MailActivity] = None) -> None:
        self.activity = activity or MailActivity(context)
        self.groups: dict[str, Any] = {
            "router": RouterEndpoints(context, metrics, openapi),
            "rules": RuleEndpoints(context),
            "queue": QueueEndpoints(context),
            "console": ConsoleEndpoints(context, self.activity),
        }

    def handler_for(self, endpoint: "Endpoint") -> Callable[[ApiRequest], Any]:
        """The method that serves ``endpoint``."""
        return getattr(self.groups[endpoint.group], endpoint.handler)
