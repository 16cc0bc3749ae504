"""A pool of scan worker processes that can be killed: the built-in scan never runs in the reactor.

:meth:`ScanPool.analyse` sends a spool file's path to an idle worker
(:mod:`dcrouter.email.scanning.worker`, started with ``reactor.spawnProcess``
when needed, at most ``size`` of them) and fires with its report.  The time
limit covers waiting for a worker and the scan itself:

* the worker is given what is left of it as its own deadline and checks it
  between chunks, answering ``time`` when it passes (it then stays idle);
* a worker that has not answered :data:`KILL_GRACE` seconds after the
  deadline - stuck, or stopped - is killed with SIGKILL, and a new one is
  started for the next job; so is the worker of a cancelled job.

A new worker takes jobs once it has said it is ready (its imports done), so
its start-up never counts against a scan's deadline, only against the time a
job may wait.

Every failure is a :class:`~dcrouter.email.scanning.types.ScannerError`, so
the gateway's ``scan_fail_mode`` decides what the client is told.  One pool
serves a process (:meth:`ScanPool.shared`), it stops its workers when the
reactor shuts down, and workers exit by themselves when the gateway's end of
their stdin closes.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import sys
from typing import Any, Optional

from twisted.internet import defer, protocol
from twisted.python.failure import Failure

from dcrouter.email.scanning.limits import Limits
from dcrouter.email.scanning.types import ScannerError
from dcrouter.logsetup import get_logger

log = get_logger("email.scanning")

#: Seconds after its deadline before a silent worker is killed.
KILL_GRACE = 1.0
#: Longest reply line accepted from a worker.
MAX_REPLY = 16 * 1024 * 1024
#: stderr bytes of a worker kept for the log.
MAX_STDERR = 8192


def _package_root() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.dirname(os.path.dirname(os.path.dirname(here)))


class _Job:
    """One analysis request on its way."""

    def __init__(self, number: int, path: str, features: list[str], limits: Limits,
                 timeout: float, started: float, blocked: Optional[list[str]] = None) -> None:
        self.number = number
        self.blocked = blocked
        self.path = path
        self.features = features
        self.limits = limits
        self.timeout = timeout
        self.started = started
        self.deadline = started + timeout
        self.worker: Optional["_Worker"] = None
        self.timer: Any = None
        self.deferred: defer.Deferred = defer.Deferred()

    def finish(self, result: Any) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if not self.deferred.called:
            if isinstance(result, Exception):
                self.deferred.errback(Failure(result))
            else:
                self.deferred.callback(result)


class _Worker(protocol.ProcessProtocol):
    """The pool's end of one worker process."""

    def __init__(self, pool: "ScanPool") -> None:
        self.pool = pool
        self.pid: Optional[int] = None
        self.job: Optional[_Job] = None
        self.buffer = b""
        self.stderr = b""
        self.ready = False      # imports done: takes jobs
        self.dead = False       # killed or ended: takes no more jobs

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.pool._reply(self, line)
        if len(self.buffer) > MAX_REPLY:
            self.kill("reply too long")

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-MAX_STDERR:]
        if b"\n" in data:
            text, _, self.stderr = self.stderr.rpartition(b"\n")
            log.warn("scan worker {worker_pid}: {output}", worker_pid=self.pid,
                     output=text.decode("utf-8", "replace")[-2000:])

    def send(self, job: _Job, timeout: float) -> None:
        request = {"id": job.number, "path": job.path, "features": job.features,
                   "limits": job.limits.to_dict(), "timeout": timeout, "blocked": job.blocked}
        self.transport.write(json.dumps(request).encode("ascii") + b"\n")  # type: ignore

    def kill(self, why: str) -> None:
        if not self.dead:
            self.dead = True
            log.warn("killing scan worker {worker_pid}: {why}", worker_pid=self.pid, why=why)
            self.pool.stats["killed"] += 1
            try:
                self.transport.signalProcess("KILL")  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - already gone (ProcessExitedAlready)
                pass

    def processEnded(self, reason: Failure) -> None:
        self.dead = True
        self.pool._ended(self, reason)


class ScanPool:
    """Scan worker processes, at most ``size``, each doing one job at a time."""

    _shared: dict[int, "ScanPool"] = {}

    def __init__(self, reactor: Any, size: int = 2, memory: int = 0,
                 python: str = sys.executable) -> None:
        self.reactor = reactor
        self.size = size
        self.memory = memory
        self.python = python
        self._spawn_after = 0.0   # back-off after a worker that failed to start
        self.workers: list[_Worker] = []
        self.idle: list[_Worker] = []
        self.queue: collections.deque[_Job] = collections.deque()
        self.stats: collections.Counter = collections.Counter()
        self._numbers = itertools.count(1)
        self._closed = False
        self._ended_waiters: list[defer.Deferred] = []

    @classmethod
    def shared(cls, reactor: Any) -> "ScanPool":
        """The process's pool for ``reactor`` (stopped when the reactor shuts down)."""
        pool = cls._shared.get(id(reactor))
        if pool is None or pool.reactor is not reactor or pool._closed:
            pool = cls._shared[id(reactor)] = cls(reactor)
            reactor.addSystemEventTrigger("before", "shutdown", pool.close)
        return pool

    def configure(self, size: int, memory: int) -> None:
        """New size and memory cap (running workers keep theirs until they are replaced)."""
        self.size = max(1, size)
        self.memory = memory
        while len(self.idle) and len(self.workers) > self.size:
            self._retire(self.idle.pop())
        self._dispatch()

    def worker_pids(self) -> list[int]:
        """PIDs of the live workers."""
        return [w.pid for w in self.workers if w.pid is not None and not w.dead]

    def get_stats(self) -> dict[str, Any]:
        """Workers, busy, queued and the counters (jobs, timeouts, killed, crashed...)."""
        counters = {k: self.stats[k] for k in ("jobs", "done", "errors", "timeouts", "killed",
                                                "crashed", "spawned", "start_failures")}
        return {"workers": len(self.workers), "busy": sum(1 for w in self.workers if w.job),
                "queued": len(self.queue), **counters}

    # -- jobs -----------------------------------------------------------------------

    def analyse(self, path: str, features: list[str], limits: Limits,
                timeout: float, blocked: Optional[list[str]] = None) -> defer.Deferred:
        """Fires with the report of the file at ``path``; ScannerError on any failure.

        ``blocked``: list only names with these extensions (see scanning.analysis)."""
        if self._closed:
            return defer.fail(ScannerError("content scanning is shutting down"))
        job = _Job(next(self._numbers), path, list(features), limits, timeout,
                   self.reactor.seconds(), blocked)

        def cancel(_d: defer.Deferred) -> None:
            self._abandon(job, "cancelled")

        job.deferred = defer.Deferred(cancel)
        job.timer = self.reactor.callLater(timeout, self._timed_out, job)  # while queued
        self.stats["jobs"] += 1
        self.queue.append(job)
        self._dispatch()
        return job.deferred

    def _dispatch(self) -> None:
        while self.queue and not self._closed:
            worker = self._idle_worker()
            if worker is None:
                return
            job = self.queue.popleft()
            left = job.deadline - self.reactor.seconds()
            if left <= 0:
                self.idle.append(worker)
                self.stats["timeouts"] += 1
                job.finish(ScannerError(f"no scan worker free within {job.timeout:g}s"))
                continue
            job.worker = worker
            worker.job = job
            if job.timer is not None and job.timer.active():
                job.timer.cancel()
            job.timer = self.reactor.callLater(left + KILL_GRACE, self._timed_out, job)
            worker.send(job, left)

    def _idle_worker(self) -> Optional[_Worker]:
        while self.idle:
            worker = self.idle.pop()
            if not worker.dead:
                return worker
        starting = any(not w.ready and not w.dead for w in self.workers)
        if len(self.workers) < self.size and not starting:
            if self.reactor.seconds() >= self._spawn_after:
                self._spawn()   # takes jobs once it says it is ready
        return None

    def _spawn(self) -> _Worker:
        worker = _Worker(self)
        env = dict(os.environ)
        root = _package_root()
        if os.path.basename(root) not in ("site-packages", "dist-packages"):
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
        args = [self.python, "-m", "dcrouter.email.scanning.worker",
                "--memory", str(self.memory)]
        self.reactor.spawnProcess(worker, self.python, args, env=env,
                                  childFDs={0: "w", 1: "r", 2: "r"})
        self.workers.append(worker)
        self.stats["spawned"] += 1
        log.debug("scan worker {worker_pid} started", worker_pid=worker.pid)
        return worker

    def _retire(self, worker: _Worker) -> None:
        worker.dead = True
        try:
            worker.transport.closeStdin()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001
            pass

    def _reply(self, worker: _Worker, line: bytes) -> None:
        job = worker.job
        try:
            reply = json.loads(line)
        except ValueError:
            worker.kill("unreadable reply")
            reply = None
        if isinstance(reply, dict) and reply.get("ready") is True and not worker.ready:
            worker.ready = True
            if not worker.dead:
                self.idle.append(worker)
            self._dispatch()
            return
        if job is None or not isinstance(reply, dict) or reply.get("id") != job.number:
            if job is not None:
                self._abandon(job, "answered out of turn")
            return
        worker.job = None
        job.worker = None
        if not worker.dead:
            self.idle.append(worker)
        if "report" in reply and isinstance(reply["report"], dict):
            self.stats["done"] += 1
            job.finish(reply["report"])
        else:
            kind = str(reply.get("error", "internal"))
            self.stats["timeouts" if kind == "time" else "errors"] += 1
            text = str(reply.get("text", "scan failed"))
            if kind == "time":
                text = f"content scan timed out after {job.timeout:g}s"
            job.finish(ScannerError(text, kind=kind))
        self._dispatch()

    def _timed_out(self, job: _Job) -> None:
        job.timer = None
        self.stats["timeouts"] += 1
        if job.worker is None:
            self._abandon(job, "queued", ScannerError(
                f"no scan worker free within {job.timeout:g}s", kind="time"))
            return
        self._abandon(job, f"no answer {KILL_GRACE:g}s after the {job.timeout:g}s deadline",
                      ScannerError(f"content scan timed out after {job.timeout:g}s",
                                   kind="time"))

    def _abandon(self, job: _Job, why: str, error: Optional[ScannerError] = None) -> None:
        """Give up on a job: dequeue it, or kill the worker that runs it."""
        try:
            self.queue.remove(job)
        except ValueError:
            pass
        worker, job.worker = job.worker, None
        if worker is not None:
            worker.job = None
            worker.kill(why)
        job.finish(error or ScannerError(f"content scan {why}"))
        self._dispatch()

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker in self.idle:
            self.idle.remove(worker)
        job, worker.job = worker.job, None
        if not worker.ready and not self._closed:
            # it never started: fail what waits now, and do not start another for a second
            self.stats["start_failures"] += 1
            self._spawn_after = self.reactor.seconds() + 1.0
            log.error("scan worker {worker_pid} failed to start: {output}",
                      worker_pid=worker.pid,
                      output=worker.stderr.decode("utf-8", "replace")[-2000:])
            while self.queue:
                self.queue.popleft().finish(ScannerError("scan worker failed to start"))
            return
        if job is not None:
            self.stats["crashed"] += 1
            code = getattr(reason.value, "exitCode", None)
            sig = getattr(reason.value, "signal", None)
            how = f"killed by signal {sig}" if sig else f"exited with status {code}"
            log.error("scan worker {worker_pid} {how} during a scan", worker_pid=worker.pid,
                      how=how)
            job.finish(ScannerError(f"scan worker {how}"))
        if not self.workers:
            waiters, self._ended_waiters = self._ended_waiters, []
            for d in waiters:
                d.callback(None)
        if not self._closed and len(self.workers) < self.size and \
                not any(not w.ready and not w.dead for w in self.workers):
            self._spawn()   # a replacement starts now, not when the next message waits
        self._dispatch()

    def close(self) -> defer.Deferred:
        """Fail the queued jobs, kill the workers, fire when they are gone."""
        self._closed = True
        while self.queue:
            self.queue.popleft().finish(ScannerError("content scanning is shutting down"))
        if not self.workers:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._ended_waiters.append(d)
        for worker in list(self.workers):
            if worker.job is not None:
                worker.job.finish(ScannerError("content scanning is shutting down"))
                worker.job = None
            worker.dead = False   # so kill() signals it
            worker.kill("shutting down")
        return d


__all__ = ["KILL_GRACE", "ScanPool"]
