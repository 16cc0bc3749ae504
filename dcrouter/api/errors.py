"""Errors of the management API and their JSON shape.

Every error the API answers with is an :class:`ApiError`: an HTTP status,
a stable machine-readable ``code`` and a one-line ``message`` for people.
The body is always::

    {"error": {"code": "not_found", "message": "no queue item 'X'"}}

plus optional detail fields (``path`` for configuration errors,
``retry_after`` for rate limits).  Tracebacks are logged, never sent.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from dcrouter.errors import ConfigError, DcRouterError

#: The error codes the API uses, with their HTTP status (documented in the OpenAPI document).
ERROR_CODES: dict[str, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "request_timeout": 408,
    "payload_too_large": 413,
    "uri_too_long": 414,
    "unsupported_media_type": 415,
    "invalid_config": 422,
    "too_many_requests": 429,
    "request_header_fields_too_large": 431,
    "internal": 500,
    "service_unavailable": 503,
}


class ApiError(DcRouterError):
    """An error answered to an API client: status, code, message and optional details."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        self.status = status
        self.code = code
        self.details = details
        self.headers: dict[str, str] = {}
        super().__init__(message, status=status, code=code)

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"code", "message", ...details}}``."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        error.update(self.details)
        return {"error": error}

    def to_bytes(self) -> bytes:
        """The body encoded as UTF-8 JSON."""
        return json.dumps(self.body()).encode("utf-8")


def bad_request(message: str, **details: Any) -> ApiError:
    """400: the request cannot be understood (bad JSON, bad query parameter)."""
    return ApiError(400, "bad_request", message, **details)


def unauthorized(message: str = "a valid bearer token is required") -> ApiError:
    """401: missing or wrong token."""
    error = ApiError(401, "unauthorized", message)
    error.headers["WWW-Authenticate"] = 'Bearer realm="dcrouter"'
    return error


def forbidden(message: str) -> ApiError:
    """403: refused whatever the token (a cross-origin browser request, a foreign Host)."""
    return ApiError(403, "forbidden", message)


def not_found(message: str) -> ApiError:
    """404: no such resource."""
    return ApiError(404, "not_found", message)


def method_not_allowed(method: str, allowed: list[str]) -> ApiError:
    """405: the path exists but not with this method."""
    error = ApiError(405, "method_not_allowed", f"{method} is not allowed here; use "
                     + ", ".join(allowed), allowed=allowed)
    error.headers["Allow"] = ", ".join(allowed)
    return error


def conflict(message: str) -> ApiError:
    """409: the request clashes with the current state (duplicate pattern, reload impossible)."""
    return ApiError(409, "conflict", message)


def invalid_config(error: ConfigError) -> ApiError:
    """422: a payload failed configuration validation; names the key path like the config file."""
    return ApiError(422, "invalid_config", str(error), path=error.path)


def too_many_requests(retry_after: int) -> ApiError:
    """429: too many failed authentication attempts from this address."""
    error = ApiError(429, "too_many_requests",
                     f"too many failed authentication attempts; retry in {retry_after}s",
                     retry_after=retry_after)
    error.headers["Retry-After"] = str(retry_after)
    return error


def service_unavailable(message: str) -> ApiError:
    """503: the service or operation is not available in this router."""
    return ApiError(503, "service_unavailable", message)


def internal(correlation: Optional[str] = None) -> ApiError:
    """500: an unexpected failure; details are in the log, not in the answer."""
    message = "internal error; see the dcrouter log"
    if correlation:
        message += f" (request {correlation})"
    return ApiError(500, "internal", message)
