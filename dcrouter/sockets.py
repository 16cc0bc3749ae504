"""Listening sockets made ahead of their listeners.

Twisted's convention (``twisted.application.internet``) is to bind in
``privilegedStartService``, which ``twistd`` calls while the process is still
root, before ``--uid/--gid`` drop the privileges and ``startService`` runs.
dcrouter follows it the way Postfix, NSD and HAProxy do:

* :func:`planned_listeners` says, from the configuration alone, which
  ``(protocol, host, port)`` each service will listen on;
* :data:`POOL` holds sockets bound for them before the drop (by
  :meth:`dcrouter.service.ManagedService.privilegedStartService`, or in the
  master of a multi-worker dcrouter, whose workers inherit them as file
  descriptors); :class:`dcrouter.service.ListenerSet` takes its socket from
  the pool and hands it to the reactor (``adoptStreamPort``/``adoptDatagramPort``),
  and binds a new one only for what the pool does not hold;
* whatever nobody took is closed right after the start (:meth:`SocketPool.release`),
  so no socket listens without a listener reading it.

Nothing but ``socket()``, ``bind()`` and ``listen()`` runs with root: the
protocol factories, certificates and state files are made by the services
later, as the unprivileged user.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from typing import Any, Iterable, Optional

from dcrouter.errors import DcRouterError
from dcrouter.logsetup import get_logger

log = get_logger("router")

#: ``(protocol, host, port)``: what a pooled socket is bound to ("tcp" or "udp").
Key = tuple[str, str, int]
#: Environment variable naming the sockets a worker inherits (set by the master).
INHERIT_ENV = "DCROUTER_INHERITED_SOCKETS"
#: Backlog of pre-bound TCP sockets (as :class:`dcrouter.service.ListenerSet`'s default).
BACKLOG = 1024


class ListenError(DcRouterError):
    """A listener could not bind (port in use, permission, bad address)."""

    def __init__(self, key_path: str, host: str, port: int, reason: str) -> None:
        self.key_path = key_path
        super().__init__(f"{key_path}: cannot listen on {host}:{port}: {reason}",
                         key_path=key_path, host=host, port=port)


@dataclasses.dataclass(frozen=True)
class Planned:
    """One listener the configuration asks for, and the key that names it."""

    protocol: str
    host: str
    port: int
    key_path: str

    @property
    def key(self) -> Key:
        """``(protocol, host, port)``."""
        return (self.protocol, self.host, self.port)


def planned_listeners(options: Any, service: Optional[str] = None) -> list[Planned]:
    """Every listener of ``options`` (or of one service: 'email', 'proxy', 'dns', 'api').

    The same lists the services bind (``email.ports`` on ``email.listen``, every
    port of every proxy route on ``proxy.listen``, ``dns.port`` over UDP and TCP,
    ``api.port``); a service whose section is absent has none.
    """
    out: list[Planned] = []
    email = getattr(options, "email", None)
    if email is not None and service in (None, "email"):
        out += [Planned("tcp", email.listen, port, f"email.ports[{i}]")
                for i, port in enumerate(email.ports)]
    proxy = getattr(options, "proxy", None)
    if proxy is not None and service in (None, "proxy"):
        first: dict[int, int] = {}
        for index, route in enumerate(proxy.routes):
            for port in route.all_ports():
                first.setdefault(port, index)
        out += [Planned("tcp", proxy.listen, port, f"proxy.routes[{first[port]}].ports")
                for port in sorted(first)]
    dns = getattr(options, "dns", None)
    if dns is not None and service in (None, "dns"):
        out += [Planned("udp", dns.listen, dns.port, "dns.port"),
                Planned("tcp", dns.listen, dns.port, "dns.port")]
    api = getattr(options, "api", None)
    if api is not None and service in (None, "api"):
        out.append(Planned("tcp", api.listen, api.port, "api.port"))
    return out


def unprivileged_port_start() -> int:
    """The lowest port an unprivileged process may bind (Linux's sysctl; else 1024)."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1024


def can_bind_privileged() -> bool:
    """Whether this process may bind ports below :func:`unprivileged_port_start`."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 10))  # CAP_NET_BIND_SERVICE
    except (OSError, ValueError, IndexError):
        pass
    return False


def needs_privilege(port: int) -> bool:
    """True when binding ``port`` now would need a privilege this process lacks."""
    return 0 < port < unprivileged_port_start() and not can_bind_privileged()


def bind_socket(protocol: str, host: str, port: int, backlog: int = BACKLOG,
                reuse_port: bool = False) -> socket.socket:
    """A non-blocking socket bound to ``host:port`` (and listening, for TCP).

    As ``listenTCP``/``listenUDP``: an IPv6 literal binds IPv6 (dual-stack for
    ``::``), anything else IPv4 (``""`` means every address).  Raises OSError.
    """
    udp = protocol == "udp"
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    address: Any
    if ":" in host:
        family = socket.AF_INET6
        address = socket.getaddrinfo(host, port, family, kind)[0][4]
    else:
        family, address = socket.AF_INET, (host or "0.0.0.0", port)
    sock = socket.socket(family, kind)
    try:
        if not udp:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if not udp:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_error(key_path: str, host: str, port: int, error: OSError) -> ListenError:
    """The ListenError for a failed bind, saying what to do about a missing privilege."""
    reason = error.strerror or str(error)
    if isinstance(error, PermissionError) and 0 < port < unprivileged_port_start():
        reason += (f" (ports below {unprivileged_port_start()} need root or "
                   "CAP_NET_BIND_SERVICE: start dcrouter as root with twistd --uid/--gid, "
                   "see docs/deployment.md)")
    return ListenError(key_path, host, port, reason)


class SocketPool:
    """Sockets bound before their listeners exist, by ``(protocol, host, port)``."""

    def __init__(self) -> None:
        self._sockets: dict[Key, socket.socket] = {}

    def __len__(self) -> int:
        return len(self._sockets)

    def __contains__(self, key: object) -> bool:
        return key in self._sockets

    def keys(self) -> list[Key]:
        """What the pool holds."""
        return list(self._sockets)

    def add(self, key: Key, sock: socket.socket) -> None:
        """Hold ``sock`` for the listener of ``key`` (replacing and closing an older one)."""
        old = self._sockets.pop(key, None)
        if old is not None and old is not sock:
            old.close()
        self._sockets[key] = sock

    def take(self, key: Key) -> Optional[socket.socket]:
        """The socket for ``key``, now owned by the caller; None when the pool has none."""
        return self._sockets.pop(key, None)

    def get(self, key: Key) -> Optional[socket.socket]:
        """The socket for ``key``, still owned by the pool."""
        return self._sockets.get(key)

    def prebind(self, planned: Iterable[Planned], backlog: int = BACKLOG) -> list[Key]:
        """Bind every planned listener not yet held (port 0 is left to the listener).

        All or nothing: on the first failure what this call bound is closed again
        and the :class:`ListenError` names the configuration key.
        """
        bound: list[Key] = []
        try:
            for p in planned:
                if p.port == 0 or p.key in self._sockets:
                    continue
                try:
                    self._sockets[p.key] = bind_socket(p.protocol, p.host, p.port, backlog)
                except (OSError, socket.gaierror) as e:
                    raise listen_error(p.key_path, p.host, p.port, e) from None
                bound.append(p.key)
        except ListenError:
            for key in bound:
                self._sockets.pop(key).close()
            raise
        return bound

    def release(self, keep: Iterable[Key] = ()) -> list[Key]:
        """Close every socket but ``keep``; returns the keys closed."""
        kept = set(keep)
        closed = [k for k in self._sockets if k not in kept]
        for key in closed:
            self._sockets.pop(key).close()
        return closed

    # -- handing sockets to worker processes ------------------------------------------
    def child_fds(self, first_fd: int) -> tuple[dict[int, int], str]:
        """``({child fd: our fd}, environment value)`` passing every socket to a child."""
        mapping: dict[int, int] = {}
        described = []
        for offset, (key, sock) in enumerate(sorted(self._sockets.items())):
            fd = first_fd + offset
            mapping[fd] = sock.fileno()
            described.append([key[0], key[1], key[2], fd])
        return mapping, json.dumps(described)

    def inherit(self, value: str) -> list[Key]:
        """Take over the sockets a master passed (the :data:`INHERIT_ENV` value)."""
        keys = []
        for protocol, host, port, fd in json.loads(value or "[]"):
            sock = socket.socket(fileno=int(fd))
            sock.setblocking(False)
            key = (str(protocol), str(host), int(port))
            self.add(key, sock)
            keys.append(key)
        return keys


#: The process's pool (one per process: every ListenerSet looks here first).
POOL = SocketPool()
