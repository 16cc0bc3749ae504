"""The OpenAPI 3 document of the management API, served at ``/api/openapi.json``.

Built from :data:`dcrouter.api.handlers.ENDPOINTS` (so no endpoint can be
missing) plus the per-endpoint details below: parameters, request bodies,
response schemas and the error responses each endpoint can give.
"""

from __future__ import annotations

import re
from typing import Any

from dcrouter import __version__
from dcrouter.api.console_schema import CONSOLE_DETAILS
from dcrouter.api.errors import ERROR_CODES
from dcrouter.api.handlers import ENDPOINTS, Endpoint
from dcrouter.api.queue_ops import MAX_QUEUE_PAGE

_ERROR_DESCRIPTIONS = {
    400: "Bad request (malformed JSON or query parameter).",
    401: "Missing or wrong bearer token.",
    403: "A cross-origin browser request, or (without a token) a Host that is not an IP "
         "address or localhost.",
    404: "No such resource.",
    409: "Conflicts with the current state.",
    413: "Request body too large.",
    415: "The body is not application/json.",
    422: "Failed validation; `path` names the key like a configuration error.",
    429: "Too many failed authentications from this address; see Retry-After.",
    500: "Unexpected failure; details are in the dcrouter log.",
    503: "The service or operation is not available in this router, or it did not answer "
         "within 30 s.",
}

_OBJ = {"type": "object", "additionalProperties": True}

_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One [[email.domain_rules]] table as JSON; validated exactly like the "
                   "configuration file (see docs/configuration.md).",
    "required": ["pattern", "mode"],
    "properties": {
        "pattern": {"type": "string", "example": "*@example.com"},
        "mode": {"type": "string", "enum": ["forward", "mta", "process"]},
        "target": {"type": "object", "properties": {"server": {"type": "string"},
                                                    "port": {"type": "integer"}}},
        "mta_options": _OBJ,
        "content_scanning": {"type": "boolean"},
        "scanners": {"type": "array", "items": _OBJ},
        "transformations": {"type": "array", "items": _OBJ},
        "rate_limits": _OBJ,
        "reject_on_dmarc_fail": {"type": "boolean"},
    },
    "additionalProperties": False,
}

_QUEUE_ITEM: dict[str, Any] = {
    "type": "object",
    "description": "One queue item: one rule's recipients of one message.",
    "properties": {
        "id": {"type": "string"}, "mode": {"type": "string"},
        "rule_pattern": {"type": "string"}, "mail_from": {"type": "string"},
        "recipients": {"type": "array", "items": {"type": "object", "properties": {
            "address": {"type": "string"}, "status": {"type": "string"},
            "code": {"type": "integer"}, "message": {"type": "string"}}}},
        "status": {"type": "string",
                   "enum": ["pending", "processing", "deferred", "delivered", "failed"]},
        "attempts": {"type": "integer"}, "next_attempt": {"type": "number"},
        "last_error": {"type": "string"}, "created_at": {"type": "number"},
        "updated_at": {"type": "number"}, "delivered_at": {"type": "number"},
        "correlation_id": {"type": "string"},
        "via": {"type": "object", "description": "How delivery finds the transport at each "
                "attempt: kind 'rule' (the rule named by rule_pattern; '' is the default "
                "route), 'address' (each recipient matched against the rules: DSNs) or "
                "'nexthop' (a literal next hop, never credentials).", "properties": {
                    "kind": {"type": "string", "enum": ["rule", "address", "nexthop"]},
                    "nexthop": _OBJ}},
        "destination": {"type": "string", "description": "Scheduling key: host:port, "
                        "'local' or the recipient domain."},
        "size": {"type": "integer"}, "is_bounce": {"type": "boolean"},
        "dkim": {"type": "object", "nullable": True, "properties": {
            "domain": {"type": "string"}, "selector": {"type": "string"}}},
    },
    "additionalProperties": True,
}

_PATTERN_PARAM = {"name": "pattern", "in": "path", "required": True,
                  "description": "The rule's pattern, percent-encoded ('*@example.com' or "
                                 "'%2A%40example.com'); a bare domain means '*@domain'.",
                  "schema": {"type": "string"}}
_ID_PARAM = {"name": "id", "in": "path", "required": True, "description": "Queue id.",
             "schema": {"type": "string"}}

_ZONE_PARAM = {"name": "zone", "in": "path", "required": True,
               "description": "A zone with dnssec = true, e.g. 'example.com.'",
               "schema": {"type": "string"}}
_DS_SCHEMA = {"type": "object", "properties": {
    "zone": {"type": "string"}, "ds": {"type": "array", "items": {"type": "string"}},
    "keys": {"type": "array", "items": _OBJ}, "waiting_for_ds": {"type": "integer", "nullable": True},
    "marked": {"type": "integer", "nullable": True}}}
#: handler name -> (parameters, request body schema, response schema, extra error statuses)
_DETAILS: dict[str, dict[str, Any]] = {
    "status": {"response": {"type": "object", "properties": {
        "version": {"type": "string"}, "uptime": {"type": "number"},
        "started_at": {"type": "number", "nullable": True},
        "services": {"type": "object", "additionalProperties": {
            "type": "object", "properties": {
                "running": {"type": "boolean"},
                "listeners": {"type": "array", "items": {"type": "object", "properties": {
                    "protocol": {"type": "string"}, "host": {"type": "string"},
                    "port": {"type": "integer"}}}}}}},
        "console": {"type": "object", "properties": {"interval": {
            "type": "number", "description": "Seconds between the console's refreshes "
            "(api.console_interval)."}}}}}},
    "stats": {"response": {"type": "object", "description": "version, uptime, one object per "
                           "service (its get_stats()) and `summary` (totals for rates: "
                           "smtp_sessions_total, messages_accepted_total, queue_depth, "
                           "proxy_connections_total, dns_queries_total, time).",
                           "additionalProperties": True}},
    "reload": {"response": {"type": "object", "properties": {
        "reloaded": {"type": "boolean"}, "config_path": {"type": "string"}}},
        "errors": [409, 422, 503]},
    "openapi": {"response": _OBJ, "errors": []},
    "list_rules": {"response": {"type": "object", "properties": {
        "rules": {"type": "array", "items": _RULE_SCHEMA}, "persisted": {"type": "boolean"}}},
        "errors": [503]},
    "add_rule": {"params": [{"name": "position", "in": "query", "required": False,
                             "description": "Insert at this index (default: append).",
                             "schema": {"type": "integer", "minimum": 0}}],
                 "body": _RULE_SCHEMA, "status": 201,
                 "response": {"type": "object", "properties": {"rule": _RULE_SCHEMA,
                                                               "position": {"type": "integer"}}},
                 "errors": [400, 409, 415, 422, 503]},
    "get_rule": {"params": [_PATTERN_PARAM], "response": {
        "type": "object", "properties": {"rule": _RULE_SCHEMA}}, "errors": [404, 503]},
    "replace_rule": {"params": [_PATTERN_PARAM], "body": _RULE_SCHEMA, "response": {
        "type": "object", "properties": {"rule": _RULE_SCHEMA, "position": {"type": "integer"}}},
        "errors": [400, 404, 409, 415, 422, 503]},
    "remove_rule": {"params": [_PATTERN_PARAM], "response": {
        "type": "object", "properties": {"removed": _RULE_SCHEMA}}, "errors": [404, 503]},
    "list_queue": {"params": [
        {"name": "status", "in": "query", "required": False,
         "description": "Only items with this status (pending, processing, deferred, "
                        "or recently finished: delivered, failed).",
         "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_QUEUE_PAGE, "default": 100}},
        {"name": "cursor", "in": "query", "required": False,
         "description": "next_cursor of the previous page.", "schema": {"type": "string"}}],
        "response": {"type": "object", "properties": {
            "items": {"type": "array", "items": _QUEUE_ITEM},
            "next_cursor": {"type": "string", "nullable": True},
            "count": {"type": "integer"}}},
        "errors": [400, 503]},
    "get_item": {"params": [_ID_PARAM], "response": {"type": "object", "properties": {
        "item": _QUEUE_ITEM}}, "errors": [404, 503]},
    "retry_item": {"params": [_ID_PARAM], "response": {"type": "object", "properties": {
        "id": {"type": "string"}, "retried": {"type": "boolean"}}}, "errors": [404, 409, 503]},
    "delete_item": {"params": [_ID_PARAM], "response": {"type": "object", "properties": {
        "id": {"type": "string"}, "deleted": {"type": "boolean"}}}, "errors": [404, 409, 503]},
    "retry_all": {"response": {"type": "object", "properties": {
        "retried": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}}}, "errors": [503]},
    "pause_queue": {"response": {"type": "object", "properties": {
        "paused": {"type": "boolean"}}}, "errors": [503]},
    "resume_queue": {"response": {"type": "object", "properties": {
        "paused": {"type": "boolean"}}}, "errors": [503]},
    "flush_queue": {"response": {"type": "object", "properties": {
        "flushed": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}}}, "errors": [503]},
    "proxy_routes": {"response": {"type": "object", "properties": {
        "routes": {"type": "array", "items": _OBJ}}}, "errors": [503]},
    "dns_zones": {"response": {"type": "object", "properties": {
        "zones": {"type": "array", "items": _OBJ}}}, "errors": [503]},
    "list_suppressed": {"response": {"type": "object", "properties": {
        "suppressed": {"type": "array", "items": {"type": "object", "properties": {
            "address": {"type": "string"}, "reason": {"type": "string"},
            "added": {"type": "number"}, "expires": {"type": "number"}}}},
        "count": {"type": "integer"}}}, "errors": [503]},
    "unsuppress": {"params": [{"name": "address", "in": "path", "required": True,
                               "description": "The recipient address, percent-encoded.",
                               "schema": {"type": "string"}}],
                   "response": {"type": "object", "properties": {
                       "removed": {"type": "string"}}}, "errors": [404, 503]},
    "dns_ds": {"params": [_ZONE_PARAM], "response": _DS_SCHEMA, "errors": [404, 503]},
    "dns_ds_submitted": {"params": [_ZONE_PARAM], "response": _DS_SCHEMA,
                         "errors": [404, 503]},
    "prometheus_metrics": {"content_type": "text/plain", "response": {"type": "string"},
                           "errors": []},
}


_DETAILS.update(CONSOLE_DETAILS)


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    details = _DETAILS.get(endpoint.handler, {})
    status = str(details.get("status", 200))
    content_type = details.get("content_type", "application/json")
    op: dict[str, Any] = {
        "operationId": endpoint.handler,
        "summary": endpoint.summary,
        "tags": [endpoint.tag] if endpoint.tag else [],
        "responses": {status: {"description": "Success.", "content": {
            content_type: {"schema": details.get("response", _OBJ)}}}},
    }
    if details.get("params"):
        op["parameters"] = details["params"]
    if details.get("body"):
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": details["body"]}}}
    error_statuses = set(details.get("errors", [503]))
    if not endpoint.public:
        error_statuses |= {401, 429}
        op["security"] = [{"bearer": []}]
    else:
        op["security"] = []
    error_statuses |= {403, 500}
    for code in sorted(error_statuses):
        op["responses"][str(code)] = {"description": _ERROR_DESCRIPTIONS[code], "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return op


def build_document() -> dict[str, Any]:
    """The whole OpenAPI 3.0 document."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        paths.setdefault(endpoint.template, {})[endpoint.method.lower()] = _operation(endpoint)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "dcrouter management API",
            "version": __version__,
            "description": "Status, figures, email domain rules, the delivery queue, proxy "
                           "routes, DNS zones, reload and Prometheus metrics. Every endpoint "
                           "except this document needs `Authorization: Bearer <api.token>` "
                           "when a token is configured. Errors are "
                           '`{"error": {"code": ..., "message": ...}}`.',
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "object", "required": ["code", "message"], "properties": {
                    "code": {"type": "string", "enum": sorted(ERROR_CODES)},
                    "message": {"type": "string"},
                    "path": {"type": "string", "description": "Key path (invalid_config)."},
                    "retry_after": {"type": "integer",
                                    "description": "Seconds (too_many_requests)."},
                }}}}},
        },
    }


def path_templates() -> list[str]:
    """Every documented path (for tests and the CLI's help)."""
    return sorted({e.template for e in ENDPOINTS})


def template_regex(template: str) -> re.Pattern[str]:
    """A regex matching concrete paths of ``template``."""
    return re.compile("^" + re.sub(r"\{\w+\}", "[^/]+", template) + "$")
