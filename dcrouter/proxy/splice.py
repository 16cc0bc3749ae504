"""Zero-copy relaying with ``splice(2)``: socket -> pipe -> socket, driven by the reactor.

Once a passthrough connection's ClientHello is routed (or a plain TCP route
has its target), the bytes need no more looking at.  :class:`SpliceTunnel`
moves them in the kernel: per direction one pipe, ``splice(src, pipe)`` when
the source socket is readable and ``splice(pipe, dst)`` when the destination
can take more, both ``SPLICE_F_NONBLOCK`` on non-blocking sockets.  Python
touches a byte count per call, never the bytes.

How the sockets are taken from Twisted: both connections stay Twisted TCP
transports (their protocols still get ``connectionLost``, which releases the
admission ticket and untracks the client), but they are told to stop reading
and writing, and the tunnel registers its own :class:`_End` descriptor for
the same file descriptor with the reactor.  The tunnel never writes through a
transport, so their buffers stay empty; at the end it removes its
descriptors first and then lets the transports close the sockets
(``loseConnection`` after a clean end, ``abortConnection`` after an error or
a timeout), which fires the protocols' ``connectionLost`` as usual.

What the Twisted relay (:mod:`dcrouter.proxy.tunnel`) does, this does too:

* bytes already read (the ClientHello, a PROXY header to send, data that
  came with it) are a *prefix* sent with ``send`` before the pipe of that
  direction is drained, so PROXY headers and passthrough replays still splice;
* flow control: a pipe holds at most its size (:data:`PIPE_SIZE`); when
  ``splice`` into it would block while it holds bytes, the source is no
  longer read until the destination has taken some - memory per tunnel is
  two pipes, whatever the speed difference;
* half-close: a source's EOF becomes ``shutdown(SHUT_WR)`` of the
  destination once its pipe is empty; both directions ended, both close;
* an error on one socket (RST, EPIPE) aborts it; what its pipe still holds
  for the other side is offered once, then the other side is closed;
* the idle timeout (``connection_timeout``) is a :class:`~dcrouter.timerwheel.IdleTimeout`
  on the shared wheel;
* ``bytes_in``/``bytes_out`` count bytes delivered to each side.

Empty pipes go back to a bounded pool (:data:`POOL_SIZE` pipes) so a new
connection usually costs no ``pipe2``.  :func:`available` says whether this
platform can splice (Linux, Python >= 3.10).  Targets given as literal addresses
are connected by :class:`~dcrouter.proxy.rawconnect.RawConnect` (a raw socket);
names through Twisted (the tunnel then borrows that transport).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from typing import Any, Callable, Optional

from twisted.internet import error, tcp
from twisted.internet.interfaces import IReadWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.proxy.stats import RouteStats
from dcrouter.timerwheel import IdleTimeout, wheel_for


#: Bytes a pipe is asked to hold (F_SETPIPE_SZ; the kernel may round it or keep its default).
PIPE_SIZE = 256 * 1024
#: Empty pipes kept for new tunnels (two per tunnel; each pooled pipe is two descriptors).
POOL_SIZE = 256
#: splice calls per direction and readiness event (then other connections get their turn).
ROUNDS = 16

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_splice: Optional[Callable[..., int]] = getattr(os, "splice", None)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

_pool: list[tuple[int, int, int]] = []
#: The reasons given to a transport closed here (shared, as Twisted's reactor shares its own).
_DONE = Failure(error.ConnectionDone())
_ABORTED = Failure(error.ConnectionAborted())


def available() -> bool:
    """Whether ``splice(2)`` can be used here (Linux with ``os.splice``)."""
    return _splice is not None and hasattr(os, "pipe2")


def splice_capable(transport: Any) -> bool:
    """Whether ``transport`` is a plain Twisted TCP connection whose socket can be spliced
    (not TLS: a TLS wrapper forwards attribute look-ups to the TCP transport below)."""
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False) \
        and type(transport).__name__ != "TLSMemoryBIOProtocol"


def _new_pipe() -> tuple[int, int, int]:
    """(read fd, write fd, capacity) of a pipe from the pool or a new one."""
    if _pool:
        return _pool.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:                 # over /proc/sys/fs/pipe-max-size or the user's quota
        size = fcntl.fcntl(w, _F_GETPIPE_SZ)
    return r, w, size


def _give_back(pipe: tuple[int, int, int], empty: bool) -> None:
    if empty and len(_pool) < POOL_SIZE:
        _pool.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


class _Direction:
    """Bytes from ``src`` to ``dst``: a prefix, then a pipe."""

    __slots__ = ("src", "dst", "pipe", "r", "w", "size", "in_pipe", "prefix", "eof", "shut",
                 "paused", "outgoing")

    def __init__(self, src: "_End", dst: "_End", pipe: tuple[int, int, int], outgoing: bool,
                 prefix: bytes = b"") -> None:
        self.src = src
        self.dst = dst
        self.pipe = pipe
        self.r, self.w, self.size = pipe
        self.in_pipe = 0
        self.prefix = prefix
        self.eof = False            # the source sent EOF
        self.shut = False           # ... and it was passed on
        self.paused = False         # the pipe is full: the source is not read
        self.outgoing = outgoing    # client -> target (bytes_in)


@implementer(IReadWriteDescriptor)
class _End:
    """One socket of a :class:`SpliceTunnel` as the reactor sees it.

    A Twisted transport keeps its registration with the reactor: the tunnel
    puts its own ``doRead``/``doWrite`` on the transport (instance attributes
    over the class's methods, as Twisted itself does when it aborts) and
    switches readiness with the transport's ``startReading``/``stopReading``/
    ``startWriting``/``stopWriting`` - no extra ``epoll_ctl`` to hand the
    socket over.  A raw socket (from :class:`~dcrouter.proxy.rawconnect.RawConnect`) registers this object.
    """

    def __init__(self, tunnel: "SpliceTunnel", peer: Any, reading: bool) -> None:
        self.tunnel = tunnel
        #: the Twisted transport that owns the socket, or None for a raw socket of ours
        self.transport: Any = None if isinstance(peer, socket.socket) else peer
        self.sock: socket.socket = peer if self.transport is None else peer.socket
        self.fd = self.sock.fileno()
        self.out: Optional[_Direction] = None      # bytes read from this socket
        self.inc: Optional[_Direction] = None      # bytes written to this socket
        self.reading = reading
        self.writing = False
        self.disconnected = False
        if self.transport is not None:
            self.transport.doRead = self.doRead
            self.transport.doWrite = self.doWrite

    def want_read(self, on: bool) -> None:
        if on != self.reading and not self.disconnected:
            self.reading = on
            if self.transport is not None:
                (self.transport.startReading if on else self.transport.stopReading)()
            else:
                reactor = self.tunnel.reactor
                (reactor.addReader if on else reactor.removeReader)(self)

    def want_write(self, on: bool) -> None:
        if on != self.writing and not self.disconnected:
            self.writing = on
            if self.transport is not None:
                (self.transport.startWriting if on else self.transport.stopWriting)()
            else:
                reactor = self.tunnel.reactor
                (reactor.addWriter if on else reactor.removeWriter)(self)

    def detach(self) -> None:
        """Out of the reactor, before the socket is closed.  A transport's handlers become
        no-ops: an event already fetched in this reactor iteration (a write readiness after
        the read that found the RST) must not reach Twisted's ``doWrite`` on a closed
        socket."""
        self.want_read(False)
        self.want_write(False)
        self.disconnected = True
        if self.transport is not None:
            self.transport.doRead = self.transport.doWrite = _ignore

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "splice"

    def doRead(self) -> None:
        assert self.out is not None
        self.tunnel._read(self.out)

    def doWrite(self) -> None:
        assert self.inc is not None
        self.tunnel._write(self.inc)

    def connectionLost(self, reason: Failure) -> None:
        # the reactor saw an error or hang-up while we were not reading (raw sockets only:
        # a transport's own connectionLost tells its protocol, which tells the tunnel)
        self.tunnel._broken(self, reason.getErrorMessage())


class SpliceTunnel:
    """Relays a client and a target connection with ``splice(2)`` (the
    :class:`~dcrouter.proxy.tunnel.Tunnel` interface: ``attach``, ``client_*``, ``backend_*``)."""

    def __init__(self, reactor: Any, client: Any, stats: RouteStats, idle_timeout: float,
                 on_done: Callable[[], None], preamble: bytes = b"") -> None:
        self.reactor = reactor
        self.client = client
        self.stats = stats
        self.on_done = on_done
        self.preamble = preamble
        self.backend: Optional[Any] = None
        self.pending: list[bytes] = []
        self.client_open = True
        self.backend_open = True
        self.client_eof = False
        self.done = False
        self.closing = False
        self.ends: list[_End] = []
        self.up: Optional[_Direction] = None
        self.down: Optional[_Direction] = None
        self.connector: Any = None          # set by the front end while connecting
        self.client_paused = False          # the client's transport is not reading
        self.idle = IdleTimeout(wheel_for(reactor), idle_timeout, self._idle)

    # -- setup ---------------------------------------------------------------------
    def attach(self, backend: Any, initial: bytes = b"") -> None:
        """The target is connected (a Twisted TCP transport, or a connected non-blocking
        socket from :class:`~dcrouter.proxy.rawconnect.RawConnect`): take both sockets over and start relaying."""
        if self.done or not self.client_open:
            if isinstance(backend, socket.socket):
                backend.close()
            else:
                backend.loseConnection()
            self.backend_open = False
            self._finish()
            return
        self.backend = backend
        data = initial + b"".join(self.pending)
        self.pending = []
        self.stats.bytes_in += len(data)
        raw = isinstance(backend, socket.socket)
        # a Twisted client transport of a target (given by name) reads since it connected
        client = _End(self, self.client, reading=not self.client_paused)
        backend = _End(self, backend, reading=not raw)
        self.ends = [client, backend]
        self.up = _Direction(client, backend, _new_pipe(), True, self.preamble + data)
        self.down = _Direction(backend, client, _new_pipe(), False)
        client.out = backend.inc = self.up
        backend.out = client.inc = self.down
        if self.client_eof:
            self.up.eof = True
        else:
            self._want_read(client, True)
        self._want_read(backend, True)
        if self.up.prefix and self._flush(self.up) and self.up.eof:
            self._pass_eof(self.up)
        elif not self.up.prefix and self.up.eof:
            self._pass_eof(self.up)

    # -- reactor registration --------------------------------------------------------
    @staticmethod
    def _want_read(end: _End, on: bool) -> None:
        end.want_read(on)

    @staticmethod
    def _want_write(end: _End, on: bool) -> None:
        end.want_write(on)

    def _detach(self) -> None:
        """Take our readiness handlers out of the reactor (before a socket closes)."""
        for end in self.ends:
            end.detach()

    # -- moving bytes ------------------------------------------------------------------
    def _read(self, d: _Direction) -> None:
        if self.closing:
            return
        splice = _splice
        assert splice is not None
        for _ in range(ROUNDS):
            room = d.size - d.in_pipe
            if room <= 0:                   # full (in bytes: a pipe slot may hold more
                d.paused = True             # than a page, so slots alone do not bound it)
                self._want_read(d.src, False)
                break
            try:
                n = splice(d.src.fd, d.w, room, None, None, _FLAGS)
            except BlockingIOError:
                if d.in_pipe:               # the pipe is full: wait for the destination
                    d.paused = True
                    self._want_read(d.src, False)
                break
            except OSError as e:
                self._broken(d.src, e.strerror or str(e))
                return
            if n == 0:
                d.eof = True
                self._want_read(d.src, False)
                break
            d.in_pipe += n
            if not self._flush(d) or n < room:
                break                       # less than asked: the socket is drained for now
        if self.closing:
            return
        self.idle.touch()
        if d.eof and not d.in_pipe and not d.prefix:
            self._pass_eof(d)

    def _write(self, d: _Direction) -> None:
        if self.closing:
            return
        if self._flush(d):
            self.idle.touch()
            if d.eof:
                self._pass_eof(d)

    def _flush(self, d: _Direction) -> bool:
        """Move the prefix and the pipe's bytes to the destination; False if it would block."""
        dst = d.dst
        if d.prefix:
            try:
                sent = dst.sock.send(d.prefix)
            except BlockingIOError:
                self._want_write(dst, True)
                return False
            except OSError as e:
                self._broken(dst, e.strerror or str(e))
                return False
            d.prefix = d.prefix[sent:]
            if d.prefix:
                self._want_write(dst, True)
                return False
        splice = _splice
        assert splice is not None
        moved = 0
        while d.in_pipe:
            try:
                m = splice(d.r, dst.fd, d.in_pipe, None, None, _FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                self._count(d, moved)
                self._broken(dst, e.strerror or str(e))
                return False
            asked = d.in_pipe
            d.in_pipe -= m
            moved += m
            if m < asked:                   # the socket's buffer is full: wait for room
                break
        self._count(d, moved)
        if d.in_pipe:
            self._want_write(dst, True)
            if moved and d.paused:          # room again: read on while it drains
                d.paused = False
                self._want_read(d.src, True)
            return False
        self._want_write(dst, False)
        if d.paused:
            d.paused = False
            self._want_read(d.src, True)
        return True

    def _count(self, d: _Direction, n: int) -> None:
        if d.outgoing:
            self.stats.bytes_in += n
        else:
            self.stats.bytes_out += n

    def _pass_eof(self, d: _Direction) -> None:
        """The source ended and everything reached the destination: shut its write side."""
        if d.shut or self.closing:
            return
        d.shut = True
        try:
            d.dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        assert self.up is not None and self.down is not None
        if self.up.shut and self.down.shut:
            self._close(orderly=True)

    # -- ending ------------------------------------------------------------------------
    def _broken(self, end: _End, error: str) -> None:
        """``end``'s socket failed: abort it; the other side gets what is on its way, then FIN."""
        if self.closing:
            return
        # no log line: a client's RST is routine (and a log call per connection costs)
        other = self.ends[1] if end is self.ends[0] else self.ends[0]
        self.closing = True
        self._detach()
        towards = other.inc
        if towards is not None and towards.in_pipe and not towards.prefix:
            try:
                assert _splice is not None
                self._count(towards, _splice(towards.r, other.fd, towards.in_pipe, None, None,
                                             _FLAGS))
            except OSError:
                pass
        self.idle.cancel()
        # the client first: its transport's connectionLost must not find the backend open
        for e in (self.ends[0], self.ends[1]):
            self._drop(e, orderly=e is other)

    def _close(self, orderly: bool) -> None:
        if self.closing:
            return
        self.closing = True
        self._detach()
        self.idle.cancel()
        for end in list(self.ends):
            self._drop(end, orderly)

    def _drop(self, end: _End, orderly: bool) -> None:
        """Close one socket now (no round through the reactor), telling its owner."""
        if end.transport is None:               # our raw backend socket
            if not orderly:
                _set_linger_zero(end.sock)
            end.sock.close()
            self.backend_lost()
            return
        transport = end.transport
        if isinstance(transport, tcp.Connection) and transport.connected \
                and not transport.disconnected and hasattr(transport, "socket"):
            # what the reactor would do after loseConnection/abortConnection, at once:
            # close the socket (RST when aborted) and call the protocol's connectionLost
            transport.connectionLost(_DONE if orderly else _ABORTED)
        else:                                   # not a live TCP transport: let Twisted do it
            for name in ("doRead", "doWrite"):
                transport.__dict__.pop(name, None)
            if orderly:
                transport.loseConnection()
            else:
                _abort(transport)

    def _idle(self) -> None:
        if self.done or self.closing:
            return
        self.stats.error("idle_timeout")
        self.abort()

    def abort(self) -> None:
        """Close both sides now (shutdown deadline, idle timeout)."""
        if self.ends:
            self._close(orderly=False)
            return
        self.closing = True
        if self.connector is not None:
            self.connector.cancel()
        _abort(self.client)

    # -- the Tunnel interface used by the front end ------------------------------------
    def client_data(self, data: bytes) -> None:
        """Bytes the client's transport read while the target is being connected: kept, and
        the client is no longer read until then (bounded: one read)."""
        if self.backend is None and not self.closing:
            self.pending.append(data)
            if not self.client_paused:
                self.client_paused = True
                self.client.stopReading()

    def client_read_closed(self) -> None:
        """Twisted saw the client's EOF (before the tunnel took over, or a hang-up event
        without data): it stopped reading; pass the EOF on."""
        self.client_eof = True
        self.client_paused = True
        if self.up is not None:
            self._source_ended(self.up)

    def _source_ended(self, d: _Direction) -> None:
        d.eof = True
        d.src.reading = False               # the reactor took the reader away
        if not d.in_pipe and not d.prefix:
            self._pass_eof(d)
        if self.up is not None and not self.up.eof:
            self.up.eof = True

    def client_lost(self, reason: Optional[Failure] = None) -> None:
        """The client's transport closed."""
        self.client_open = False
        if not self.closing:
            self.closing = True
            if self.ends:
                self._detach()
                self.idle.cancel()
                self._drop(self.ends[1], orderly=True)
            elif self.connector is not None:        # still connecting
                self.connector.cancel()
        self._maybe_finish()

    def backend_data(self, data: bytes) -> None:
        """Bytes the target's transport read (only before or after the tunnel's work)."""

    def backend_read_closed(self) -> None:
        """Twisted saw the target's EOF (a target given by name has a Twisted transport)."""
        if self.down is not None:
            self._source_ended(self.down)

    def backend_lost(self, reason: Optional[Failure] = None) -> None:
        """The target's connection closed (or could not be made)."""
        if not self.backend_open:
            return
        self.backend_open = False
        if not self.closing and self.client_open:
            self.closing = True
            self._detach()
            self.idle.cancel()
            if self.ends:
                self._drop(self.ends[0], orderly=True)
            else:
                self.client.loseConnection()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self.client_open and (self.backend is None or not self.backend_open):
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.idle.cancel()
        for d in (self.up, self.down):
            if d is not None:
                _give_back(d.pipe, empty=not d.in_pipe)
        self.up = self.down = None
        self.on_done()


def _ignore() -> None:
    """The readiness handler of a transport the tunnel is closing."""


def _set_linger_zero(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except OSError:
        pass


_LINGER_ZERO = struct.pack("ii", 1, 0)


def _abort(transport: Any) -> None:
    abort = getattr(transport, "abortConnection", None)
    (abort or transport.loseConnection)()

