"""Multi-worker mode: a master process and N worker processes sharing every port.

With ``router.workers`` = N > 1, ``twistd -n dcrouter --config FILE`` runs a
:class:`WorkerMaster` instead of the router.  The master binds every listening
socket once, in ``privilegedStartService`` (so as root when twistd drops to
``--uid/--gid`` afterwards), and starts N workers with ``reactor.spawnProcess``
(``python -m dcrouter.workers --config FILE --index I --count N``), each a
complete dcrouter that inherits those sockets as file descriptors
(:data:`dcrouter.sockets.INHERIT_ENV` says which is which) and accepts on
them: one socket per address, shared by every worker, as nginx and HAProxy
pass theirs - the Postfix master / HAProxy master-worker shape:

* worker 0 starts first and alone (it creates shared state such as the
  self-signed certificates and DKIM keys); the others start once it reported
  ready.  A worker that fails before every worker was ready once (a port in
  use) stops the master with the worker's exit status; later, a worker that
  cannot start (say the file on disk was broken since) is retried with the
  back-off below while the others keep serving.
* a worker that dies later is restarted after a back-off (0.5 s, doubling up
  to 30 s; reset after a worker ran a minute), logged with its exit status.
  The new worker adopts the dead one's disk-queue shard.
* the master keeps its sockets for the workers it restarts; a reload that
  removes a listener closes the master's copy too.  A port a reload adds is
  bound by each worker itself with ``SO_REUSEPORT``
  (:attr:`dcrouter.service.ListenerSet.reuse_port`), and refused when it is
  below 1024 after the privilege drop (a restart binds it).
* SIGHUP on the master is forwarded to every worker (each re-reads the
  file); SIGTERM/SIGINT stop every worker gracefully, wait up to
  ``router.shutdown_timeout`` + :data:`STOP_MARGIN` seconds, kill what is
  left and exit 0.
* each worker's standard input is a pipe from the master: when the master
  dies (even by SIGKILL) the worker sees end-of-file and stops gracefully,
  so no worker outlives its master.  Workers report readiness (and the end of
  each reload) on fd 3; the master tells systemd (:mod:`dcrouter.sdnotify`):
  ``READY=1`` once every worker is ready, ``RELOADING=1`` until every worker
  reloaded, ``STOPPING=1``.
* the management API runs in worker 0; every worker writes its figures to a
  snapshot file that worker 0 reports as its ``workers`` service
  (:class:`WorkerStats`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer, protocol, threads
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from zope.interface import implementer

from dcrouter.config import DcRouterOptions, load_config
from dcrouter.errors import ConfigError
from dcrouter.logsetup import get_logger, make_observer
from dcrouter.sdnotify import Notifier, child_environment, from_environment
from dcrouter.service import ListenerSet, ManagedService, WorkerIdentity
from dcrouter.sockets import (
    INHERIT_ENV, POOL, ListenError, SocketPool, planned_listeners,
)

log = get_logger("router")

#: Seconds beyond ``router.shutdown_timeout`` the master waits before killing workers.
STOP_MARGIN = 5.0
#: First restart delay after a worker died; doubled per quick death up to MAX_BACKOFF.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: A worker that ran this long before dying is restarted after FIRST_BACKOFF again.
STABLE_AFTER = 60.0
#: The worker's file descriptor on which it tells the master it is ready.
READY_FD = 3
#: The first of the worker's file descriptors that are inherited listening sockets.
FIRST_SOCKET_FD = 4
#: Seconds between the snapshots of each worker's figures (for worker 0's API).
SNAPSHOT_INTERVAL = 2.0


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_command(config_path: str, index: int, count: int) -> list[str]:
    """The argv of worker ``index`` of ``count``."""
    return [sys.executable, "-m", "dcrouter.workers", "--config", config_path,
            "--index", str(index), "--count", str(count)]


def exit_description(reason: Any) -> tuple[Optional[int], Optional[int], str]:
    """(exit code, signal, text) of a ``processEnded`` reason."""
    value = reason.value
    code = getattr(value, "exitCode", None)
    sig = getattr(value, "signal", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return code, sig, f"killed by {name}"
    return code, sig, f"exited with status {code}"


class WorkerProcess(protocol.ProcessProtocol):
    """The master's end of one worker: readiness messages and the exit."""

    def __init__(self, master: "WorkerMaster", index: int) -> None:
        self.master = master
        self.index = index
        self.pid: Optional[int] = None
        self.started = master.reactor.seconds()
        self.ready = False
        self.ended = False
        self.reload_pending = False
        self._buffer = b""

    def connectionMade(self) -> None:
        """Spawned: remember the pid."""
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Lines from the worker on fd 3: ``ready``, ``reload-all``."""
        if childFD != READY_FD:
            return
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            word = line.strip().decode("ascii", "replace")
            if word == "ready" and not self.ready:
                self.ready = True
                self.master.worker_ready(self)
            elif word == "reloaded":
                self.master.worker_reloaded(self)
            elif word == "reload-all":
                self.master.forward_reload(exclude=self.index)

    def processEnded(self, reason: Any) -> None:
        """The worker is gone: the master decides what next."""
        self.ended = True
        self.master.worker_ended(self, reason)

    def signal(self, sig: str) -> None:
        """Send a signal ('TERM', 'HUP', 'KILL') if the worker still runs."""
        if self.ended or self.transport is None:
            return
        try:
            self.transport.signalProcess(sig)
        except Exception:  # already gone (ProcessExitedAlready)
            pass


class WorkerMaster(Service):
    """The master process of a multi-worker dcrouter (see the module docstring)."""

    name = "workers"  # type: ignore[assignment]

    def __init__(self, options: DcRouterOptions, config_path: str, reactor: Any = None,
                 exit_on_error: bool = True, notifier: Optional[Notifier] = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.options = options
        self.config_path = os.path.abspath(config_path)
        self.reactor = reactor
        self.exit_on_error = exit_on_error
        self.count = options.router.effective_workers
        self.log_observer = TaggedObserver(make_observer(options.router), "master")
        self.workers: dict[int, WorkerProcess] = {}
        self.backoff: dict[int, float] = {}
        self.restarts = 0
        self.exit_code = 0
        #: Every worker was ready once: later start failures are retried, not fatal.
        self.started = False
        self._timers: dict[int, Any] = {}
        self._stopping = False
        self._all_ended: Optional[defer.Deferred] = None
        #: The listening sockets bound in privilegedStartService, passed to every worker.
        self.sockets = SocketPool()
        self.notifier = notifier if notifier is not None else from_environment()
        #: Workers that have not yet reported the end of the reload in progress.
        self._reloading: set[int] = set()

    def setServiceParent(self, parent: Any) -> None:
        """Attach to a twistd application, registering the master's log observer on it."""
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    # -- start ------------------------------------------------------------------
    def privilegedStartService(self) -> None:
        """Bind every listener once (still root under ``twistd --uid``), for the workers."""
        try:
            self.sockets.prebind(planned_listeners(self.options))
        except ListenError as e:
            log.critical("cannot start: {error}", error=str(e), key_path=e.key_path)
            if not self.exit_on_error:
                raise
            sys.stderr.write(f"dcrouter: {e}\n")
            sys.stderr.flush()
            os._exit(1)
        super().privilegedStartService()

    def startService(self) -> None:
        """Start worker 0; the others follow once it is ready."""
        super().startService()
        from dcrouter.tlsutil import ensure_private_dir
        ensure_private_dir(self.options.router.state_dir)
        log.info("dcrouter master (pid {pid}) starting {count} workers", pid=os.getpid(),
                 count=self.count)
        self.spawn(0)
        self.reactor.callWhenRunning(self._install_signals)

    def spawn(self, index: int) -> WorkerProcess:
        """Start worker ``index`` (unless it runs already)."""
        timer = self._timers.pop(index, None)
        if timer is not None and timer.active():
            timer.cancel()
        running = self.workers.get(index)
        if running is not None and not running.ended:
            return running
        proc = WorkerProcess(self, index)
        env = child_environment(os.environ)
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, READY_FD: "r"}
        if len(self.sockets):
            inherited, env[INHERIT_ENV] = self.sockets.child_fds(FIRST_SOCKET_FD)
            child_fds.update(inherited)
        root = _package_root()
        if os.path.basename(root) not in ("site-packages", "dist-packages"):
            # a checkout: the workers import this very dcrouter (an installed one is found
            # anyway, and site-packages must not go before the standard library)
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
        self.reactor.spawnProcess(proc, sys.executable,
                                  worker_command(self.config_path, index, self.count),
                                  env=env, path=os.getcwd(), childFDs=child_fds)
        self.workers[index] = proc
        log.info("worker {index} started (pid {worker_pid})", index=index, worker_pid=proc.pid)
        return proc

    def worker_ready(self, proc: WorkerProcess) -> None:
        """A worker bound its ports; after worker 0, start the others."""
        log.info("worker {index} (pid {worker_pid}) ready", index=proc.index, worker_pid=proc.pid)
        if not self.started and len(self.workers) == self.count and \
                all(p.ready for p in self.workers.values()):
            self.started = True  # from now on a worker that fails to start is retried
            self.notifier.ready(f"ready: {self.count} workers")
            self.notifier.start_watchdog(self.reactor)
        if proc.reload_pending:
            proc.reload_pending = False
            proc.signal("HUP")
        if proc.index == 0 and not self._stopping:
            for index in range(1, self.count):
                if index not in self.workers and index not in self._timers:
                    self.spawn(index)  # (one waiting for its restart back-off keeps waiting)

    def worker_ended(self, proc: WorkerProcess, reason: Any) -> None:
        """Restart a worker that died; give up when one fails before it ever started."""
        code, sig, text = exit_description(reason)
        if self.workers.get(proc.index) is proc:
            del self.workers[proc.index]
        if proc.index in self._reloading:
            self.worker_reloaded(proc)
        if self._stopping:
            log.info("worker {index} (pid {worker_pid}) {outcome}", index=proc.index,
                     worker_pid=proc.pid, outcome=text, exit_status=code, signal=sig)
            if not self.workers and self._all_ended is not None and not self._all_ended.called:
                self._all_ended.callback(None)
            return
        if not proc.ready and not self.started:
            log.critical("worker {index} (pid {worker_pid}) {outcome} before it was ready; "
                         "stopping", index=proc.index, worker_pid=proc.pid, outcome=text,
                         exit_status=code, signal=sig)
            self.exit_code = code if code else 1
            self._stop_reactor()
            return
        ran = self.reactor.seconds() - proc.started
        delay = FIRST_BACKOFF if ran >= STABLE_AFTER else \
            min(MAX_BACKOFF, self.backoff.get(proc.index, FIRST_BACKOFF / 2) * 2)
        self.backoff[proc.index] = delay
        self.restarts += 1
        log.error("worker {index} (pid {worker_pid}) {outcome} after {ran:.1f}s; restarting in "
                  "{delay}s", index=proc.index, worker_pid=proc.pid, outcome=text,
                  exit_status=code, signal=sig, ran=ran, delay=delay, event="worker.died")
        self._timers[proc.index] = self.reactor.callLater(delay, self.spawn, proc.index)

    # -- signals ----------------------------------------------------------------
    def _install_signals(self) -> None:
        def stop(signum: int, frame: Any) -> None:
            log.info("received signal {signal}, stopping the workers gracefully", signal=signum)
            self.reactor.callFromThread(self._stop_reactor)

        def hup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)
        try:
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGHUP, hup)
        except ValueError:  # not in the main thread
            pass

    def _stop_reactor(self) -> None:
        # a terminal's Ctrl-C or a group kill signals the master and workers at once: stop once
        if self.reactor.running and not self._stopping:
            self._stopping = True
            self.reactor.stop()

    def reload(self) -> bool:
        """SIGHUP: check the file, then have every worker re-read it."""
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload refused, workers keep the running configuration: {error}",
                      error=str(e), path=e.path)
            return False
        if new.router.effective_workers != self.count:
            log.warn("router.workers changes need a restart; keeping {count} workers",
                     count=self.count)
        self.notifier.reloading(f"reloading {self.config_path}")
        self._reloading = {i for i, p in self.workers.items() if p.ready}
        if not self._reloading:
            self.notifier.ready(f"ready: {self.count} workers")
        self.forward_reload()
        self._close_removed(new)
        return True

    def _close_removed(self, new: DcRouterOptions) -> None:
        """Close the master's copy of sockets the new configuration no longer listens on
        (after the workers were told: theirs close as they reload)."""
        wanted = {p.key for p in planned_listeners(new)}
        closed = self.sockets.release(keep=wanted)
        if closed:
            log.info("closed the listening sockets the configuration dropped: {keys}",
                     keys=closed)

    def worker_reloaded(self, proc: WorkerProcess) -> None:
        """A worker finished a reload (applied or refused); the last one makes us ready."""
        if proc.index not in self._reloading:
            return
        self._reloading.discard(proc.index)
        if not self._reloading:
            self.notifier.ready(f"ready (reloaded): {self.count} workers")

    def forward_reload(self, exclude: Optional[int] = None) -> None:
        """Send SIGHUP to every worker (but ``exclude``, which reloaded already)."""
        for index, proc in sorted(self.workers.items()):
            if index == exclude:
                continue
            if proc.ready:
                proc.signal("HUP")
            else:  # still starting (SIGHUP ignored until it runs): reload once it is ready
                proc.reload_pending = True
        log.info("reload forwarded to the workers")
        if exclude is not None:  # asked by a worker (a change made through the API)
            try:
                self._close_removed(load_config(self.config_path))
            except ConfigError:
                pass

    # -- stop -------------------------------------------------------------------
    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """SIGTERM every worker, wait for them (then SIGKILL), exit with the status."""
        self._stopping = True
        self.notifier.stopping(f"stopping {len(self.workers)} workers")
        self.notifier.stop_watchdog()
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self.workers:
            self._all_ended = defer.Deferred()
            for proc in self.workers.values():
                proc.signal("TERM")
            deadline = self.options.router.shutdown_timeout + STOP_MARGIN
            try:
                yield self._all_ended.addTimeout(deadline, self.reactor)
            except defer.TimeoutError:
                log.warn("workers still running after {seconds}s; killing them",
                         seconds=deadline)
                self._all_ended = defer.Deferred()
                for proc in self.workers.values():
                    proc.signal("KILL")
                try:
                    yield self._all_ended.addTimeout(STOP_MARGIN, self.reactor)
                except defer.TimeoutError:
                    pass
        self.sockets.release()
        log.info("dcrouter master stopped")
        if self.exit_code and self.exit_on_error:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.exit_code)


# -- the worker side -----------------------------------------------------------------------

@implementer(ILogObserver)
class TaggedObserver:
    """Adds the process's role to every event: ``worker`` field and the text's [system]."""

    def __init__(self, inner: Any, system: str, worker: Optional[int] = None) -> None:
        self.inner = inner
        self.system = system
        self.worker = worker

    def __call__(self, event: dict) -> None:
        # this is the process's only observer: tag the event in place
        if event.get("log_system", "-") == "-":
            event["log_system"] = self.system
        if self.worker is not None:
            event.setdefault("worker", self.worker)
        event.setdefault("pid", os.getpid())
        self.inner(event)


class WorkerStats(ManagedService):
    """Every worker's figures, for worker 0's API (``/api/stats``, ``/metrics``).

    Each worker writes its ``get_stats()`` every :data:`SNAPSHOT_INTERVAL`
    seconds to ``state_dir/workers/worker-<i>.json`` (atomically, in a
    thread); worker 0 reads the others' files (in a thread) and reports them
    as its ``workers`` service: ``{"count": N, "workers": {"1": {"pid", "age",
    <that worker's services>}, ...}}``.  Worker 0's own figures stay where
    they always are, beside this block.
    """

    def __init__(self, context: Any, router: Any, identity: WorkerIdentity) -> None:
        super().__init__("workers", context)
        self.router = router
        self.identity = identity
        self.directory = os.path.join(context.state_dir, "workers")
        self.others: dict[str, dict] = {}
        self._loop: Optional[LoopingCall] = None

    def path_for(self, index: int) -> str:
        """The snapshot file of worker ``index``."""
        return os.path.join(self.directory, f"worker-{index}.json")

    def startService(self) -> None:
        """Write a first snapshot now, then every SNAPSHOT_INTERVAL seconds."""
        super().startService()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.context.reactor
        self._loop.start(SNAPSHOT_INTERVAL, now=True).addErrback(
            lambda f: log.failure("worker figures failed", f))

    def stopService(self) -> Any:
        """Stop writing."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def tick(self) -> defer.Deferred:
        """Write this worker's figures; in worker 0 also read the others'."""
        stats = {k: v for k, v in self.router.get_stats().items() if k != "workers"}
        data = json.dumps({"pid": os.getpid(), "time": time.time(), "stats": stats},
                          default=str).encode("utf-8")
        d: defer.Deferred = threads.deferToThread(self._write, data)
        if self.identity.index == 0:
            d.addCallback(lambda _: threads.deferToThread(self._read_others))
            d.addCallback(self._keep)
        d.addErrback(lambda f: log.warn("worker figures not exchanged: {error}",
                                        error=f.getErrorMessage()))
        return d

    def _write(self, data: bytes) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = self.path_for(self.identity.index)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _read_others(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for index in range(1, self.identity.count):
            try:
                with open(self.path_for(index), "rb") as f:
                    out[str(index)] = json.loads(f.read())
            except (OSError, ValueError):
                continue
        return out

    def _keep(self, others: dict[str, dict]) -> None:
        self.others = others

    def get_stats(self) -> dict:
        """The other workers' latest figures, with their age in seconds."""
        now = time.time()
        workers: dict[str, Any] = {}
        for index, snapshot in self.others.items():
            entry = {"pid": snapshot.get("pid"), "age": round(now - snapshot.get("time", now), 1)}
            entry.update(snapshot.get("stats", {}))
            workers[index] = entry
        return {"count": self.identity.count, "index": self.identity.index, "workers": workers}


class LinkNotifier(Notifier):
    """A worker's readiness, told to its master: ``ready`` once, then ``reloaded``."""

    def __init__(self, link: "MasterLink") -> None:
        self.link = link
        self._told = False

    def ready(self, status: str = "") -> None:
        """First time: ready; after that: the end of a reload."""
        self.link.send("reloaded" if self._told else "ready")
        self._told = True


class MasterLink(protocol.Protocol):
    """The worker's end of its pipes to the master (stdin from it, fd 3 to it).

    End-of-file on stdin means the master is gone: the worker stops gracefully.
    """

    def __init__(self, reactor: Any, router: Any) -> None:
        self.reactor = reactor
        self.router = router

    def send(self, word: str) -> None:
        """Tell the master something ('ready', 'reload-all')."""
        if self.transport is not None:
            self.transport.write(word.encode("ascii") + b"\n")

    def dataReceived(self, data: bytes) -> None:
        """The master sends nothing today."""

    def connectionLost(self, reason: Any = None) -> None:
        """The master went away: stop."""
        if self.reactor.running and not getattr(self.router, "_stopping", False):
            log.warn("the master process went away; stopping")
            self.reactor.stop()


def run_worker(config_path: str, index: int, count: int) -> int:
    """Run worker ``index`` of ``count`` until stopped; returns the exit status."""
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner

    from dcrouter.daemon import make_daemon
    # a reload forwarded while this worker is still starting must not kill it (the default
    # action of SIGHUP); the router installs its own handler once it runs
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        options = load_config(config_path)
    except ConfigError as e:
        sys.stderr.write(f"dcrouter worker {index}: configuration error: {e}\n")
        return 2
    ListenerSet.reuse_port = True
    POOL.inherit(os.environ.pop(INHERIT_ENV, ""))  # the master's sockets
    link = MasterLink(reactor, None)
    router = make_daemon(options, config_path=config_path, exit_on_error=True,
                         worker=WorkerIdentity(index, count), notifier=LinkNotifier(link))
    link.router = router
    globalLogBeginner.beginLoggingTo(
        [TaggedObserver(router.log_observer, f"worker-{index}", index)],
        redirectStandardIO=False)
    figures = WorkerStats(router.context, router, WorkerIdentity(index, count))
    figures.setServiceParent(router)
    if index == 0:
        router.context.services["workers"] = figures  # reported by the API beside the others

    def start() -> None:
        stdio.StandardIO(link, stdin=0, stdout=READY_FD,  # type: ignore[call-arg]
                         reactor=reactor)
        router.startService()
        router.peer_reload = lambda: link.send("reload-all")
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", router.stopService)
    reactor.run()  # type: ignore[attr-defined]
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dcrouter.workers --config FILE --index I --count N`` (started by the master)."""
    parser = argparse.ArgumentParser(prog="dcrouter.workers",
                                     description="One worker process of a multi-worker "
                                     "dcrouter; started by the master, not by hand.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    return run_worker(args.config, args.index, args.count)


if __name__ == "__main__":
    raise SystemExit(main())
