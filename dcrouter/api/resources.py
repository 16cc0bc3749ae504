"""The ``twisted.web`` side of the API: one leaf resource that dispatches every path.

* ``/`` and ``/app.js``, ``/charts.js``, ``/views.js``, ``/style.css`` - the console
  (public, static; its data comes from ``/api/...`` with the token);
* ``/api/...`` - JSON endpoints from :data:`dcrouter.api.handlers.ENDPOINTS`;
* ``/metrics`` - the Prometheus exposition, rendered in the reactor thread
  (service figures are read where they are written; prometheus_client's
  own Twisted resource would collect in a worker thread).

Authentication, the JSON error shape, 404/405 and the access log live here
once, for every endpoint; the request limits (head size and time, body size
and time) are the channel's (:mod:`dcrouter.api.channel`), checked before
any of this runs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http import Request

from dcrouter.api.health import HEALTH_PATHS
from dcrouter.api import errors
from dcrouter.api.channel import LimitedSite
from dcrouter.api.auth import TokenAuthenticator, check_browser_safety
from dcrouter.api.handlers import ENDPOINTS, ApiHandlers, Endpoint
from dcrouter.api.types import ApiRequest, Reply
from dcrouter.api.metrics import ApiMetrics
from dcrouter.logsetup import get_logger
from dcrouter.message import new_correlation_id

log = get_logger("api")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: URL path -> (file under static/, content type)
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/charts.js": ("charts.js", "text/javascript; charset=utf-8"),
    "/views.js": ("views.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
MAX_BODY = 1024 * 1024

_SECURITY_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"cache-control": b"no-store",
}
_PAGE_CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
             b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class StaticFiles:
    """The status page's files, read once."""

    def __init__(self, directory: str = STATIC_DIR) -> None:
        self.files: dict[str, tuple[bytes, bytes]] = {}
        for path, (name, content_type) in STATIC_FILES.items():
            full = os.path.join(directory, name)
            if os.path.exists(full):
                with open(full, "rb") as f:
                    self.files[path] = (f.read(), content_type.encode())

    def get(self, path: str) -> Optional[tuple[bytes, bytes]]:
        """(body, content type) of ``path``, or None."""
        return self.files.get(path)


class RootResource(resource.Resource):
    """Every path of the API site."""

    isLeaf = True

    #: Seconds a service may take to answer before the client gets a 503.
    timeout = 30.0
    #: ``/healthz`` and ``/readyz`` (a :class:`dcrouter.api.health.HealthChecks`; no token).
    health: Any = None

    def __init__(self, handlers: ApiHandlers, authenticator: TokenAuthenticator,
                 metrics: ApiMetrics, reactor: Any, static: Optional[StaticFiles] = None
                 ) -> None:
        super().__init__()
        self.reactor = reactor
        self.handlers = handlers
        self.authenticator = authenticator
        self.metrics = metrics
        self.static = static or StaticFiles()
        self.requests = 0
        self.max_body_size = MAX_BODY

    # -- entry ------------------------------------------------------------------
    def render(self, request: Request) -> Any:
        """Dispatch; every answer is written here (NOT_DONE_YET)."""
        if self.health is not None and request.path in HEALTH_PATHS:
            return self.health.render(request)
        self.requests += 1
        started = time.monotonic()
        method = (request.method or b"GET").decode("ascii", "replace").upper()
        path = (request.path or b"/").decode("utf-8", "replace")
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))
        d = defer.maybeDeferred(self._dispatch, request, method, path)
        if not d.called or d.paused:  # no result yet (paused: waiting on a chained Deferred)
            d.addTimeout(self.timeout, self.reactor)
        d.addErrback(self._to_api_error, method, path)
        d.addCallback(self._write, request, method, path, finished, started)
        d.addErrback(lambda f: log.failure("writing the API response failed", f))
        return server.NOT_DONE_YET

    def _dispatch(self, request: Request, method: str, path: str) -> Any:
        if path != "/" and path.endswith("/"):
            path = path.rstrip("/")
        static = self.static.get(path)
        if static is not None:
            if method not in ("GET", "HEAD"):
                raise errors.method_not_allowed(method, ["GET", "HEAD"])
            body, content_type = static
            return _Raw(body, content_type, {b"content-security-policy": _PAGE_CSP})
        allowed: list[str] = []
        for endpoint in ENDPOINTS:
            params = endpoint.match(path)
            if params is None:
                continue
            if endpoint.method != method and not (method == "HEAD" and endpoint.method == "GET"):
                allowed.append(endpoint.method)
                continue
            return self._call(endpoint, params, request, method, path)
        if allowed:
            raise errors.method_not_allowed(method, sorted(set(allowed)))
        raise errors.not_found(f"no endpoint {path}; see /api/openapi.json")

    def _call(self, endpoint: Endpoint, params: dict[str, str], request: Request,
              method: str, path: str) -> Any:
        client_ip = _client_ip(request)
        check_browser_safety(request.getHeader(b"host"), request.getHeader(b"origin"),
                             open_api=not self.authenticator.enabled)
        if endpoint.public:
            return self._handle(endpoint, params, request, method, path, client_ip)
        d = self.authenticator.verify(request.getHeader(b"authorization"), client_ip, path)

        def refused(failure: Failure) -> Failure:
            if failure.check(errors.ApiError):
                status = failure.value.status  # type: ignore[union-attr]
                self.metrics.api_auth_failures.labels(status=str(status)).inc()
            return failure
        d.addErrback(refused)
        d.addCallback(lambda _: self._handle(endpoint, params, request, method, path, client_ip))
        return d

    def _handle(self, endpoint: Endpoint, params: dict[str, str], request: Request,
                method: str, path: str, client_ip: str) -> Any:
        """Run an authenticated (or public) endpoint's handler."""
        if endpoint.handler == "prometheus_metrics":
            body, content_type = self.metrics.render(
                (request.getHeader(b"accept") or b"").decode("latin-1"))
            return _Raw(body, content_type.encode("ascii"), {})
        # the channel refused larger bodies already; this guards other channels
        limit = self.max_body_size
        content = request.content.read(limit + 1) if request.content is not None else b""
        if len(content) > limit:
            raise errors.ApiError(413, "payload_too_large", f"the body exceeds {limit} bytes")
        args: dict[bytes, list[bytes]] = request.args or {}
        api_request = ApiRequest(
            method=method, path=path, params=params,
            query={k.decode("utf-8", "replace"): [v.decode("utf-8", "replace") for v in vs]
                   for k, vs in args.items()},
            body=content,
            content_type=(request.getHeader(b"content-type") or b"").decode("latin-1"),
            client_ip=client_ip)
        return self.handlers.handler_for(endpoint)(api_request)

    # -- answers --------------------------------------------------------------
    def _to_api_error(self, failure: Failure, method: str, path: str) -> errors.ApiError:
        if failure.check(errors.ApiError):
            return failure.value  # type: ignore[return-value]
        if failure.check(defer.TimeoutError):
            log.warn("API {method} {path} timed out after {seconds}s", method=method, path=path,
                     seconds=self.timeout)
            return errors.service_unavailable(
                f"the service did not answer within {self.timeout:g}s; try again")
        reference = new_correlation_id()
        log.failure("API {method} {path} failed (request {reference})", failure,
                    method=method, path=path, reference=reference)
        return errors.internal(reference)

    def _write(self, result: Any, request: Request, method: str, path: str,
               finished: list[bool], started: float) -> None:
        if finished[0]:
            return  # the client went away
        headers: dict[bytes, bytes] = dict(_SECURITY_HEADERS)
        if isinstance(result, _Raw):
            status, body = 200, result.body
            headers[b"content-type"] = result.content_type
            headers.update(result.headers)
        elif isinstance(result, errors.ApiError):
            status, body = result.status, result.to_bytes()
            headers[b"content-type"] = b"application/json"
            headers.update({k.lower().encode(): v.encode() for k, v in result.headers.items()})
        else:
            reply = result if isinstance(result, Reply) else Reply(result)
            status = reply.status
            body = json.dumps(reply.body, default=str, indent=None).encode("utf-8")
            headers[b"content-type"] = b"application/json"
            headers.update({k.lower().encode(): v.encode() for k, v in reply.headers.items()})
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        request.setHeader(b"content-length", str(len(body)).encode())
        if method != "HEAD":
            request.write(body)
        request.finish()
        self.metrics.api_requests.labels(method=method, status=str(status)).inc()
        log.debug("{method} {path} {status}", method=method, path=path, status=status,
                  client_ip=_client_ip(request),
                  duration_ms=round((time.monotonic() - started) * 1000, 1), sampled=True)


class _Raw:
    """A non-JSON answer (a static file or the metrics exposition)."""

    def __init__(self, body: bytes, content_type: bytes, headers: dict[bytes, bytes]) -> None:
        self.body = body
        self.content_type = content_type
        self.headers = headers


def _client_ip(request: Request) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", "") or "unknown")


class ApiSite(LimitedSite):
    """The API's site: request limits (:mod:`dcrouter.api.channel`), no twistd access log
    (the resource logs each request at debug level)."""

    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        """Access lines go through dcrouter's logger instead."""
        return None
