"""A non-blocking ``connect(2)`` watched by the reactor, for the splice relay's targets.

The splice relay (:mod:`dcrouter.proxy.splice`) needs only a connected file
descriptor for a target given as a literal address, so it skips Twisted's
connector, client transport, protocol and Deferreds: :class:`RawConnect`
creates the socket, starts the connect and waits for writability (the
connect timeout on the shared timer wheel).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Callable, Optional

from twisted.internet import error
from twisted.internet.interfaces import IReadWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.timerwheel import wheel_for


@implementer(IReadWriteDescriptor)
class RawConnect:
    """A non-blocking ``connect(2)`` to a literal address, watched by the reactor.

    The splice path needs only a file descriptor for the target, so it skips
    Twisted's connector, client transport and protocol: ``done(sock, None)``
    once connected (TCP_NODELAY set), ``done(None, error)`` when refused,
    unreachable or after ``timeout`` seconds (on the shared timer wheel).
    """

    def __init__(self, reactor: Any, host: str, port: int, version: int, timeout: float,
                 done: Callable[[Optional[socket.socket], Optional[BaseException]], None]) -> None:
        self.reactor = reactor
        self.done = done
        self.finished = False
        self.timer: Any = None
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        self.fd = self.sock.fileno()
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        err = self.sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._end(OSError(err, os.strerror(err)))
            return
        reactor.addWriter(self)
        self.timer = wheel_for(reactor).call_later(timeout, self._timeout)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "splice-connect"

    def doRead(self) -> None:
        pass

    def doWrite(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._end(OSError(err, os.strerror(err)) if err else None)

    def connectionLost(self, reason: Failure) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNREFUSED
        self._end(OSError(err, os.strerror(err)))

    def _timeout(self) -> None:
        self.timer = None
        self._end(error.TimeoutError(string="connect timed out"))

    def _end(self, failure: Optional[BaseException]) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.reactor.removeWriter(self)
        if failure is None:
            self.done(self.sock, None)
        else:
            self.sock.close()
            self.done(None, failure)

    def cancel(self) -> None:
        """Give up (nothing is reported)."""
        if not self.finished:
            self.finished = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.reactor.removeWriter(self)
            self.sock.close()
