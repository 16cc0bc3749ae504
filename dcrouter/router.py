"""DcRouter: the one ``MultiService`` that holds every dcrouter service.

This module alone wires services together: it builds the email gateway
(server -> processor -> queue -> delivery), the proxy, the DNS server and the
management API from :class:`~dcrouter.config.DcRouterOptions`, starts only
those whose sections are present, reloads on SIGHUP, and stops gracefully.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Callable, Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from dcrouter import __version__
from dcrouter.config import DcRouterOptions, load_config
from dcrouter.config.email import DomainRuleOptions, EmailOptions
from dcrouter.errors import ConfigError, DcRouterError
from dcrouter.logsetup import get_logger, make_observer
from dcrouter.timeseries import StatsHistory
from dcrouter.service import (
    Extensions, ListenError, ManagedService, RouterContext, WorkerIdentity, check_new_listeners,
)
from dcrouter.tlsutil import ensure_private_dir

log = get_logger("router")

#: Service names in start order (stop runs in reverse).
SERVICE_ORDER = ("dns", "email", "proxy", "api")


def _build_email(context: RouterContext) -> ManagedService:
    from dcrouter.delivery import MultiModeDeliverySystem
    from dcrouter.email.gateway import EmailGateway
    from dcrouter.email.processor import MultiModeProcessor
    from dcrouter.email.routing import DomainRouter
    from dcrouter.email.server import UnifiedEmailServer
    from dcrouter.queue import UnifiedDeliveryQueue

    options = context.options
    email = options.email
    assert email is not None
    queue = UnifiedDeliveryQueue.from_options(email.queue, options.router.state_dir,
                                              store=_queue_store(context),
                                              reactor=context.reactor)
    domain_router = DomainRouter.from_options(email)
    # the delivery system resolves every queued destination with the rules in force
    # (reloads reach queued mail; bounces are routed like mail to their recipient)
    delivery = MultiModeDeliverySystem(queue, email, context.dkim_keys,
                                       state_dir=options.router.state_dir,
                                       resolver=context.extensions.resolver,
                                       observers=context.extensions.delivery_observers,
                                       reactor=context.reactor,
                                       suppression_file=_suppression_file(context),
                                       rules=domain_router)
    processor = MultiModeProcessor(email, domain_router, queue, context,
                                   suppression=delivery.suppression)
    delivery.use_rules(processor)   # the rule table with the built-in postmaster rule
    server = UnifiedEmailServer(email, processor, context)
    return EmailGateway(context, server=server, processor=processor,
                        domain_router=domain_router, queue=queue, delivery=delivery)


def _suppression_file(context: RouterContext) -> str:
    """Each worker process writes its own suppression file and reads the others'."""
    worker = context.worker
    if worker is None or worker.count <= 1:
        return "suppression.json"
    return f"suppression-worker-{worker.index}.json"


def _queue_store(context: RouterContext) -> Any:
    """The extension's store, or for a disk queue this process's shard (adopting orphans)."""
    queue = context.options.email.queue if context.options.email else None
    if context.extensions.queue_store is not None or queue is None or \
            queue.storage_type != "disk":
        return context.extensions.queue_store
    from dcrouter.queue.shards import sharded_store
    worker = context.worker
    queue_dir = queue.persistent_path or os.path.join(context.options.router.state_dir or ".",
                                                      "queue")
    return sharded_store(queue_dir, worker.index if worker else 0, worker.count if worker else 1)


def _build_proxy(context: RouterContext) -> ManagedService:
    from dcrouter.proxy.service import ProxyService
    return ProxyService(context)


def _build_dns(context: RouterContext) -> ManagedService:
    from dcrouter.dns.service import DnsService
    return DnsService(context)


def _build_api(context: RouterContext) -> ManagedService:
    from dcrouter.api.service import ApiService
    return ApiService(context)


BUILDERS: dict[str, Callable[[RouterContext], ManagedService]] = {
    "email": _build_email, "proxy": _build_proxy, "dns": _build_dns, "api": _build_api,
}


class DcRouter(MultiService):
    """The dcrouter process: one child service per configured section.

    The seed's DcRouter API: :meth:`get_stats`, :meth:`update_email_config`,
    :meth:`update_domain_rules`; plus :meth:`reload` (SIGHUP) and
    :meth:`bound_addresses` (what listens where, with real port numbers).
    """

    def __init__(self, options: DcRouterOptions, config_path: Optional[str] = None,
                 extensions: Optional[Extensions] = None, reactor: Any = None,
                 exit_on_error: bool = False, worker: Optional[WorkerIdentity] = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.options = options
        self.config_path = config_path
        self.reactor = reactor
        self.exit_on_error = exit_on_error
        self.started_at: Optional[float] = None
        ensure_private_dir(options.router.state_dir)
        options = _persisted_rules(options)
        self.options = options
        self.context = RouterContext(options, reactor, extensions or Extensions(), config_path,
                                     worker=worker)
        self.context.router = self
        self.log_observer = make_observer(options.router)
        self._previous_sighup: Any = None
        self._stopping = False
        #: In a worker process: asks the master to reload the other workers (set by
        #: dcrouter.workers); called after a reload or rule change made through the API.
        self.peer_reload: Optional[Callable[[], None]] = None
        for name in SERVICE_ORDER:
            if getattr(options, name) is not None and self._runs_here(name):
                self._add(name)
        #: The last hour of every service's figures, sampled in memory (the console's charts).
        self.history = StatsHistory(self.get_stats, reactor, *_history_settings(options))
        self.history.setServiceParent(self)

    def _runs_here(self, name: str) -> bool:
        """Every service runs in every process, except the API: worker 0 only."""
        worker = self.context.worker
        return name != "api" or worker is None or worker.runs_api

    # -- tree -------------------------------------------------------------
    def _add(self, name: str) -> ManagedService:
        service = BUILDERS[name](self.context)
        service.setServiceParent(self)
        self.context.services[name] = service
        return service

    @property
    def by_name(self) -> dict[str, ManagedService]:
        """Running services by name ('email', 'proxy', 'dns', 'api')."""
        return self.context.services

    @property
    def email(self) -> Any:
        """The email gateway, or None."""
        return self.by_name.get("email")

    def setServiceParent(self, parent: Any) -> None:
        """Attach to a twistd application, registering dcrouter's log observer on it."""
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    # -- lifecycle ----------------------------------------------------------
    def startService(self) -> None:
        """Start every child; a listener that cannot bind stops the process (exit 1)."""
        self.started_at = time.time()
        try:
            super().startService()
        except (ListenError, DcRouterError) as e:
            log.critical("cannot start: {error}", error=str(e), **_fields(e))
            if self.exit_on_error:
                sys.stderr.write(f"dcrouter: {e}\n")
                sys.stderr.flush()
                os._exit(1)
            raise
        self._install_sighup()
        if self.exit_on_error:
            self.reactor.callWhenRunning(self._install_stop_signals)
        log.info("dcrouter {version} started: {services}", version=__version__,
                 services=", ".join(self.by_name))
        if self.context.worker is None and self.options.router.effective_workers > 1:
            log.warn("router.workers = {workers} applies to `twistd dcrouter --config FILE`; "
                     "this process (a .tac or embedded router) runs alone",
                     workers=self.options.router.workers)

    def _install_sighup(self) -> None:
        if not hasattr(signal, "SIGHUP"):
            return
        try:
            self._previous_sighup = signal.signal(
                signal.SIGHUP,
                lambda signum, frame: self.reactor.callFromThread(self.reload, from_signal=True))
        except ValueError:  # not in the main thread (some test runners)
            self._previous_sighup = None

    def _install_stop_signals(self) -> None:
        """SIGTERM/SIGINT: graceful stop and exit status 0 (twistd would re-raise the signal)."""
        def stop(signum: int, frame: Any) -> None:
            log.info("received signal {signal}, stopping gracefully", signal=signum)
            self.reactor.callFromThread(self._stop_reactor)
        try:
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
        except ValueError:
            pass

    def _stop_reactor(self) -> None:
        if self.reactor.running:
            try:
                self.reactor.stop()
            except ReactorNotRunning:  # a second signal (e.g. Ctrl-C to the process group)
                pass

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Graceful stop: stop accepting, let in-flight work finish up to the deadline."""
        self._stopping = True
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        services = [self.by_name[n] for n in reversed(SERVICE_ORDER) if n in self.by_name]
        yield defer.gatherResults([defer.maybeDeferred(s.stop_accepting) for s in services],
                                  consumeErrors=True)
        deadline = self.options.router.shutdown_timeout
        drained = defer.gatherResults([defer.maybeDeferred(s.drain) for s in services],
                                      consumeErrors=True)
        drained.addTimeout(deadline, self.reactor)
        try:
            yield drained
        except defer.TimeoutError:
            log.warn("shutdown deadline of {seconds}s passed; closing what is left",
                     seconds=deadline)
        except Exception as e:  # a drain failure must not block the stop
            log.failure("draining failed", error=str(e))
        yield defer.maybeDeferred(super().stopService)
        log.info("dcrouter stopped")

    # -- seed API -------------------------------------------------------------
    def get_stats(self) -> dict:
        """Figures from every service, plus uptime and version."""
        stats: dict[str, Any] = {
            "version": __version__,
            "uptime": (time.time() - self.started_at) if self.started_at else 0.0,
        }
        if self.context.worker is not None:
            # figures below are this worker process's own (see docs/operations.md)
            stats["worker"] = {"index": self.context.worker.index,
                               "count": self.context.worker.count, "pid": os.getpid()}
        for name, service in self.by_name.items():
            stats[name] = service.get_stats()
        return stats

    def bound_addresses(self) -> dict[str, list[tuple[str, str, int]]]:
        """``{service: [(protocol, host, port), ...]}`` with real port numbers."""
        return {name: s.bound_addresses() for name, s in self.by_name.items()}

    def update_email_config(self, email: EmailOptions) -> defer.Deferred:
        """Replace the ``[email]`` section at runtime (rules, limits, ports)."""
        import dataclasses
        new = dataclasses.replace(self.options, email=email)
        new.validate("")
        return self._apply(new)

    def update_domain_rules(self, rules: list[DomainRuleOptions]) -> defer.Deferred:
        """Replace the domain rules; they apply to the next message."""
        import dataclasses
        if self.options.email is None:
            raise ConfigError("email", "the email service is not configured")
        email = dataclasses.replace(self.options.email, domain_rules=tuple(rules))
        email.validate("email")
        return self.update_email_config(email)

    def rules_saved(self) -> None:
        """The API wrote its rules to state_dir/rules.toml: other workers read them now."""
        self._tell_peers(True)

    # -- reload -------------------------------------------------------------
    def reload(self, from_signal: bool = False) -> defer.Deferred:
        """Re-read the configuration file (SIGHUP); a bad file keeps the old config.

        In a worker, a reload asked through the API is passed on to the other
        workers (through the master); a SIGHUP already reached them all.
        """
        if self.config_path is None:
            log.warn("reload requested but dcrouter was not started from a file")
            return defer.succeed(False)
        try:
            new = _persisted_rules(load_config(self.config_path))
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: {error}",
                      error=str(e), path=e.path)
            return defer.succeed(False)
        if new.router.state_dir != self.options.router.state_dir:
            log.warn("router.state_dir changes need a restart; keeping {state_dir}",
                     state_dir=self.options.router.state_dir)
        d = self._apply(new)
        d.addCallback(lambda _: True)
        if self.peer_reload is not None and not from_signal:
            d.addCallback(self._tell_peers)

        def refused(failure: Any) -> bool:
            failure.trap(ConfigError)
            log.error("reload refused, keeping the running configuration: {error}",
                      error=str(failure.value), path=failure.value.path)
            return False
        d.addErrback(refused)
        return d

    def _tell_peers(self, result: Any) -> Any:
        """After an API change in a worker: have the master reload the other workers."""
        if result is not False and self.peer_reload is not None:
            self.peer_reload()
        return result

    @defer.inlineCallbacks
    def _apply(self, new: DcRouterOptions) -> Any:
        old_names = set(self.by_name)
        old_options = self.options
        check_new_listeners(self.context, new)  # a new port below 1024 after the drop
        for name in SERVICE_ORDER:
            if name in old_names and getattr(new, name) is not None:
                self.by_name[name].check_options(new)   # ConfigError: nothing changed
        try:
            self.log_observer.apply(new.router)     # reopens log_file (logrotate)
        except OSError as e:
            raise ConfigError("router.log_file", f"cannot open {new.router.log_file}: "
                              f"{e.strerror}") from None
        if "email" in old_names and new.email is not None:
            # validated first: a ConfigError (e.g. an unknown transformation) changes nothing
            try:
                yield defer.maybeDeferred(self.by_name["email"].reconfigure, new)
            except ConfigError:
                yield defer.maybeDeferred(self.by_name["email"].reconfigure, old_options)
                raise
        self.options = new
        self.context.options = new
        for name in SERVICE_ORDER:
            if name == "email" and name in old_names and new.email is not None:
                continue
            present = getattr(new, name) is not None and self._runs_here(name)
            if present and name in old_names:
                yield defer.maybeDeferred(self.by_name[name].reconfigure, new)
            elif present:
                service = self._add(name)
                if self.running:
                    service.startService()
            elif name in old_names:
                service = self.by_name.pop(name)
                yield defer.maybeDeferred(service.disownServiceParent)
        log.info("configuration applied: {services}", services=", ".join(self.by_name))
        return True


def _history_settings(options: DcRouterOptions) -> tuple[float, float]:
    """Sample interval and window of the figures history (``[api]``; the API re-applies them
    on reload)."""
    api = options.api
    return (api.history_interval, api.history_window) if api is not None else (10.0, 3600.0)


def _persisted_rules(options: DcRouterOptions) -> DcRouterOptions:
    """Domain rules saved by the API (``state_dir/rules.toml``) replace the file's rules."""
    from dcrouter.api.persist import apply_persisted_rules
    return apply_persisted_rules(options)


def _fields(error: Exception) -> dict:
    if isinstance(error, DcRouterError):
        return {k: v for k, v in error.log_fields().items() if k not in ("error",)}
    return {}


def make_router(options: DcRouterOptions, config_path: Optional[str] = None,
                extensions: Optional[Extensions] = None, reactor: Any = None,
                exit_on_error: bool = False,
                worker: Optional[WorkerIdentity] = None) -> DcRouter:
    """Build the service tree for ``options``: the one entry point of the plugin and .tac.

    ``worker`` is set in the worker processes of a multi-worker dcrouter
    (:mod:`dcrouter.workers`).
    """
    return DcRouter(options, config_path=config_path, extensions=extensions, reactor=reactor,
                    exit_on_error=exit_on_error, worker=worker)


def make_router_from_file(path: str, extensions: Optional[Extensions] = None,
                          reactor: Any = None, exit_on_error: bool = False) -> DcRouter:
    """Load ``path`` and build the router (raises ConfigError)."""
    return make_router(load_config(path), config_path=path, extensions=extensions,
                       reactor=reactor, exit_on_error=exit_on_error)
