"""SMTP accept benchmark: messages/s, idle sessions held, peak RSS of a 50 MB message.

Targets (each a separate server process on loopback):

* ``server``  - dcrouter's UnifiedEmailServer with a durable bench handler: each
  message's spool file is moved into a store directory and fsynced (file, then
  the directory; fsyncs of concurrent messages grouped into one batch in a
  thread) before the 250 is sent.
* ``twistd``  - a real ``twistd -n dcrouter`` with a disk queue (``--config``
  from ``bench_config()``); meaningful once the processor and disk queue are in.
* ``twistd-workersN`` - the same with ``router.workers = N``: a master and N
  worker processes sharing the port (SO_REUSEPORT); server CPU counts them all.
* ``aiosmtpd`` - the peer: aiosmtpd whose handler writes each message to its own
  file and fsyncs it (in the default thread pool) before answering 250.

Load: ``--clients`` concurrent sessions (default 50) spread over ``--procs`` client
processes, each sending 10 KB messages in a loop (MAIL, RCPT, DATA, each waiting
for its reply), for ``--seconds`` after a one-second warm-up.

Usage::

    .venv/bin/python bench/smtp_accept.py                      # all of it, ~1 minute
    .venv/bin/python bench/smtp_accept.py --only throughput --targets server,aiosmtpd
    .venv/bin/python bench/smtp_accept.py --only idle --idle 10000
    .venv/bin/python bench/smtp_accept.py --only bigmsg
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def raise_fd_limit() -> int:
    """Raise the soft file descriptor limit to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _own_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``, of its children it has reaped (cutime + cstime: Postfix's
    master reaps smtpd processes that ended after max_use connections) and of its live
    descendants."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    total = sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    for child in _children(pid):
        try:
            total += tree_cpu_seconds(child)
        except (OSError, ValueError, IndexError):
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all threads) and its live child processes
    (the workers of a ``router.workers`` > 1 dcrouter), in seconds."""
    total = _own_cpu_seconds(pid)
    for child in _children(pid):
        try:
            total += _own_cpu_seconds(child)
        except OSError:
            continue
    return total


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- server processes ------------------------------------------------------------------------

def serve_dcrouter(port: int, state_dir: str, max_size: int, durability: str = "parallel") -> None:
    """Run UnifiedEmailServer with the bench handler until killed.

    ``durability``: "parallel" (each message fsynced in a pool thread; concurrent
    fsyncs share journal commits), "group" (one thread fsyncs batches), "none".
    """
    raise_fd_limit()
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import defer, reactor, threads
    reactor.suggestThreadPoolSize(16)  # type: ignore[attr-defined]
    from twisted.logger import (
        FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
        textFileLogObserver,
    )
    # As twistd does with log_level = "warn" (the twistd target's setting): no info events.
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stdout), [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False)
    from zope.interface import implementer

    from dcrouter.config import parse_config
    from dcrouter.email.server import UnifiedEmailServer
    from dcrouter.interfaces import IMessageHandler
    from dcrouter.service import Extensions, RouterContext

    store = os.path.join(state_dir, "store")
    os.makedirs(store, exist_ok=True)

    @implementer(IMessageHandler)
    class DurableHandler:
        """Moves each spool file into ``store`` and fsyncs it (grouped) before answering."""

        def __init__(self) -> None:
            self.pending: list[tuple[str, defer.Deferred]] = []
            self.running = False

        def check_sender(self, session: Any, mail_from: str) -> None:
            return None

        def check_recipient(self, session: Any, mail_from: str, recipient: str) -> None:
            return None

        def handle_message(self, message: Any) -> Any:
            target = os.path.join(store, message.queue_id)
            os.rename(message.spool_path, target)
            if durability == "none":
                os.unlink(target)
                return [message.queue_id]
            if durability == "parallel":
                return threads.deferToThread(self._fsync, [target]).addCallback(
                    lambda _: [message.queue_id])
            d: defer.Deferred = defer.Deferred()
            self.pending.append((target, d))
            if not self.running:
                self._commit()
            return d.addCallback(lambda _: [message.queue_id])

        def _commit(self) -> None:
            batch, self.pending = self.pending, []
            self.running = True
            t = threads.deferToThread(self._fsync, [path for path, _ in batch])

            def done(_: Any) -> None:
                self.running = False
                for _, d in batch:
                    d.callback(None)
                if self.pending:
                    self._commit()

            t.addBoth(done)

        @staticmethod
        def _fsync(paths: list[str]) -> None:
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            dfd = os.open(store, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            for path in paths:  # a benchmark must not fill the disk
                os.unlink(path)

    options = parse_config({"router": {"state_dir": state_dir}, "email": {
        "hostname": "bench.test", "listen": "127.0.0.1", "ports": [port],
        "max_connections": 20000, "max_connections_per_ip": 20000,
        "max_message_size": max_size, "connection_timeout": 600}})
    assert options.email is not None
    context = RouterContext(options, reactor, Extensions())
    server = UnifiedEmailServer(options.email, DurableHandler(), context)
    server.startService()
    reactor.run()  # type: ignore[attr-defined]


def serve_aiosmtpd(port: int, state_dir: str) -> None:
    """aiosmtpd with a handler that writes and fsyncs each message before its 250."""
    raise_fd_limit()
    from aiosmtpd.smtp import SMTP

    store = os.path.join(state_dir, "aiosmtpd")
    os.makedirs(store, exist_ok=True)
    counter = [0]

    def write(data: bytes) -> None:
        counter[0] += 1
        path = os.path.join(store, f"{os.getpid()}-{counter[0]}")
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(path)

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            await asyncio.get_running_loop().run_in_executor(None, write, envelope.content)
            return "250 OK"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: SMTP(Handler(), hostname="bench.test"),
                                       "127.0.0.1", port, backlog=1024)
        async with srv:
            await srv.serve_forever()

    asyncio.run(main())


def bench_config(port: int, state_dir: str, deliver: bool = True) -> str:
    """A TOML configuration for ``twistd -n dcrouter``: one SMTP port, disk queue.

    ``deliver=False`` sets the queue's check interval to an hour, so (beyond what
    the queue hands over at once) delivery does not compete with accepting.
    """
    interval = "" if deliver else "check_interval = 3600.0"
    return f"""
[router]
state_dir = "{state_dir}"
log_format = "text"
log_level = "warn"

[email]
hostname = "bench.test"
listen = "127.0.0.1"
ports = [{port}]
submission_ports = []
implicit_tls_ports = []
max_connections = 20000
max_connections_per_ip = 20000
default_mode = "mta"

[email.queue]
storage_type = "disk"
persistent_path = "{state_dir}/queue"
{interval}

[[email.domain_rules]]
pattern = "*@bench.test"
mode = "mta"
mta_options = {{ allow_local_delivery = true, local_delivery_path = "{state_dir}/mail" }}
"""


class Target:
    """A started server process."""

    def __init__(self, name: str, max_size: int = 52428800) -> None:
        self.name = name
        durability = "parallel"
        if name.startswith("server-"):
            name, durability = "server", name.split("-", 1)[1]
        self.port = free_port()
        self.state = tempfile.mkdtemp(prefix=f"bench-{name}-")
        env = dict(os.environ, PYTHONPATH=REPO)
        me = os.path.abspath(__file__)
        if name == "server":
            args = [sys.executable, me, "serve", "--port", str(self.port), "--state",
                    self.state, "--max-size", str(max_size), "--durability", durability]
        elif name == "aiosmtpd":
            args = [sys.executable, me, "serve-aiosmtpd", "--port", str(self.port), "--state",
                    self.state]
        elif name in ("twistd", "twistd-nodeliver") or name.startswith("twistd-workers"):
            cfg = os.path.join(self.state, "dcrouter.toml")
            workers = int(name[len("twistd-workers"):]) if name.startswith("twistd-workers") \
                else 1
            with open(cfg, "w") as f:
                f.write(bench_config(self.port, self.state, deliver=name != "twistd-nodeliver")
                        .replace('log_level = "warn"', f'log_level = "warn"\nworkers = {workers}'))
            args = [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=",
                    "dcrouter", "--config", cfg]
        else:
            raise ValueError(name)
        self.log = open(os.path.join(self.state, "out.log"), "wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.state)
        wait_port(self.port)
        if name.startswith("twistd-workers"):
            time.sleep(2.0)  # worker 0 answers first; the others start once it is ready

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.state, ignore_errors=True)


# -- load generator --------------------------------------------------------------------------------

#: Set by --pipelining (inherited by the forked client processes).
PIPELINING = False


def make_message(size: int = 10 * 1024) -> bytes:
    head = (b"From: bench@bench.test\r\nTo: rcpt@bench.test\r\nSubject: bench\r\n"
            b"Message-ID: <bench@bench.test>\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopq\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return (head + body)[:size - 2] + b"\r\n"


async def _client(port: int, stop_at: float, start_count: float, counts: list[int],
                  errors: list[str]) -> None:
    message = make_message() + b".\r\n"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        errors.append(str(e))
        return

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return line

    try:
        await reply()
        writer.write(b"EHLO client.bench\r\n")
        await reply()
        envelope = (b"MAIL FROM:<bench@bench.test>\r\n", b"RCPT TO:<rcpt@bench.test>\r\n",
                    b"DATA\r\n")
        while time.monotonic() < stop_at:
            if PIPELINING:  # RFC 2920: the envelope in one write, then the replies
                writer.write(b"".join(envelope))
            for cmd in envelope:
                if not PIPELINING:
                    writer.write(cmd)
                r = await reply()
                if r[:1] not in (b"2", b"3"):
                    raise ConnectionError(r.decode(errors="replace").strip())
            writer.write(message)
            r = await reply()
            if not r.startswith(b"250"):
                raise ConnectionError(r.decode(errors="replace").strip())
            if time.monotonic() >= start_count:
                counts[0] += 1
        writer.write(b"QUIT\r\n")
        writer.close()
    except (ConnectionError, OSError) as e:
        if len(errors) < 5:
            errors.append(str(e))


def _load_proc(port: int, clients: int, warmup: float, seconds: float, start: float,
               queue: Any) -> None:
    async def main() -> tuple[int, list[str]]:
        counts, errors = [0], []
        now = time.monotonic()
        # all processes share ``start`` (a wall-clock instant) to align their windows
        delay = max(0.0, start - time.time())
        begin = now + delay
        await asyncio.sleep(delay)
        await asyncio.gather(*[_client(port, begin + warmup + seconds, begin + warmup, counts,
                                       errors) for _ in range(clients)])
        return counts[0], errors

    queue.put(asyncio.run(main()))


def throughput(target: Target, clients: int, procs: int,
               seconds: float) -> tuple[float, float, list]:
    """Messages/s accepted during ``seconds`` (after a 1 s warm-up), and server CPU ms/message."""
    queue: Any = multiprocessing.Queue()
    start = time.time() + 0.5
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    workers = [multiprocessing.Process(target=_load_proc,
                                       args=(target.port, n, 1.0, seconds, start, queue))
               for n in per]
    for w in workers:
        w.start()
    time.sleep(max(0.0, start - time.time()) + 1.0)
    cpu_start = cpu_seconds(target.proc.pid)
    time.sleep(seconds)
    cpu_used = cpu_seconds(target.proc.pid) - cpu_start
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join()
    total = sum(r[0] for r in results)
    errors = [e for r in results for e in r[1]]
    return total / seconds, (cpu_used * 1000 / total if total else 0.0), errors


# -- idle sessions and big messages ------------------------------------------------------------------

def idle_sessions(target: Target, count: int) -> dict[str, Any]:
    """Open ``count`` sessions, wait for every greeting, report the server's RSS."""
    before = proc_status(target.proc.pid)["VmRSS"]
    socks = []
    started = time.monotonic()
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", target.port), timeout=30)
            socks.append(s)
        greeted = 0
        for s in socks:
            if s.recv(200).startswith(b"220"):
                greeted += 1
        elapsed = time.monotonic() - started
        time.sleep(0.5)
        after = proc_status(target.proc.pid)["VmRSS"]
        # every session still answers
        alive = 0
        for s in socks[:: max(1, count // 200)]:
            s.sendall(b"NOOP\r\n")
            if s.recv(200).startswith(b"250"):
                alive += 1
    finally:
        for s in socks:
            s.close()
    return {"sessions": count, "greeted": greeted, "seconds_to_open": round(elapsed, 1),
            "rss_before_mib": round(before / 1024, 1), "rss_after_mib": round(after / 1024, 1),
            "kib_per_session": round((after - before) / count, 1),
            "sampled_alive": alive}


def big_message(target: Target, size: int) -> dict[str, Any]:
    """Send one ``size``-byte message; report the server's peak RSS growth."""
    try:  # reset the peak (VmHWM) to the current RSS, so the peak is this message's
        with open(f"/proc/{target.proc.pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = proc_status(target.proc.pid)
    line = b"z" * 998 + b"\r\n"
    chunk = line * 64
    with socket.create_connection(("127.0.0.1", target.port), timeout=120) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            while True:
                r = f.readline()
                if r[3:4] != b"-":
                    return r

        reply()
        for cmd in (b"EHLO big.test\r\n", b"MAIL FROM:<a@bench.test>\r\n",
                    b"RCPT TO:<b@bench.test>\r\n", b"DATA\r\n"):
            s.sendall(cmd)
            reply()
        started = time.monotonic()
        sent = 0
        while sent < size:
            s.sendall(chunk)
            sent += len(chunk)
        s.sendall(b".\r\n")
        r = reply()
        elapsed = time.monotonic() - started
    after = proc_status(target.proc.pid)
    return {"bytes": sent, "reply": r.decode().strip()[:40], "seconds": round(elapsed, 2),
            "rss_before_mib": round(before["VmRSS"] / 1024, 1),
            "hwm_before_mib": round(before["VmHWM"] / 1024, 1),
            "peak_rss_growth_mib": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1)}


# -- main ---------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--state", required=True)
    serve.add_argument("--max-size", type=int, default=52428800)
    serve.add_argument("--durability", choices=["parallel", "group", "none"], default="parallel")
    serve_aio = sub.add_parser("serve-aiosmtpd")
    serve_aio.add_argument("--port", type=int, required=True)
    serve_aio.add_argument("--state", required=True)
    parser.add_argument("--targets", default="server,aiosmtpd",
                        help="comma list of server (= server-parallel), server-group, "
                        "server-none (no fsync: the accept ceiling), twistd, twistd-nodeliver "
                        "(queue check interval 1 h), twistd-workersN (router.workers = N), "
                        "aiosmtpd")
    parser.add_argument("--only", choices=["throughput", "idle", "bigmsg"], default=None)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pipelining", action="store_true",
                        help="clients send MAIL, RCPT and DATA in one write")
    parser.add_argument("--idle", type=int, default=10000)
    parser.add_argument("--big", type=int, default=50 * 1024 * 1024)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve_dcrouter(args.port, args.state, args.max_size, args.durability)
        return
    if args.command == "serve-aiosmtpd":
        serve_aiosmtpd(args.port, args.state)
        return
    global PIPELINING
    PIPELINING = args.pipelining
    limit = raise_fd_limit()
    print(f"cores: {os.cpu_count()}, fd limit: {limit}, python {sys.version.split()[0]}")
    targets = args.targets.split(",")
    if args.only in (None, "throughput"):
        print(f"\n## throughput: {args.clients} clients in {args.procs} processes, 10 KB "
              f"messages, {args.seconds:.0f} s per round, {args.rounds} rounds (interleaved)"
              f"{', pipelining' if args.pipelining else ''}")
        results: dict[str, list[float]] = {t: [] for t in targets}
        cpu: dict[str, list[float]] = {t: [] for t in targets}
        for _ in range(args.rounds):
            for name in targets:
                target = Target(name)
                try:
                    rate, ms, errors = throughput(target, args.clients, args.procs, args.seconds)
                finally:
                    target.stop()
                results[name].append(rate)
                cpu[name].append(ms)
                print(f"{name:15s} {rate:8.0f} msg/s  server CPU {ms:.3f} ms/msg" +
                      (f"  errors: {errors[:2]}" if errors else ""), flush=True)
        for name, rates in results.items():
            print(f"{name:15s} best {max(rates):.0f} msg/s, mean {sum(rates) / len(rates):.0f}; "
                  f"server CPU per message: best {min(cpu[name]):.3f} ms "
                  f"(= {1000 / min(cpu[name]) if min(cpu[name]) else 0:.0f} msg per CPU-second)")
    if args.only in (None, "idle"):
        count = min(args.idle, limit - 200)
        print(f"\n## idle sessions: {count}")
        target = Target("server")
        try:
            print(idle_sessions(target, count))
        finally:
            target.stop()
    if args.only in (None, "bigmsg"):
        print(f"\n## one {args.big / 1048576:.0f} MiB message (limit 60 MiB)")
        target = Target("server", max_size=60 * 1024 * 1024)
        try:
            print(big_message(target, args.big))
        finally:
            target.stop()


if __name__ == "__main__":
    main()
