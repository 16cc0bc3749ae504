"""The building blocks every dcrouter service shares.

* :class:`Extensions` - plug-ins handed to :func:`dcrouter.make_router` from Python.
* :class:`RouterContext` - what services share: current options, reactor,
  DKIM key store, extensions.
* :class:`ManagedService` - base class of the email, proxy, DNS and API
  services: stats, bound addresses, reconfiguration, graceful draining.
* :class:`ListenerSet` - a set of TCP/UDP/TLS listeners that can be
  re-bound to a new address list without dropping unchanged ones.

Binding is done here and nowhere else: :meth:`ManagedService.privilegedStartService`
binds the service's planned listeners into :data:`dcrouter.sockets.POOL` while
``twistd`` still runs as root, and :class:`ListenerSet` adopts those sockets
when the service starts (after ``--uid/--gid`` dropped the privileges).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any, Callable, Optional, Protocol

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.internet.protocol import DatagramProtocol, Factory

from dcrouter.config.options import DcRouterOptions
from dcrouter.dkimkeys import DkimKeyStore
from dcrouter.errors import ConfigError
from dcrouter.interfaces import IDnsChallengePublisher
from dcrouter.logsetup import get_logger
from dcrouter.sockets import (
    POOL, Key, ListenError, bind_socket, listen_error, needs_privilege, planned_listeners,
    unprivileged_port_start,
)

log = get_logger("router")

__all__ = ["Extensions", "ListenError", "ListenSpec", "ListenerSet", "ManagedService",
           "RouterContext", "WorkerIdentity", "check_new_listeners"]


@dataclasses.dataclass
class Extensions:
    """Plug-ins passed from Python (a ``.tac`` file or tests) instead of by name.

    Each list adds to what the configuration names; ``queue_store`` replaces
    the configured store; ``resolver`` replaces the delivery resolver (an
    ``twisted.internet.interfaces.IResolver``).
    """

    scanners: list[Any] = dataclasses.field(default_factory=list)
    transformations: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    queue_store: Optional[Any] = None
    auth_checkers: list[Any] = dataclasses.field(default_factory=list)
    delivery_observers: list[Any] = dataclasses.field(default_factory=list)
    email_observers: list[Any] = dataclasses.field(default_factory=list)
    resolver: Optional[Any] = None
    #: An :class:`dcrouter.interfaces.IDnsChallengePublisher` for ACME dns-01 (default: the
    #: DNS service, when the name lies in one of its zones).
    dns_challenge_publisher: Optional[Any] = None


@dataclasses.dataclass(frozen=True)
class WorkerIdentity:
    """Which worker process this is: ``index`` of ``count`` (``router.workers``)."""

    index: int = 0
    count: int = 1

    @property
    def runs_api(self) -> bool:
        """The management API runs in worker 0 only."""
        return self.index == 0


class RouterControl(Protocol):
    """What services may ask of the router (implemented by DcRouter; used by the API)."""

    def get_stats(self) -> dict:
        """Figures from every service."""

    def bound_addresses(self) -> dict[str, list[tuple[str, str, int]]]:
        """Listeners per service."""

    def reload(self) -> defer.Deferred:
        """Re-read the configuration file (as SIGHUP)."""

    def update_domain_rules(self, rules: list[Any]) -> defer.Deferred:
        """Replace the email domain rules."""


class RouterContext:
    """Shared state handed to every service by :class:`dcrouter.router.DcRouter`."""

    def __init__(self, options: DcRouterOptions, reactor: Any, extensions: Extensions,
                 config_path: Optional[str] = None,
                 worker: Optional[WorkerIdentity] = None) -> None:
        self.options = options
        self.reactor = reactor
        self.extensions = extensions
        self.config_path = config_path
        #: Set in a worker process of a multi-worker dcrouter (None: the only process).
        self.worker = worker
        self.dkim_keys = DkimKeyStore(options.router.state_dir)
        #: Other services by name, filled in by the router (for the API).
        self.services: dict[str, "ManagedService"] = {}
        #: Objects that want to observe events: the metrics registry adds itself here.
        self.observers: dict[str, list[Any]] = {}
        #: The router itself, for the API (set by DcRouter).
        self.router: Optional[RouterControl] = None

    @property
    def state_dir(self) -> str:
        """``router.state_dir``."""
        return self.options.router.state_dir

    def dns_challenge_publisher(self) -> Optional[Any]:
        """Who publishes ACME dns-01 records: the plug-in, else the running DNS service."""
        if self.extensions.dns_challenge_publisher is not None:
            return self.extensions.dns_challenge_publisher
        dns_service = self.services.get("dns")
        if dns_service is not None and IDnsChallengePublisher.providedBy(dns_service):
            return dns_service
        return None


class ManagedService(MultiService):
    """Base class of dcrouter's top-level services.

    Subclasses override :meth:`get_stats`, :meth:`bound_addresses`,
    :meth:`reconfigure`, :meth:`stop_accepting` and :meth:`drain`.
    """

    def __init__(self, name: str, context: RouterContext) -> None:
        super().__init__()
        self.setName(name)
        self.context = context

    def privilegedStartService(self) -> None:
        """Bind this service's listeners now, while twistd may still be root.

        The sockets wait in :data:`dcrouter.sockets.POOL` for the service's
        :class:`ListenerSet`; a port that cannot be bound stops the start here,
        before any service runs (one line naming the key, exit status 1, when the
        router was started by twistd).
        """
        try:
            POOL.prebind(planned_listeners(self.context.options, self.name))
        except ListenError as e:
            router = self.context.router
            if getattr(router, "exit_on_error", False):
                import sys
                log.critical("cannot start: {error}", error=str(e), key_path=e.key_path)
                sys.stderr.write(f"dcrouter: {e}\n")
                sys.stderr.flush()
                os._exit(1)
            raise
        super().privilegedStartService()

    def startService(self) -> None:
        """Start the children; pre-bound sockets nobody took are closed right after."""
        super().startService()
        self.context.reactor.callLater(0, release_unclaimed)

    def get_stats(self) -> dict:
        """Current figures, JSON-serialisable."""
        return {}

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        """``(protocol, host, port)`` of every listener, with real port numbers."""
        return []

    def check_options(self, options: DcRouterOptions) -> None:
        """Raise ConfigError if ``options`` cannot be applied (nothing changes yet).

        The router asks every running service before a reload changes any of them,
        so a reload is applied whole or not at all.
        """

    def reconfigure(self, options: DcRouterOptions) -> Optional[defer.Deferred]:
        """Apply new options (SIGHUP or API); re-bind changed listeners."""
        return None

    def stop_accepting(self) -> Optional[defer.Deferred]:
        """Stop taking new connections; in-flight work continues."""
        return None

    def drain(self) -> Optional[defer.Deferred]:
        """Fires when in-flight work (transactions, tunnels) has finished."""
        return None


@dataclasses.dataclass(frozen=True)
class ListenSpec:
    """One listener: protocol ('tcp' or 'udp'), host, port and the config key naming it."""

    protocol: str
    host: str
    port: int
    key_path: str
    tls: bool = False


class ListenerSet:
    """Owns a group of listening ports and re-binds only what changed.

    ``factory_for(spec)`` returns the protocol factory (TCP) or protocol
    (UDP) for a spec; ``context_for(spec)`` the TLS context factory when
    ``spec.tls``.  Binding is synchronous so errors surface at start, as
    :class:`ListenError` naming the configuration key.

    Every socket is made by :func:`dcrouter.sockets.bind_socket` or taken from
    :data:`dcrouter.sockets.POOL` (bound before the privilege drop, or inherited
    from the master of a multi-worker dcrouter) and adopted by the reactor.

    In a worker process (``router.workers`` > 1) :attr:`reuse_port` is true: a
    socket the master did not pass (a port added by a reload) is bound with
    ``SO_REUSEPORT`` so every worker can bind it.
    """

    #: Set by the worker runner (:mod:`dcrouter.workers`) for the whole process.
    reuse_port: bool = False

    def __init__(self, reactor: IReactorCore, factory_for: Callable[[ListenSpec], Any],
                 context_for: Optional[Callable[[ListenSpec], Any]] = None,
                 backlog: int = 1024) -> None:
        self.reactor = reactor
        self.factory_for = factory_for
        self.context_for = context_for
        self.backlog = backlog
        self.ports: dict[ListenSpec, IListeningPort] = {}

    def _socket_for(self, spec: ListenSpec) -> socket.socket:
        key = (spec.protocol, spec.host, spec.port)
        sock = POOL.take(key)
        if sock is not None:
            return sock
        try:
            return bind_socket(spec.protocol, spec.host, spec.port, self.backlog,
                               reuse_port=self.reuse_port)
        except (socket.gaierror, OSError) as e:
            raise listen_error(spec.key_path, spec.host, spec.port, e) from None

    def _bind(self, spec: ListenSpec) -> IListeningPort:
        """Hand the spec's socket to the reactor (adopt*Port)."""
        sock = self._socket_for(spec)
        try:
            target = self.factory_for(spec)
            if spec.protocol == "udp":
                assert isinstance(target, DatagramProtocol)
                return self.reactor.adoptDatagramPort(  # type: ignore[attr-defined,no-any-return]
                    sock.fileno(), sock.family, target, maxPacketSize=65535)
            assert isinstance(target, Factory)
            if spec.tls:
                from twisted.protocols.tls import TLSMemoryBIOFactory
                assert self.context_for is not None
                target = TLSMemoryBIOFactory(self.context_for(spec), False, target)
                target.noisy = False
            return self.reactor.adoptStreamPort(  # type: ignore[attr-defined,no-any-return]
                sock.fileno(), sock.family, target)
        except OSError as e:
            raise listen_error(spec.key_path, spec.host, spec.port, e) from None
        finally:
            sock.close()  # the reactor holds its own duplicate of the descriptor

    def start(self, specs: list[ListenSpec]) -> None:
        """Bind every spec; on failure, unbind what was bound and raise."""
        try:
            for spec in specs:
                if spec not in self.ports:
                    self.ports[spec] = self._bind(spec)
        except ListenError:
            self.stop()
            raise

    def update(self, specs: list[ListenSpec]) -> defer.Deferred:
        """Re-bind: keep unchanged listeners, close removed ones, bind new ones."""
        wanted = set(specs)
        closing = [self.ports.pop(s) for s in list(self.ports) if s not in wanted]
        ds = [defer.maybeDeferred(p.stopListening) for p in closing]
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addCallback(lambda _: self.start(specs))
        return d

    def stop(self) -> defer.Deferred:
        """Close every listener."""
        ports, self.ports = list(self.ports.values()), {}
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports],
                                   consumeErrors=True)

    def addresses(self) -> list[tuple[str, str, int]]:
        """``(protocol, host, port)`` of each listener with the real port number."""
        out = []
        for spec, port in self.ports.items():
            addr: Any = port.getHost()
            out.append((spec.protocol + ("+tls" if spec.tls else ""), spec.host, addr.port))
        return out

    def port_for(self, key_path: str) -> Optional[int]:
        """The bound port of the listener configured at ``key_path``."""
        for spec, port in self.ports.items():
            if spec.key_path == key_path:
                return port.getHost().port  # type: ignore[attr-defined]
        return None


def release_unclaimed() -> None:
    """Close the pre-bound sockets no listener took (logged: the plan and the services
    disagree, or a service is not running in this process)."""
    closed = POOL.release()
    if closed:
        log.info("closed {count} pre-bound sockets no listener took: {keys}",
                 count=len(closed), keys=closed)


def check_new_listeners(context: RouterContext, new: Any) -> None:
    """Refuse (ConfigError, nothing changed) a reload that adds a port this process
    cannot bind any more: below 1024 after the root-then-drop start."""
    bound: set[Key] = set()
    for service in context.services.values():
        for protocol, host, port in service.bound_addresses():
            bound.add((protocol.split("+", 1)[0], host, port))
    worker = context.worker
    old_email, new_email = context.options.email, getattr(new, "email", None)
    if old_email is not None and new_email is not None:
        changed = set(old_email.effective_submission_ports) ^ \
            set(new_email.effective_submission_ports)
        for port in sorted(changed):
            if port in new_email.ports and ("tcp", new_email.listen, port) in bound and \
                    needs_privilege(port):
                raise ConfigError("email.submission_ports",
                                  f"changing whether port {port} requires AUTH re-creates its "
                                  f"listener, and this process can no longer bind ports below "
                                  f"{unprivileged_port_start()} (root bound them at start, then "
                                  f"was dropped): it needs a restart of dcrouter")
    for planned in planned_listeners(new):
        if planned.key_path == "api.port" and worker is not None and not worker.runs_api:
            continue
        if planned.port and planned.key not in bound and needs_privilege(planned.port):
            import pwd
            try:
                user = pwd.getpwuid(os.geteuid()).pw_name
            except KeyError:
                user = str(os.geteuid())
            raise ConfigError(planned.key_path,
                              f"port {planned.port} is below {unprivileged_port_start()} and "
                              f"this process runs as {user}, without the privilege to bind "
                              f"it (root bound the ports at start, then was dropped); "
                              f"listening on it needs a restart of dcrouter")
