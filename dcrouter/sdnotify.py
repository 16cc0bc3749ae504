"""systemd's notification protocol (``Type=notify``), in a few lines.

The protocol is one datagram of ``KEY=VALUE`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace); see
sd_notify(3).  dcrouter sends:

* ``READY=1`` once every listener is bound and the queue is open;
* ``RELOADING=1`` (with ``MONOTONIC_USEC``) when a SIGHUP reload begins and
  ``READY=1`` when it is over (applied or refused);
* ``STOPPING=1`` when a graceful stop begins;
* ``STATUS=...`` lines saying what runs;
* ``WATCHDOG=1`` every ``$WATCHDOG_USEC``/2 from the reactor, when systemd's
  watchdog is on (``WatchdogSec=``): a reactor that hangs stops the pings and
  systemd restarts the service.

Without ``$NOTIFY_SOCKET`` every call does nothing.  A send that fails is
logged once and never raises: notification must not stop the router.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping, Optional

from twisted.internet.task import LoopingCall

from dcrouter.logsetup import get_logger

log = get_logger("router")

#: Variables the notification protocol uses; not passed on to child processes.
ENV_NAMES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the notification variables (for worker processes)."""
    return {k: v for k, v in env.items() if k not in ENV_NAMES}


class Notifier:
    """Does nothing: the interface of :class:`SystemdNotifier` (and the worker's link)."""

    enabled = False

    def ready(self, status: str = "") -> None:
        """The service is up."""

    def reloading(self, status: str = "") -> None:
        """A reload begins."""

    def stopping(self, status: str = "") -> None:
        """A graceful stop begins."""

    def status(self, status: str) -> None:
        """A new status line."""

    def start_watchdog(self, reactor: Any) -> None:
        """Begin the watchdog pings, when asked for."""

    def stop_watchdog(self) -> None:
        """End them."""


class SystemdNotifier(Notifier):
    """Sends notifications to ``$NOTIFY_SOCKET``."""

    def __init__(self, env: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if env is None else env
        self.path = env.get("NOTIFY_SOCKET", "")
        self.enabled = bool(self.path)
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self._address = ("\0" + self.path[1:]) if self.path.startswith("@") else self.path
        self._socket: Optional[socket.socket] = None
        self._warned = False
        self._loop: Optional[LoopingCall] = None
        #: Every datagram sent (for ``get_stats`` and tests of the embedding code).
        self.sent = 0

    def send(self, **fields: Any) -> bool:
        """One datagram of ``KEY=value`` lines; False when it could not be sent."""
        if not self.enabled:
            return False
        data = "".join(f"{key}={value}\n" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(data.encode("utf-8", "replace"), self._address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warn("cannot notify systemd at {socket}: {error}", socket=self.path,
                         error=e.strerror or str(e))
            return False
        self.sent += 1
        return True

    @staticmethod
    def _line(text: str) -> str:
        return " ".join(text.split())[:400]

    def ready(self, status: str = "") -> None:
        """``READY=1`` (and ``STATUS``)."""
        fields: dict[str, Any] = {"READY": 1}
        if status:
            fields["STATUS"] = self._line(status)
        self.send(**fields)

    def reloading(self, status: str = "") -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (what Type=notify-reload wants too)."""
        fields: dict[str, Any] = {"RELOADING": 1,
                                  "MONOTONIC_USEC": time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                                  // 1000}
        if status:
            fields["STATUS"] = self._line(status)
        self.send(**fields)

    def stopping(self, status: str = "") -> None:
        """``STOPPING=1``."""
        fields: dict[str, Any] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = self._line(status)
        self.send(**fields)

    def status(self, status: str) -> None:
        """``STATUS=...``."""
        self.send(STATUS=self._line(status))

    def start_watchdog(self, reactor: Any) -> None:
        """``WATCHDOG=1`` every ``WATCHDOG_USEC``/2, from the reactor's own loop."""
        if not self.enabled or not self.watchdog_usec or self._loop is not None:
            return
        self._loop = LoopingCall(self.send, WATCHDOG=1)
        self._loop.clock = reactor
        self._loop.start(self.watchdog_usec / 2e6, now=True)
        log.info("systemd watchdog: a ping every {seconds:.3g}s",
                 seconds=self.watchdog_usec / 2e6)

    def stop_watchdog(self) -> None:
        """No more pings."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


def from_environment(env: Optional[Mapping[str, str]] = None) -> Notifier:
    """A :class:`SystemdNotifier` when ``$NOTIFY_SOCKET`` is set, else a silent one."""
    notifier = SystemdNotifier(env)
    return notifier if notifier.enabled else Notifier()
