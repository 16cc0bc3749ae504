"""The router as a supervised daemon: readiness, reload and stop reported to a supervisor.

:class:`DaemonRouter` is the :class:`~dcrouter.router.DcRouter` that
``twistd dcrouter`` and each worker process run.  It adds what a supervisor
(systemd's ``Type=notify``, or the master of a multi-worker dcrouter) needs:

* ``ready`` once every listener is bound and the queue is open (also the
  answer of ``/readyz`` to the question "has it started?");
* ``reloading`` then ``ready`` around every reload (SIGHUP or the API), with a
  status line saying whether the new configuration was applied or refused;
* ``stopping`` when a graceful stop begins;
* the systemd watchdog pings while it runs;
* the mail log's one-line summary per recipient and attempt
  (:mod:`dcrouter.maillog`).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet import defer

from dcrouter.config import DcRouterOptions
from dcrouter.logsetup import get_logger
from dcrouter.router import DcRouter
from dcrouter.sdnotify import Notifier, from_environment
from dcrouter.service import Extensions, WorkerIdentity

log = get_logger("router")

#: Seconds ``ready`` waits for the queue to open before saying so in the status line.
QUEUE_WAIT_WARNING = 10.0


def describe_listeners(bound: dict[str, list[tuple[str, str, int]]]) -> str:
    """``email tcp/25,tcp/587; dns udp/53,tcp/53`` from ``bound_addresses()``."""
    parts = []
    for name, addresses in bound.items():
        if addresses:
            ports = ",".join(f"{proto}/{port}" for proto, _, port in addresses)
            parts.append(f"{name} {ports}")
    return "; ".join(parts) or "no listeners"


class DaemonRouter(DcRouter):
    """A DcRouter that tells a supervisor when it is ready, reloading and stopping."""

    def __init__(self, options: DcRouterOptions, config_path: Optional[str] = None,
                 extensions: Optional[Extensions] = None, reactor: Any = None,
                 exit_on_error: bool = False, worker: Optional[WorkerIdentity] = None,
                 notifier: Optional[Notifier] = None) -> None:
        super().__init__(options, config_path=config_path, extensions=extensions,
                         reactor=reactor, exit_on_error=exit_on_error, worker=worker)
        self.notifier = notifier if notifier is not None else from_environment()
        email = self.by_name.get("email")
        if email is not None:  # Postfix-style status=sent/deferred/bounced lines
            from dcrouter.maillog import MailSummaryLog
            getattr(email, "delivery").add_observer(MailSummaryLog())
        #: True once every listener was bound and the queue opened.
        self.is_ready = False
        self.reloads = 0
        self._ready_waiters: list[defer.Deferred] = []

    def when_ready(self) -> defer.Deferred:
        """Fires once the router is ready (at once when it is)."""
        if self.is_ready:
            return defer.succeed(self)
        d: defer.Deferred = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def _queue(self) -> Any:
        email = self.by_name.get("email")
        return getattr(email, "queue", None)

    def startService(self) -> None:
        """Start every service, then say ready once the queue is open."""
        super().startService()
        queue = self._queue()
        d = queue.when_ready() if queue is not None else defer.succeed(None)
        if not d.called:
            self.notifier.status("listening; waiting for the queue to open")
        d.addCallback(lambda _: self._announce_ready())
        d.addErrback(lambda f: log.failure("readiness not announced", f))

    def _announce_ready(self) -> None:
        if not self.running or self._stopping:
            return
        self.is_ready = True
        status = f"ready: {describe_listeners(self.bound_addresses())}"
        self.notifier.ready(status)
        self.notifier.start_watchdog(self.reactor)
        log.info("dcrouter ready (pid {pid}): {listeners}", pid=os.getpid(),
                 listeners=describe_listeners(self.bound_addresses()))
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(self)

    def reload(self, from_signal: bool = False) -> defer.Deferred:
        """Re-read the file, telling the supervisor it reloads and then that it is ready."""
        self.notifier.reloading(f"reloading {self.config_path or 'the configuration'}")
        d = super().reload(from_signal=from_signal)

        def done(result: Any) -> Any:
            self.reloads += 1
            applied = result is not False
            state = "configuration applied" if applied else \
                "reload refused, running the previous configuration"
            self.notifier.ready(f"ready ({state}): {describe_listeners(self.bound_addresses())}")
            return result
        d.addBoth(done)
        return d

    def stopService(self) -> Any:
        """Say stopping, then stop gracefully."""
        self.notifier.stopping("stopping: finishing open transactions")
        self.notifier.stop_watchdog()
        self.is_ready = False
        return super().stopService()


def make_daemon(options: DcRouterOptions, config_path: Optional[str] = None,
                extensions: Optional[Extensions] = None, reactor: Any = None,
                exit_on_error: bool = True, worker: Optional[WorkerIdentity] = None,
                notifier: Optional[Notifier] = None) -> DaemonRouter:
    """The router of ``twistd dcrouter`` (and of each worker process)."""
    return DaemonRouter(options, config_path=config_path, extensions=extensions,
                        reactor=reactor, exit_on_error=exit_on_error, worker=worker,
                        notifier=notifier)
