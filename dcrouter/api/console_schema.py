"""OpenAPI details of the console's endpoints and of the views they extend.

Merged into :data:`dcrouter.api.openapi._DETAILS`: the response schemas name
their required fields, so the tests validate real answers against them.
"""

from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_NUM_OR_NULL = {"type": "number", "nullable": True}
_OBJ = {"type": "object", "additionalProperties": True}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": True}
    if required:                       # OpenAPI 3.0: a required list is never empty
        schema["required"] = required
    return schema


_COUNTERS = _object(["accepted", "delivered", "deferred", "bounced"],
                    accepted=dict(_INT, description="Recipients accepted at end of DATA that "
                                                    "this rule routes."),
                    delivered=dict(_INT, description="Recipients delivered."),
                    deferred=dict(_INT, description="Delivery attempts deferred."),
                    bounced=dict(_INT, description="Recipients failed for good (bounced)."))

_SERIES = _object(["kind", "label", "points"],
                  kind={"type": "string", "enum": ["counter", "gauge"]}, label=_STR,
                  points={"type": "array", "items": _NUM_OR_NULL,
                          "description": "One value per bucket (null: no sample); a "
                                         "counter's growth in the bucket, a gauge's last "
                                         "value."})

_HISTORY = _object(
    ["start", "end", "step", "interval", "window", "times", "series"],
    start=_NUM, end=_NUM, now=_NUM,
    step=dict(_NUM, description="Seconds per bucket."),
    interval=dict(_NUM, description="Seconds between samples (api.history_interval)."),
    window=dict(_NUM, description="Seconds of samples kept (api.history_window)."),
    times={"type": "array", "items": _NUM, "description": "Start of each bucket (Unix time)."},
    series={"type": "object", "additionalProperties": _SERIES,
            "description": "email.accepted, email.delivered, email.deferred, email.bounced, "
                           "queue.depth, queue.deferred, proxy.connections, proxy.active, "
                           "proxy.bytes_in, proxy.bytes_out, proxy.requests, proxy.errors, "
                           "smtp.sessions, dns.queries.<RCODE>; only those with samples."})

_RULE_ROW = _object(["position", "pattern", "mode", "detail", "counters"],
                    position=dict(_INT, description="1 is considered first."),
                    config_index={"type": "integer", "nullable": True,
                                  "description": "Index in email.domain_rules."},
                    pattern=_STR, mode=_STR, detail=_STR, counters=_COUNTERS)

_ROUTING = _object(
    ["priority_order", "rules", "default", "other", "since"],
    priority_order=_STR, rules={"type": "array", "items": _RULE_ROW},
    default=_object(["mode", "detail", "counters"], mode=_STR, detail=_STR,
                    counters=_COUNTERS),
    other={"type": "array", "items": _object(["pattern", "counters", "why"], pattern=_STR,
                                             counters=_COUNTERS, why=_STR)},
    since=dict(_NUM, description="Counting since (the API service started)."))

_RCPT = _object(["address", "status", "reply"], address=_STR, status=_STR,
                code={"type": "integer", "nullable": True}, reply=_STR)
_DELIVERY = _object(
    ["time", "queue_id", "rule", "outcome", "recipients", "attempts"],
    time=_NUM, queue_id=_STR, rule=dict(_STR, description="Rule pattern; '' the default "
                                                           "route, '(dsn)' a bounce."),
    mode=_STR, destination=_STR, mail_from=_STR, attempts=_INT,
    outcome={"type": "string", "enum": ["delivered", "deferred", "bounced"]},
    error=_STR, recipients={"type": "array", "items": _RCPT}, more_recipients=_INT,
    delivered=_INT, bounced=_INT, correlation_id=_STR)
_DELIVERIES = _object(["deliveries", "failures", "since", "size"],
                      deliveries={"type": "array", "items": _DELIVERY},
                      failures={"type": "array", "items": _DELIVERY}, since=_NUM, size=_INT)

_DESTINATION = _object(["destination", "total", "by_status", "oldest_age"],
                       destination=_STR, total=_INT,
                       by_status=_object(["pending", "processing", "deferred"],
                                         pending=_INT, processing=_INT, deferred=_INT),
                       oldest_age=dict(_NUM, description="Seconds since the oldest item of "
                                                         "this destination was queued."),
                       next_attempt=_NUM_OR_NULL, last_error=_STR)
_QUEUE_SUMMARY = _object(
    ["size", "paused", "by_status", "oldest_age", "destinations", "scanned", "complete",
     "items"],
    size=_INT, paused=_BOOL,
    by_status=_object(["pending", "processing", "deferred"], pending=_INT, processing=_INT,
                      deferred=_INT),
    oldest_age=_NUM, bytes={"type": "integer", "nullable": True},
    top_destinations={"type": "object", "additionalProperties": _INT},
    destinations={"type": "array", "items": _DESTINATION}, more_destinations=_INT,
    scanned=dict(_INT, description="Items read (oldest first) to split destinations by "
                                   "status; at most 2000."),
    complete=dict(_BOOL, description="False when the queue holds more than were read."),
    items={"type": "array", "items": _OBJ, "description": "The 50 oldest items (as "
                                                          "GET /api/queue gives them)."},
    time=_NUM)

_CERT = _object(
    ["service", "source", "served_for", "subject", "names", "issuer", "not_before",
     "not_after", "days_left", "sha256"],
    service={"type": "string", "enum": ["proxy", "smtp", "api"]},
    source=dict(_STR, description="config, acme, self-signed or default."),
    served_for={"type": "array", "items": _STR}, subject=_STR,
    names={"type": "array", "items": _STR}, issuer=_STR, self_signed=_BOOL,
    not_before=_NUM, not_after=_NUM, days_left=_NUM, serial=_STR, sha256=_STR, key=_STR)
_ORDER = _object(["name", "state", "failures", "last_error"], name=_STR,
                 state={"type": "string",
                        "enum": ["valid", "due", "ordering", "failed", "skipped"]},
                 expires=_NUM_OR_NULL, days_left=_NUM_OR_NULL, renew_at=_NUM_OR_NULL,
                 failures=_INT, last_error=_STR, retry_at=_NUM_OR_NULL, directory=_STR,
                 challenge=_STR)
_DKIM = _object(["domain", "selector", "record_name", "record", "published", "signing"],
                domain=_STR, selector=_STR, record_name=_STR,
                record=dict(_STR, description="The TXT value to publish."), bits=_INT,
                published=dict(_BOOL, description="This router's DNS serves the record."),
                dns_served=_BOOL, signing=dict(_BOOL, description="Loaded for signing."),
                path=_STR, error=_STR)
_CERTIFICATES = _object(
    ["certificates", "acme", "dkim", "threshold_days", "warnings"],
    certificates={"type": "array", "items": _CERT}, acme={"type": "array", "items": _ORDER},
    dkim={"type": "array", "items": _DKIM}, threshold_days=_INT,
    warnings={"type": "array", "items": _object(
        ["level", "kind", "message"], level={"type": "string",
                                             "enum": ["info", "warning", "error"]},
        kind=_STR, subject=_STR, message=_STR, days_left=_NUM)},
    time=_NUM)

_TARGET = _object(["healthy", "active", "failures"], healthy=_BOOL, active=_INT,
                  failures=dict(_INT, description="Failed connects so far."),
                  since=dict(_NUM, description="When it last went up or down."),
                  last_error=_STR)
_ROUTE = _object(
    ["name", "ports", "domains", "mode", "targets", "stats"],
    name=_STR, ports={"type": "array", "items": {"oneOf": [_INT, _STR]}},
    domains={"type": "array", "items": _STR}, path_prefix=_STR, tls=_STR,
    mode={"type": "string", "enum": ["tls", "http", "tcp"]},
    targets={"type": "array", "items": _STR},
    stats=_object([], active_connections=_INT, total_connections=_INT, requests=_INT,
                  bytes_in=_INT, bytes_out=_INT,
                  errors={"type": "object", "additionalProperties": _INT},
                  targets={"type": "object", "additionalProperties": _TARGET}))

_NOTIFY = _object(["zone", "target", "serial", "result", "at"], zone=_STR, target=_STR,
                  serial=_INT, result=dict(_STR, description="pending, acknowledged, an "
                                                             "rcode, or no reply after N "
                                                             "tries."), at=_NUM)
_ZONE = _object(
    ["origin", "serial", "record_count", "allow_transfer", "notify_targets", "notify"],
    origin=_STR, serial=_INT, record_count=_INT,
    records_by_type={"type": "object", "additionalProperties": _INT},
    allow_transfer={"type": "array", "items": _STR},
    notify_targets={"type": "array", "items": _STR},
    notify={"type": "array", "items": _NOTIFY},
    records={"type": "array", "items": _object(["name", "type", "ttl", "value"], name=_STR,
                                               type=_STR, ttl=_INT, value=_STR)})

_LIMIT = {"name": "limit", "in": "query", "required": False,
          "schema": {"type": "integer", "minimum": 1, "maximum": 50, "default": 20}}

#: handler name -> the same details as :data:`dcrouter.api.openapi._DETAILS`
CONSOLE_DETAILS: dict[str, dict[str, Any]] = {
    "history": {"params": [
        {"name": "minutes", "in": "query", "required": False,
         "description": "How far back; more than api.history_window gives the whole "
                        "window.",
         "schema": {"type": "integer", "minimum": 1, "default": 60}},
        {"name": "step", "in": "query", "required": False,
         "description": "Seconds per bucket (raised to api.history_interval).",
         "schema": {"type": "integer", "minimum": 1, "maximum": 3600, "default": 60}}],
        "response": _HISTORY, "errors": [400, 503]},
    "email_routing": {"response": _ROUTING, "errors": [503]},
    "deliveries": {"params": [_LIMIT], "response": _DELIVERIES, "errors": [400, 503]},
    "queue_summary": {"response": _QUEUE_SUMMARY, "errors": [503]},
    "certificates": {"response": _CERTIFICATES, "errors": [503]},
    "proxy_routes": {"response": _object(
        ["routes", "unrouted", "active_connections"], routes={"type": "array", "items": _ROUTE},
        unrouted={"type": "object", "additionalProperties": _INT,
                  "description": "Connections no route took, by reason."},
        active_connections=_INT), "errors": [503]},
    "dns_zones": {"params": [{"name": "records", "in": "query", "required": False,
                              "description": "false: leave each zone's records out.",
                              "schema": {"type": "boolean", "default": True}}],
                  "response": _object(["zones"], zones={"type": "array", "items": _ZONE}),
                  "errors": [400, 503]},
}
