"""The building blocks every dcrouter service shares.

* :class:`Extensions` - plug-ins handed to :func:`dcrouter.make_router` from Python.
* :class:`RouterContext` - what services share: current options, reactor,
  DKIM key store, extensions.
* :class:`ManagedService` - base class of the email, proxy, DNS and API
  services: stats, bound addresses, reconfiguration, graceful draining.
* :class:`ListenerSet` - a set of TCP/UDP/TLS listeners that can be
  re-bound to a new address list without dropping unchanged ones.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any, Callable, Optional, Protocol

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.internet.protocol import DatagramProtocol, Factory

from dcrouter.config.options import DcRouterOptions
from dcrouter.dkimkeys import DkimKeyStore
from dcrouter.dnsrecords import PublishedRecords
from dcrouter.errors import DcRouterError
from dcrouter.interfaces import IDnsChallengePublisher
from dcrouter.logsetup import get_logger
from dcrouter.smtpcerts import SmtpCertificates

log = get_logger("router")


class ListenError(DcRouterError):
    """A listener could not bind (port in use, permission, bad address)."""

    def __init__(self, key_path: str, host: str, port: int, reason: str) -> None:
        self.key_path = key_path
        super().__init__(f"{key_path}: cannot listen on {host}:{port}: {reason}",
                         key_path=key_path, host=host, port=port)


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
        #: The SMTP certificate and the keys its TLSA records name (DANE).
        self.smtp_certs = SmtpCertificates(options.router.state_dir)
        #: Records other parts ask the DNS server to publish.
        self.dns_records = PublishedRecords()
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

    In a worker process (``router.workers`` > 1) :attr:`reuse_port` is true:
    every socket is made here with ``SO_REUSEPORT`` and adopted by the
    reactor, so the worker processes share each port and the kernel spreads
    connections and datagrams over them.
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

    def _bind(self, spec: ListenSpec) -> IListeningPort:
        host = spec.host
        try:
            target = self.factory_for(spec)
            if self.reuse_port:
                return self._bind_shared(spec, target)
            if spec.protocol == "udp":
                assert isinstance(target, DatagramProtocol)
                return self.reactor.listenUDP(spec.port, target, interface=host,  # type: ignore
                                              maxPacketSize=65535)
            assert isinstance(target, Factory)
            if spec.tls:
                assert self.context_for is not None
                return self.reactor.listenSSL(spec.port, target,  # type: ignore
                                              self.context_for(spec),
                                              backlog=self.backlog, interface=host)
            return self.reactor.listenTCP(spec.port, target, backlog=self.backlog,  # type: ignore
                                          interface=host)
        except CannotListenError as e:
            reason = e.socketError.strerror if hasattr(e.socketError, "strerror") else str(e)
            raise ListenError(spec.key_path, host, spec.port, str(reason)) from None
        except (socket.gaierror, OSError) as e:
            raise ListenError(spec.key_path, host, spec.port, str(e)) from None

    def _bind_shared(self, spec: ListenSpec, target: Any) -> IListeningPort:
        """Bind with SO_REUSEPORT, then hand the socket to the reactor (adopt*Port)."""
        udp = spec.protocol == "udp"
        kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
        # as listenTCP/listenUDP: an IPv6 literal binds IPv6, anything else IPv4 ("" = all)
        if ":" in spec.host:
            family = socket.AF_INET6
            address = socket.getaddrinfo(spec.host, spec.port, family, kind)[0][4]
        else:
            family, address = socket.AF_INET, (spec.host or "0.0.0.0", spec.port)
        sock = socket.socket(family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.setblocking(False)
            if udp:
                assert isinstance(target, DatagramProtocol)
                return self.reactor.adoptDatagramPort(  # type: ignore[attr-defined,no-any-return]
                    sock.fileno(), family, target, maxPacketSize=65535)
            assert isinstance(target, Factory)
            sock.listen(self.backlog)
            if spec.tls:
                from twisted.protocols.tls import TLSMemoryBIOFactory
                assert self.context_for is not None
                target = TLSMemoryBIOFactory(self.context_for(spec), False, target)
                target.noisy = False
            return self.reactor.adoptStreamPort(  # type: ignore[attr-defined,no-any-return]
                sock.fileno(), family, target)
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
