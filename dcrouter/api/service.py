"""ApiService: the management API, ``/metrics`` and the status page on ``api.listen:api.port``.

Builds one :class:`~dcrouter.api.metrics.ApiMetrics` (its own Prometheus
registry and the event observers), the bearer-token authenticator, the
endpoint handlers and the ``twisted.web`` site, and keeps the listener in a
:class:`~dcrouter.service.ListenerSet` so a reload re-binds only when
``api.listen``, ``api.port`` or HTTPS on/off changed.  With HTTPS
(``api.tls``, ``api.tls_cert``, ``api.tls_client_ca``) the listener's TLS
options come from :mod:`dcrouter.api.tls`; a reload re-reads the certificate
files without closing the port.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer

from dcrouter.api.health import HealthChecks
from dcrouter.api.auth import TokenAuthenticator
from dcrouter.api.channel import RequestLimits
from dcrouter.api.authshare import SharedFailureLimiter
from dcrouter.api.handlers import ApiHandlers
from dcrouter.api.metrics import ApiMetrics
from dcrouter.api.openapi import build_document
from dcrouter.api.resources import ApiSite, RootResource
from dcrouter.api.tls import SwitchableContext, build_api_tls
from dcrouter.config.api import ApiOptions
from dcrouter.config.options import DcRouterOptions
from dcrouter.logsetup import get_logger
from dcrouter.service import ListenerSet, ListenSpec, ManagedService, RouterContext

log = get_logger("api")


class ApiService(ManagedService):
    """The management API service ("api")."""

    def __init__(self, context: RouterContext) -> None:
        super().__init__("api", context)
        options = self._options(context.options)
        self.metrics = ApiMetrics(context)
        self.shared_limiter = self._shared_limiter(context, options)
        self.authenticator = TokenAuthenticator(options.token, options.max_auth_failures_per_minute,
                                                shared=self.shared_limiter)
        self._document: Optional[dict] = None
        self.handlers = ApiHandlers(context, self.metrics, self.openapi_document)
        self.root = RootResource(self.handlers, self.authenticator, self.metrics,
                                 context.reactor)
        self.root.health = HealthChecks(context)
        self.site = ApiSite(self.root, self._limits(options), timeout=options.idle_timeout,
                            reactor=context.reactor)
        self.tls: Optional[SwitchableContext] = None
        self._load_tls(options)
        self.listeners = ListenerSet(context.reactor, lambda spec: self.site,
                                     self._context_for)

    @staticmethod
    def _options(options: DcRouterOptions) -> ApiOptions:
        return options.api if options.api is not None else ApiOptions()

    def _limits(self, options: ApiOptions) -> RequestLimits:
        """The request limits of ``[api]`` (new connections use them at once on reload)."""
        self.root.max_body_size = options.max_body_size
        return RequestLimits(max_body_size=options.max_body_size,
                             header_timeout=options.header_timeout,
                             body_timeout=options.body_timeout)

    @staticmethod
    def _shared_limiter(context: RouterContext,
                        api: ApiOptions) -> Optional[SharedFailureLimiter]:
        """The Redis-shared failed-token limit when the queue is in Redis (several nodes)."""
        email = context.options.email
        if email is None or email.queue.storage_type != "redis":
            return None
        return SharedFailureLimiter(email.queue.redis_url, email.queue.redis_prefix,
                                    api.max_auth_failures_per_minute, reactor=context.reactor)

    def openapi_document(self) -> dict:
        """The OpenAPI document (built once)."""
        if self._document is None:
            self._document = build_document()
        return self._document

    def check_options(self, options: DcRouterOptions) -> None:
        """The new certificate files must load (ConfigError naming the key otherwise)."""
        api = self._options(options)
        if api.https:
            build_api_tls(api, self.context.state_dir)

    def _load_tls(self, options: ApiOptions) -> None:
        """Build (or replace) the HTTPS options; ConfigError leaves the old ones in place."""
        if not options.https:
            return
        certificate_options = build_api_tls(options, self.context.state_dir)
        if self.tls is None:
            self.tls = SwitchableContext(certificate_options)
        else:
            self.tls.switch(certificate_options)

    def _context_for(self, spec: ListenSpec) -> SwitchableContext:
        assert self.tls is not None
        return self.tls

    def _specs(self, options: ApiOptions) -> list[ListenSpec]:
        return [ListenSpec("tcp", options.listen, options.port, "api.port", tls=options.https)]

    def startService(self) -> None:
        """Bind the listener (a ListenError names ``api.port``)."""
        self.listeners.start(self._specs(self._options(self.context.options)))
        self.metrics.wire_observers()
        self.handlers.activity.wire()
        self._configure_history(self._options(self.context.options))
        super().startService()
        options = self._options(self.context.options)
        scheme = "https" if options.https else "http"
        log.info("management API on {scheme}://{host}:{port}/ ({auth})", scheme=scheme,
                 host=options.listen, port=self.listeners.port_for("api.port"),
                 auth="bearer token required" if self.authenticator.enabled
                 else "no token: loopback only")
        self._warn_plaintext(options)

    def _configure_history(self, options: ApiOptions) -> None:
        """The router's figures history samples as ``api.history_*`` say."""
        history = getattr(self.context.router, "history", None)
        if history is not None:
            history.configure(options.history_interval, options.history_window)

    @staticmethod
    def _warn_plaintext(options: ApiOptions) -> None:
        if not options.https and not options.loopback:
            log.warn("management API on {host} without TLS: the token and every answer cross "
                     "the network in clear text; set api.tls = true or api.tls_cert/tls_key",
                     host=options.listen)

    def stopService(self) -> Any:
        """Close the listener (and the Redis connection of the shared limit)."""
        super().stopService()
        d = self.listeners.stop()
        if self.shared_limiter is not None:
            limiter = self.shared_limiter
            d.addBoth(lambda result: limiter.close().addCallback(lambda _: result))
        return d

    def stop_accepting(self) -> Optional[defer.Deferred]:
        """The API stops first on shutdown: close the listener."""
        return self.listeners.stop()

    def reconfigure(self, options: DcRouterOptions) -> Optional[defer.Deferred]:
        """Apply a new ``[api]``: token and limit at once, re-bind when listen/port changed."""
        api = self._options(options)
        self._load_tls(api)
        self.authenticator.update(api.token, api.max_auth_failures_per_minute)
        self.site.limits = self._limits(api)
        self.site.timeOut = api.idle_timeout
        self.metrics.wire_observers()
        self.handlers.activity.wire()
        self._configure_history(api)
        if not self.running:
            return None
        self._warn_plaintext(api)
        return self.listeners.update(self._specs(api))

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        """The API listener with its real port."""
        return self.listeners.addresses()

    def get_stats(self) -> dict:
        """Requests served and refused authentications."""
        return {
            "requests": self.root.requests,
            "auth_failures": self.authenticator.failures,
            "auth_rate_limited": self.authenticator.rate_limited,
            "auth_limit_shared": self.shared_limiter is not None,
            "tls": self.tls is not None and self._options(self.context.options).https,
        }
