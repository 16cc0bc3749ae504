"""What each API endpoint does, independent of ``twisted.web``.

:data:`ENDPOINTS` is the table the dispatcher (:mod:`dcrouter.api.resources`)
routes by and the OpenAPI document (:mod:`dcrouter.api.openapi`) is built
from.  Handlers take an :class:`ApiRequest` and return a :class:`Reply`, a
plain dict (200), or a Deferred of either; they raise
:class:`~dcrouter.api.errors.ApiError` for every refusal.

Services are reached duck-typed through the router context: a service or
method that is absent gives a clear 503, never an AttributeError.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any, Callable, Optional
from urllib.parse import unquote

from twisted.internet import defer, threads

from dcrouter import __version__
from dcrouter.api import errors
from dcrouter.api.metrics import ApiMetrics, find_number
from dcrouter.api.persist import apply_persisted_rules, save_rules
from dcrouter.config.base import build, unbuild
from dcrouter.config.email import DomainRuleOptions, check_address_pattern
from dcrouter.config.loader import load_config
from dcrouter.errors import ConfigError, QueueError
from dcrouter.logsetup import get_logger
from dcrouter.service import RouterContext

log = get_logger("api")

MAX_QUEUE_PAGE = 1000


@dataclasses.dataclass
class ApiRequest:
    """One API call as the handlers see it."""

    method: str
    path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    body: bytes
    content_type: str
    client_ip: str

    def arg(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        """The body parsed as JSON (400 when it is not JSON)."""
        if self.content_type and "json" not in self.content_type.lower():
            raise errors.ApiError(415, "unsupported_media_type",
                                  f"the body must be application/json, not {self.content_type}")
        if not self.body.strip():
            raise errors.bad_request("a JSON body is required")
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise errors.bad_request(f"the body is not valid JSON: {e}") from None


@dataclasses.dataclass
class Reply:
    """A JSON answer with a status other than 200 (or extra headers)."""

    body: Any
    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One method on one path template (``/api/queue/{id}``)."""

    method: str
    template: str
    handler: str
    summary: str
    public: bool = False
    tag: str = ""

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
    Endpoint("GET", "/metrics", "prometheus_metrics",
             "Prometheus metrics (text exposition format).",
             tag="metrics"),
)


def jsonable(value: Any) -> Any:
    """``value`` made JSON-safe: objects with ``to_dict``, dataclasses, tuples, sets, bytes."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return jsonable(to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return str(value)


class ApiHandlers:
    """The endpoint implementations of one router's API."""

    def __init__(self, context: RouterContext, metrics: ApiMetrics,
                 openapi: Callable[[], dict]) -> None:
        self.context = context
        self.metrics = metrics
        self._openapi = openapi
        self._rules_lock = defer.DeferredLock()

    # -- router ---------------------------------------------------------------
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
        return {
            "version": __version__,
            "started_at": started,
            "uptime": (time.time() - started) if started else 0.0,
            "services": services,
        }

    def stats(self, request: ApiRequest) -> dict:
        """Every service's ``get_stats()`` plus a summary of totals."""
        started = getattr(self.context.router, "started_at", None)
        out: dict[str, Any] = {
            "version": __version__,
            "uptime": (time.time() - started) if started else 0.0,
        }
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
        router = self._router("reload")
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

    def _router(self, what: str) -> Any:
        router = self.context.router
        if router is None or not callable(getattr(router, what, None)):
            raise errors.service_unavailable(f"the router does not support {what}")
        return router

    # -- email rules ------------------------------------------------------------
    def _email_options(self) -> Any:
        email = self.context.options.email
        if email is None or "email" not in self.context.services:
            raise errors.service_unavailable("the email service is not configured")
        return email

    def _find(self, rules: tuple, pattern: str) -> int:
        email = self._email_options()
        try:
            wanted = check_address_pattern(pattern, "pattern")
        except ConfigError:
            wanted = pattern
        for i, rule in enumerate(rules):
            if rule.pattern == wanted or (not email.case_sensitive
                                          and rule.pattern.lower() == wanted.lower()):
                return i
        raise errors.not_found(f"no domain rule with pattern '{pattern}'")

    def list_rules(self, request: ApiRequest) -> dict:
        """The rules in the order the router holds them."""
        email = self._email_options()
        return {"rules": [unbuild(r) for r in email.domain_rules],
                "persisted": self._persist_enabled()}

    def get_rule(self, request: ApiRequest) -> dict:
        """One rule by pattern."""
        rules = self._email_options().domain_rules
        return {"rule": unbuild(rules[self._find(rules, request.params["pattern"])])}

    @staticmethod
    def _build_rule(data: Any, where: str = "rule") -> DomainRuleOptions:
        if not isinstance(data, dict):
            raise errors.bad_request("the body must be a JSON object (one domain rule)")
        try:
            return build(DomainRuleOptions, data, where)
        except ConfigError as e:
            raise errors.invalid_config(e) from None

    def add_rule(self, request: ApiRequest) -> defer.Deferred:
        """Validate and append (or insert at ``?position=``) a rule."""
        data = request.json()
        position = request.arg("position")
        rule = self._build_rule(data)

        def change(rules: list) -> Reply:
            try:
                self._find(tuple(rules), rule.pattern)
            except errors.ApiError:
                pass
            else:
                raise errors.conflict(f"a rule with pattern '{rule.pattern}' exists; "
                                      "use PUT to replace it")
            index = len(rules)
            if position is not None:
                try:
                    index = int(position)
                except ValueError:
                    raise errors.bad_request(f"position must be an integer, got '{position}'")
                if not 0 <= index <= len(rules):
                    raise errors.bad_request(f"position must be 0..{len(rules)}, got {index}")
            rules.insert(index, rule)
            return Reply({"rule": unbuild(rule), "position": index}, status=201)

        return self._change_rules(change, request, "added", rule.pattern)

    def replace_rule(self, request: ApiRequest) -> defer.Deferred:
        """Replace a rule in place; the body's pattern may rename it."""
        data = request.json()
        pattern = request.params["pattern"]
        if isinstance(data, dict) and "pattern" not in data:
            data = dict(data, pattern=pattern)
        rule = self._build_rule(data)

        def change(rules: list) -> dict:
            index = self._find(tuple(rules), pattern)
            others = tuple(r for i, r in enumerate(rules) if i != index)
            try:
                self._find(others, rule.pattern)
            except errors.ApiError:
                pass
            else:
                raise errors.conflict(f"another rule has pattern '{rule.pattern}'")
            rules[index] = rule
            return {"rule": unbuild(rule), "position": index}

        return self._change_rules(change, request, "replaced", pattern)

    def remove_rule(self, request: ApiRequest) -> defer.Deferred:
        """Remove a rule by pattern."""
        pattern = request.params["pattern"]

        def change(rules: list) -> dict:
            removed = rules.pop(self._find(tuple(rules), pattern))
            return {"removed": unbuild(removed)}

        return self._change_rules(change, request, "removed", pattern)

    def _persist_enabled(self) -> bool:
        api = self.context.options.api
        return bool(api is not None and api.persist_rules)

    def _change_rules(self, change: Callable[[list], Any], request: ApiRequest, verb: str,
                      pattern: str) -> defer.Deferred:
        """Apply ``change`` to a copy of the rules under a lock, through the router."""
        @defer.inlineCallbacks
        def locked() -> Any:
            email = self._email_options()
            router = self._router("update_domain_rules")
            rules = list(email.domain_rules)
            result = change(rules)
            try:
                yield defer.maybeDeferred(router.update_domain_rules, rules)
            except ConfigError as e:
                raise errors.invalid_config(e)
            if self._persist_enabled():
                state_dir = self.context.options.router.state_dir
                yield threads.deferToThread(save_rules, state_dir, rules)
            log.info("domain rule {pattern} {verb} through the API", pattern=pattern, verb=verb,
                     client_ip=request.client_ip, rules=len(rules))
            return result
        return self._rules_lock.run(locked)

    # -- queue ------------------------------------------------------------------
    def _queue_call(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:
        email = self.context.services.get("email")
        if email is None:
            raise errors.service_unavailable("the email service is not configured")
        queue = getattr(email, "queue", None)
        func = getattr(queue, method, None)
        if not callable(func):
            raise errors.service_unavailable(f"the delivery queue does not support {method}")
        d = defer.maybeDeferred(func, *args, **kwargs)
        d.addErrback(_queue_failure)
        return d

    @defer.inlineCallbacks
    def list_queue(self, request: ApiRequest) -> Any:
        """``?status=&limit=&cursor=`` -> ``{"items", "next_cursor"}``."""
        limit_text = request.arg("limit", "100")
        try:
            limit = int(limit_text or "100")
        except ValueError:
            raise errors.bad_request(f"limit must be an integer, got '{limit_text}'")
        if not 1 <= limit <= MAX_QUEUE_PAGE:
            raise errors.bad_request(f"limit must be 1..{MAX_QUEUE_PAGE}, got {limit}")
        status = request.arg("status") or None
        cursor = request.arg("cursor") or None
        try:
            result = yield self._queue_call("list_items", status=status, limit=limit,
                                            cursor=cursor)
        except errors.ApiError as e:
            if e.status == 409:  # the queue refused the query itself (an unknown status)
                raise errors.bad_request(e.message) from None
            raise
        if isinstance(result, tuple) and len(result) == 2:
            items, next_cursor = result
        else:
            items, next_cursor = result, None
        return {"items": [jsonable(i) for i in items], "next_cursor": next_cursor,
                "count": len(items)}

    @defer.inlineCallbacks
    def get_item(self, request: ApiRequest) -> Any:
        """One item, or 404."""
        item_id = request.params["id"]
        item = yield self._queue_call("get_item", item_id)
        if item is None:
            raise errors.not_found(f"no queue item '{item_id}'")
        return {"item": jsonable(item)}

    @defer.inlineCallbacks
    def retry_item(self, request: ApiRequest) -> Any:
        """Make one item due now."""
        item_id = request.params["id"]
        done = yield self._queue_call("retry_now", item_id)
        if done is False:
            yield self._refuse_existing(item_id, "retried (only waiting items can be)")
        log.info("queue item {queue_id} retried through the API", queue_id=item_id,
                 client_ip=request.client_ip)
        return {"id": item_id, "retried": True}

    @defer.inlineCallbacks
    def _refuse_existing(self, item_id: str, verb: str) -> Any:
        """After the queue said no: 404 for an unknown id, 409 naming the item's status."""
        item = None
        try:
            item = yield self._queue_call("get_item", item_id)
        except errors.ApiError:
            item = None
        if item is None:
            raise errors.not_found(f"no queue item '{item_id}'")
        status = jsonable(item).get("status", "unknown") if hasattr(item, "to_dict") or \
            isinstance(item, dict) else getattr(item, "status", "unknown")
        raise errors.conflict(f"queue item '{item_id}' is {status} and cannot be {verb}")

    @defer.inlineCallbacks
    def retry_all(self, request: ApiRequest) -> Any:
        """Make every deferred item due now."""
        count = yield self._queue_call("retry_all")
        log.info("every queue item retried through the API", client_ip=request.client_ip)
        return {"retried": count if isinstance(count, int) else True}

    @defer.inlineCallbacks
    def delete_item(self, request: ApiRequest) -> Any:
        """Forget one item without a bounce."""
        item_id = request.params["id"]
        done = yield self._queue_call("delete", item_id)
        if done is False:
            yield self._refuse_existing(item_id, "deleted")
        log.info("queue item {queue_id} deleted through the API", queue_id=item_id,
                 client_ip=request.client_ip)
        return {"id": item_id, "deleted": True}

    @defer.inlineCallbacks
    def pause_queue(self, request: ApiRequest) -> Any:
        """Stop starting deliveries (items keep arriving)."""
        yield self._queue_call("pause")
        log.info("queue paused through the API", client_ip=request.client_ip)
        return {"paused": True}

    @defer.inlineCallbacks
    def resume_queue(self, request: ApiRequest) -> Any:
        """Start deliveries again."""
        yield self._queue_call("resume")
        log.info("queue resumed through the API", client_ip=request.client_ip)
        return {"paused": False}

    @defer.inlineCallbacks
    def flush_queue(self, request: ApiRequest) -> Any:
        """Attempt every deferred item now."""
        count = yield self._queue_call("flush")
        log.info("queue flushed through the API", client_ip=request.client_ip)
        return {"flushed": count if isinstance(count, int) else True}

    # -- proxy and DNS --------------------------------------------------------
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
            entry = unbuild(route)
            name = route.name or f"routes[{i}]"
            entry["name"] = name
            stats = per_route.get(name) if isinstance(per_route, dict) else None
            entry["stats"] = jsonable(stats) if isinstance(stats, dict) else {}
            routes.append(entry)
        return {"routes": routes}

    @defer.inlineCallbacks
    def dns_zones(self, request: ApiRequest) -> Any:
        """The DNS service's zones (its own view when it offers ``zones()``)."""
        dns = self.context.options.dns
        service = self.context.services.get("dns")
        if dns is None or service is None:
            raise errors.service_unavailable("the DNS service is not configured")
        zones_of = getattr(service, "zones", None)
        if callable(zones_of):
            zones = yield defer.maybeDeferred(zones_of)
            return {"zones": jsonable(zones)}
        return {"zones": [unbuild(z) for z in dns.zones]}



def _queue_failure(failure: Any) -> Any:
    """Queue exceptions -> API errors (unknown id: 404, refused: 409)."""
    if failure.check(errors.ApiError):
        return failure
    if failure.check(KeyError, LookupError):
        value = failure.value
        text = value.args[0] if isinstance(value, KeyError) and value.args else str(value)
        raise errors.not_found(f"no queue item {text!r}" if isinstance(text, str)
                               else "no such queue item")
    if failure.check(QueueError):
        message = str(failure.value)
        if message.lower().startswith("unknown status"):
            raise errors.bad_request(message)
        if "not found" in message.lower() or "unknown" in message.lower() \
                or "no such" in message.lower():
            raise errors.not_found(message)
        raise errors.conflict(message)
    if failure.check(ValueError):
        raise errors.bad_request(str(failure.value))
    return failure
