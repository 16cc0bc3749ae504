"""UnifiedEmailServer: the inbound SMTP listeners of the email gateway.

One listener per ``email.ports`` entry (implicit TLS on ``implicit_tls_ports``,
STARTTLS elsewhere, AUTH required on ``submission_ports``).  Each connection
is an :class:`dcrouter.email.session.SmtpSession`; this service owns what the
sessions share: options, the message handler (the processor), the AUTH portal
and failure limiter, connection caps (:mod:`dcrouter.email.limits`), the TLS
context (session tickets on, their key replaced every
``tls.session_cache_timeout`` seconds), statistics, event observers, and
graceful shutdown (:meth:`stop_accepting`, :meth:`drain`).
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import socket
from typing import Any, Optional

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.config.email import EmailOptions
from dcrouter.email.auth import AuthFailureLimiter, build_portal
from dcrouter.email.clientcert import ClientCertPolicy
from dcrouter.email.limits import ConnectionTracker, LimitExceptions
from dcrouter.email.session import SmtpSession
from dcrouter.email.sessioncore import SessionCore
from dcrouter.email.spool import SpoolFiles, clean_spool, spool_dir
from dcrouter.logsetup import get_logger
from dcrouter.service import ListenerSet, ListenSpec, RouterContext
from dcrouter.tlsutil import server_context_factory

log = get_logger("email.server")

EVENTS = ("connection_made", "connection_lost", "auth_succeeded", "auth_failed",
          "message_received", "message_rejected")


def _inside(ip: str, networks: list[Any]) -> bool:
    """Is the client address ``ip`` (IPv4-mapped IPv6 as IPv4) inside one of ``networks``?"""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _socket_of(transport: Any) -> Optional[socket.socket]:
    """The TCP socket under ``transport`` (plain, or below a TLS wrapper), if there is one."""
    for _ in range(3):
        sock = getattr(transport, "socket", None)
        if isinstance(sock, socket.socket):
            return sock
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


def _no_delay(transport: Any) -> None:
    """TCP_NODELAY: the session writes whole replies (pipelined ones in one write), so Nagle
    would only hold a reply back behind an unacknowledged one (a TLS ticket, a greeting)
    until the client's delayed ACK - up to 40 ms on Linux."""
    sock = _socket_of(transport)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (a UNIX socket in a test), or already gone


def _finished(session: SessionCore) -> bool:
    """Is ``session`` over though its connection is not gone yet? We closed it, or the
    client did (end of stream, or a reset, before anything unread)."""
    if session.closed:
        return True
    sock = _socket_of(session.transport)
    if sock is None:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


@dataclasses.dataclass(frozen=True)
class ListenerConfig:
    """What a session needs to know about the listener that accepted it."""

    port: int
    submission: bool
    implicit_tls: bool


class ServerStats:
    """Counters of the SMTP server (see :meth:`UnifiedEmailServer.get_stats`)."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.messages_accepted = 0
        self.rejected_by_reason: collections.Counter[str] = collections.Counter()
        self.bytes_received = 0
        self.auth_succeeded = 0
        self.auth_failed = 0

    def accepted(self) -> None:
        """A message was queued."""
        self.messages_accepted += 1

    def rejected(self, reason: str) -> None:
        """A command, message or connection was refused for ``reason``."""
        self.rejected_by_reason[reason] += 1


class SmtpFactory(Factory):
    """Builds sessions for one listener."""

    noisy = False

    def __init__(self, server: "UnifiedEmailServer", listener: ListenerConfig) -> None:
        self.server = server
        self.listener = listener

    def buildProtocol(self, addr: Any) -> SmtpSession:
        """A new session for this listener."""
        return SmtpSession(self.server, self.listener)


@implementer(IOpenSSLServerConnectionCreator)
class _CurrentTlsContext:
    """A TLS connection creator that always uses the server's current TLS context.

    Listeners keep their factory across reloads; this indirection lets a new
    certificate take effect on the next handshake without re-binding.
    """

    def __init__(self, server: "UnifiedEmailServer") -> None:
        self.server = server

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """An OpenSSL connection with the current context."""
        return SSL.Connection(self.server.tls_context().getContext(), None)


class UnifiedEmailServer(Service):
    """The SMTP server: listeners, sessions, limits, AUTH and TLS (seed sections 1.1, 4.1)."""

    def __init__(self, options: EmailOptions, handler: Any, context: RouterContext) -> None:
        self.context = context
        self.reactor = context.reactor
        self.handler = handler
        self.stats = ServerStats()
        self.sessions: set[SessionCore] = set()
        self.draining = False
        self._drain_waiters: list[defer.Deferred] = []
        self._observers: list[Any] = list(context.extensions.email_observers)
        self.spool_dir = spool_dir(context.state_dir)
        self.spool_files = SpoolFiles(self.spool_dir, self.reactor)
        self._tls: Any = None
        self._rotation: Optional[task.LoopingCall] = None
        self.client_certs: Optional[ClientCertPolicy] = None
        self.tls_available = True
        self.options = options
        self.connections = ConnectionTracker(options.max_connections,
                                             options.max_connections_per_ip)
        self.connections.reclaim = self._reclaim
        #: Open sessions by client address (for reclaiming finished ones at a cap).
        self._by_ip: dict[str, set[SessionCore]] = {}
        self.auth_limiter = AuthFailureLimiter(options.auth.max_failures_per_minute)
        self._apply(options)
        self.listeners = ListenerSet(self.reactor, self._factory_for, self._context_for)
        context.smtp_certs.on_serving_change(lambda: self._apply(self.options))

    # -- configuration -------------------------------------------------------------------

    def _apply(self, options: EmailOptions) -> None:
        """Take new options: portal, limits, networks, TLS context (validated before use)."""
        portal = build_portal(options.auth, self.context.extensions.auth_checkers)
        # the files to present come from the certificate manager, which holds a new key
        # back until its TLSA record has been published long enough (dcrouter.smtpcerts)
        cert_path, key_path = self.context.smtp_certs.configure(
            options.hostname, options.tls.cert_path, options.tls.key_path)
        context, client_certs = self._build_tls(options, cert_path, key_path)
        self.options = options
        self.portal = portal
        self._tls = context
        self.client_certs = client_certs
        self._networks = [ipaddress.ip_network(n, strict=False) for n in options.relay_networks]
        exclusions = options.bare_newline_exclusions
        self._bare_exclusions = self._networks if exclusions is None else [
            ipaddress.ip_network(n, strict=False) for n in exclusions]
        exceptions = options.client_limit_exceptions
        self.limit_exceptions = LimitExceptions(
            options.relay_networks if exceptions is None else exceptions)
        self.connections.reconfigure(options.max_connections, options.max_connections_per_ip,
                                     self.limit_exceptions)
        self.auth_limiter.per_minute = options.auth.max_failures_per_minute

    def _build_tls(self, options: EmailOptions, cert_path: str, key_path: str
                   ) -> tuple[Any, Optional[ClientCertPolicy]]:
        tls = options.tls
        context = server_context_factory(self.context.state_dir, options.hostname,
                                         cert_path, key_path, tls.min_version,
                                         tls.ciphers, key_path_name="email.tls",
                                         session_tickets=tls.session_tickets,
                                         session_timeout=tls.session_cache_timeout)
        client_certs = ClientCertPolicy(tls.ca_path) if tls.ca_path else None
        if client_certs is not None:
            client_certs.apply(context)
        return context, client_certs

    def rotate_ticket_key(self) -> bool:
        """A new TLS context, so a new random session ticket key (every
        ``tls.session_cache_timeout`` seconds): tickets issued before no longer resume
        (those clients do one full handshake). False, logged, when the certificate files
        cannot be loaded now (the current context stays)."""
        try:
            context, client_certs = self._build_tls(self.options,
                                                    *self.context.smtp_certs.serving_paths())
        except Exception as e:  # a certificate being replaced: try at the next rotation
            log.warn("TLS session ticket key not rotated: {error}", error=str(e))
            return False
        self._tls, self.client_certs = context, client_certs
        log.debug("TLS session ticket key rotated")
        return True

    def _schedule_rotation(self) -> None:
        if self._rotation is not None and self._rotation.running:
            self._rotation.stop()
        self._rotation = None
        tls = self.options.tls
        if self.running and tls.session_tickets:
            self._rotation = task.LoopingCall(self.rotate_ticket_key)
            self._rotation.clock = self.reactor
            self._rotation.start(tls.session_cache_timeout, now=False)

    def _specs(self) -> list[ListenSpec]:
        implicit = self.options.effective_implicit_tls_ports
        return [ListenSpec("tcp", self.options.listen, port, f"email.ports[{i}]",
                           tls=port in implicit)
                for i, port in enumerate(self.options.ports)]

    def _factory_for(self, spec: ListenSpec) -> SmtpFactory:
        listener = ListenerConfig(port=spec.port,
                                  submission=spec.port in self.options.effective_submission_ports,
                                  implicit_tls=spec.tls)
        return SmtpFactory(self, listener)

    def _context_for(self, spec: ListenSpec) -> Any:
        return _CurrentTlsContext(self)

    def tls_context(self) -> Any:
        """The current server TLS context factory (STARTTLS and implicit TLS)."""
        return self._tls

    def auth_mechanisms(self) -> list[str]:
        """SASL mechanisms to offer, as configured (OAUTH2 is spelled XOAUTH2 on the wire)."""
        out: list[str] = []
        for method in self.options.auth.methods:
            name = "XOAUTH2" if method == "OAUTH2" else method
            if name not in out:
                out.append(name)
        return out

    def relay_permitted(self, ip: str) -> bool:
        """True when ``ip`` is inside ``relay_networks``."""
        return _inside(ip, self._networks)

    def bare_newline_rejected(self, ip: str) -> bool:
        """Are bare LF/CR from ``ip`` refused (``bare_newline = "reject"``, not excluded)?"""
        return self.options.bare_newline == "reject" and not _inside(ip, self._bare_exclusions)

    # -- service life cycle ------------------------------------------------------------------

    def startService(self) -> None:
        """Remove stale spool files, prepare the spool pool, bind the listeners."""
        stale = clean_spool(self.spool_dir)
        if stale:
            log.info("removed {count} unacknowledged spool files", count=stale)
        self.spool_files = SpoolFiles(self.spool_dir, self.reactor)
        self.listeners.start(self._specs())
        super().startService()
        self._schedule_rotation()
        log.info("SMTP listening on {addresses}", addresses=self.bound_addresses())

    def stopService(self) -> Any:
        """Close listeners and every remaining session (421 4.3.2)."""
        super().stopService()
        self._schedule_rotation()
        self.spool_files.close()
        d = self.listeners.stop()
        for session in list(self.sessions):
            session.close_idle(f"421 4.3.2 {self.options.hostname} Service shutting down")
        return d

    def bound_addresses(self) -> list[tuple[str, str, int]]:
        """``(protocol, host, port)`` of every SMTP listener."""
        return self.listeners.addresses()

    def reconfigure(self, options: EmailOptions) -> Optional[defer.Deferred]:
        """Apply new limits, users and TLS settings; re-bind listeners whose port changed."""
        old_specs = self._specs()
        old_submission = self.options.effective_submission_ports
        self._apply(options)
        self._schedule_rotation()
        if old_submission != options.effective_submission_ports:
            # The submission flag lives in the factory: re-bind the affected listeners.
            changed = set(old_submission) ^ set(options.effective_submission_ports)
            keep = [s for s in old_specs if s.port not in changed]
            d = self.listeners.update(keep)
            d.addCallback(lambda _: self.listeners.update(self._specs()))
            return d
        return self.listeners.update(self._specs())

    def stop_accepting(self) -> defer.Deferred:
        """Close the listeners; open sessions continue."""
        return self.listeners.stop()

    def drain(self) -> defer.Deferred:
        """Fires when no transaction is in progress; idle sessions then get 421 and close."""
        self.draining = True
        d: defer.Deferred = defer.Deferred()
        self._drain_waiters.append(d)
        self._check_drained()
        return d

    def _check_drained(self) -> None:
        if not self.draining or not self._drain_waiters:
            return
        if any(s.in_transaction for s in self.sessions):
            return
        for session in list(self.sessions):
            session.close_idle(f"421 4.3.2 {self.options.hostname} Service shutting down")
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- sessions --------------------------------------------------------------------------

    def session_opened(self, session: SessionCore) -> None:
        """A session passed the connection caps: it holds the slot admitted last."""
        self.connections.bind(session, session.info.client_ip)
        self.sessions.add(session)
        self._by_ip.setdefault(session.info.client_ip, set()).add(session)
        _no_delay(session.transport)
        self.stats.connections_total += 1
        log.info("connection from {client_ip}:{client_port} on port {local_port}",
                 client_ip=session.info.client_ip, client_port=session.info.client_port,
                 local_port=session.info.local_port,
                 correlation_id=session.info.correlation_id)
        self.emit("connection_made", session.info)

    def session_closed(self, session: SessionCore, reason: Failure) -> None:
        """A counted session ended."""
        self.sessions.discard(session)
        self._unindex(session)
        self.connections.release(session)
        log.info("disconnect from {client_ip}", client_ip=session.info.client_ip,
                 correlation_id=session.info.correlation_id)
        self.emit("connection_lost", session.info, reason)
        self._check_drained()

    def _unindex(self, session: SessionCore) -> None:
        same = self._by_ip.get(session.info.client_ip)
        if same is not None:
            same.discard(session)
            if not same:
                del self._by_ip[session.info.client_ip]

    def _reclaim(self, ip: Optional[str]) -> int:
        """At a cap: release the slots of sessions (of ``ip``, or all) that are over already -
        closed by us (QUIT answered, limit, shutdown) or by a client whose end of stream
        waits unread - so a client's finished sessions are never counted against its next."""
        candidates = self.sessions if ip is None else self._by_ip.get(ip, ())
        freed = 0
        for session in list(candidates):
            if self.connections.holds(session) and _finished(session):
                self.connections.release(session)
                freed += 1
        if freed:
            log.debug("{count} finished sessions of {client_ip} released at the connection cap",
                      count=freed, client_ip=ip or "any address")
        return freed

    def transaction_finished(self, session: SessionCore) -> None:
        """A transaction ended (reply sent); while draining, close the now idle session."""
        if self.draining:
            self.reactor.callLater(0, self._close_if_idle, session)

    def _close_if_idle(self, session: SessionCore) -> None:
        if not session.closed and not session.in_transaction:
            session.close_idle(f"421 4.3.2 {self.options.hostname} Service shutting down")
        self._check_drained()

    # -- events and figures ----------------------------------------------------------------

    @property
    def tls_options(self) -> Any:
        """The TLS options new connections get (the console shows their certificate)."""
        return self._tls

    def add_observer(self, observer: Any) -> None:
        """Subscribe an :class:`dcrouter.interfaces.IEmailEventObserver`."""
        self._observers.append(observer)

    def emit(self, event: str, *args: Any) -> None:
        """Call ``event`` on every observer; an observer that raises is logged, not fatal.

        Observers are those of ``Extensions.email_observers``, those added with
        :meth:`add_observer`, and ``context.observers["email"]`` (where the
        metrics registry subscribes).
        """
        observers = self._observers
        shared = self.context.observers.get("email")
        if shared:
            observers = observers + shared
        for observer in observers:
            method = getattr(observer, event, None)
            if method is None:
                continue
            try:
                method(*args)
            except Exception:
                session = args[0] if args else None
                log.failure("email observer {observer} failed on {event}",
                            observer=repr(observer), event=event,
                            correlation_id=getattr(session, "correlation_id", ""))

    def get_stats(self) -> dict:
        """Connections current/total, messages accepted/rejected (by reason), bytes, AUTH."""
        rejected = dict(self.stats.rejected_by_reason)
        return {
            "connections_current": len(self.sessions),
            "connections_total": self.stats.connections_total,
            "messages_accepted": self.stats.messages_accepted,
            "messages_rejected": sum(rejected.values()),
            "rejected_by_reason": rejected,
            "bytes_received": self.stats.bytes_received,
            "auth_succeeded": self.stats.auth_succeeded,
            "auth_failed": self.stats.auth_failed,
        }
