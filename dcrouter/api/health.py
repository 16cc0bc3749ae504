"""``/healthz`` and ``/readyz`` on the API port: plain-text answers for load balancers.

Neither needs the API token (a load balancer's probe carries none) and neither
tells more than a word per failed check:

* ``GET /healthz`` - ``200 ok``: the process is alive and its reactor answers
  (what a supervisor or Kubernetes' liveness probe restarts on);
* ``GET /readyz`` - ``200 ready`` when the router has started, every listener
  the configuration names is bound, the queue can be written (a probe file in
  the disk queue's directory and in ``state_dir``, written and removed in a
  thread) and Redis answers ``PING`` when the queue lives there; otherwise
  ``503`` and one line per failed check (``not ready: queue not writable``).
  Each check gives up after :data:`CHECK_TIMEOUT` seconds.

``HEAD`` answers the same without a body; other methods get ``405``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet import defer, threads
from twisted.web import server
from twisted.web.iweb import IRequest

from dcrouter.logsetup import get_logger
from dcrouter.sockets import planned_listeners

log = get_logger("api")

#: Paths served by :class:`HealthChecks`.
HEALTH_PATHS = (b"/healthz", b"/readyz")
#: Seconds one readiness check may take.
CHECK_TIMEOUT = 5.0


def _probe_write(directory: str) -> None:
    """Create, write, fsync and remove a small file in ``directory`` (OSError if not)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f".readyz-{os.getpid()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"ready?\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(path)


class HealthChecks:
    """Answers the health paths for one router (``context`` as the API service's)."""

    def __init__(self, context: Any) -> None:
        self.context = context

    # -- the checks ---------------------------------------------------------------
    def _started(self) -> Optional[str]:
        router = self.context.router
        if router is None:
            return "not started"
        if getattr(router, "_stopping", False):
            return "stopping"
        ready = getattr(router, "is_ready", None)
        if ready is False or (ready is None and not getattr(router, "running", False)):
            return "starting"
        return None

    def _listeners(self) -> list[str]:
        missing = []
        worker = self.context.worker
        for name, service in self.context.services.items():
            bound = [(p.split("+", 1)[0], h, port) for p, h, port in service.bound_addresses()]
            for planned in planned_listeners(self.context.options, name):
                if planned.key_path == "api.port" and worker is not None and \
                        not worker.runs_api:
                    continue
                if not any(p == planned.protocol and h == planned.host and
                           (planned.port == 0 or port == planned.port) for p, h, port in bound):
                    missing.append(f"{name} {planned.protocol}/{planned.port} not listening")
        return missing

    def _queue(self) -> list[defer.Deferred]:
        """Deferreds that fire with None (fine) or a failure word."""
        checks: list[defer.Deferred] = []
        state_dir = self.context.state_dir
        checks.append(self._write_check(state_dir, "state_dir not writable"))
        email = self.context.options.email
        gateway = self.context.services.get("email")
        if email is None or gateway is None:
            return checks
        queue = email.queue
        if queue.storage_type == "disk":
            directory = queue.persistent_path or os.path.join(state_dir or ".", "queue")
            checks.append(self._write_check(directory, "queue not writable"))
        elif queue.storage_type == "redis":
            store = getattr(getattr(gateway, "queue", None), "store", None)
            checks.append(self._redis_check(getattr(store, "redis", None)))
        return checks

    def _write_check(self, directory: str, failure: str) -> defer.Deferred:
        d = threads.deferToThread(_probe_write, directory or ".")
        d.addCallback(lambda _: None)

        def failed(f: Any) -> str:
            log.warn("readiness: {what}: {error}", what=failure, error=f.getErrorMessage())
            return failure
        d.addErrback(failed)
        return d

    def _redis_check(self, redis: Any) -> defer.Deferred:
        if redis is None:
            return defer.succeed("redis not connected")
        d = defer.maybeDeferred(redis.ping)
        d.addCallback(lambda _: None)
        d.addErrback(lambda f: "redis unreachable")
        return d

    def readiness(self) -> defer.Deferred:
        """Fires with the failed checks (an empty list: ready)."""
        reactor = self.context.reactor
        started = self._started()
        if started is not None:
            return defer.succeed([started])
        failures = self._listeners()
        pending = []
        for check in self._queue():
            check.addTimeout(CHECK_TIMEOUT, reactor,
                             onTimeoutCancel=lambda *_: "check timed out")
            pending.append(check)
        d = defer.gatherResults(pending, consumeErrors=True)
        d.addCallback(lambda results: failures + [r for r in results if r])
        return d

    # -- HTTP ------------------------------------------------------------------------
    def render(self, request: IRequest) -> Any:
        """Answer ``request`` (a health path): bytes now, or NOT_DONE_YET."""
        method = request.method or b"GET"
        if method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return self._answer(request, 405, "method not allowed\n")
        if request.path == b"/healthz":
            return self._answer(request, 200, "ok\n")
        d = self.readiness()

        def write(failures: list[str]) -> None:
            if failures:
                text = "".join(f"not ready: {f}\n" for f in failures)
                body = self._answer(request, 503, text)
            else:
                body = self._answer(request, 200, "ready\n")
            if not getattr(request, "_disconnected", False):
                request.write(body)
                request.finish()
        d.addCallback(write)
        d.addErrback(lambda f: log.failure("readiness check failed", f))
        return server.NOT_DONE_YET

    @staticmethod
    def _answer(request: IRequest, status: int, text: str) -> bytes:
        body = text.encode("utf-8")
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-length", str(len(body)).encode())
        return b"" if request.method == b"HEAD" else body
