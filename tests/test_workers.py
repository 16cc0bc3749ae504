"""Multi-worker mode: a real twistd master, real worker processes, real clients.

Workers log JSON lines tagged with ``worker`` and ``pid``, so which process
served a connection is read from the shared output.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from typing import Optional

import dns.message
import dns.query
import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol

from dcrouter.queue.disk import DiskStore
from dcrouter.message import Destination, Route
from dcrouter.queue.item import QueueItem, RecipientState
from dcrouter.queue.shards import shard_layout, sharded_store
from tests.delivery.peers import Sink
from tests.support.configs import default_config_with_free_ports, write_config
from tests.support.net import free_port, wait_for_tcp
from tests.support.proc import TwistdProcess, twistd_env, wait_until


def _events(proc: TwistdProcess) -> list[dict]:
    out = []
    for line in proc.output().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _ready_pids(proc: TwistdProcess) -> dict[int, list[int]]:
    """{worker index: [pid of each start, oldest first]} from the master's log."""
    pids: dict[int, list[int]] = {}
    for e in _events(proc):
        if e.get("message", "").endswith(") ready") and "worker_pid" in e:
            pids.setdefault(e["index"], []).append(e["worker_pid"])
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _start(tmp_path, workers: int = 2, edit=None) -> tuple[TwistdProcess, dict[str, int]]:
    data, ports = default_config_with_free_ports(str(tmp_path / "var"))
    data["router"]["workers"] = workers
    data["router"]["log_format"] = "json"
    data["router"]["shutdown_timeout"] = 5
    if edit is not None:
        edit(data)
    write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config="dcrouter.toml")
    try:
        wait_until(lambda: len(_ready_pids(proc)) == workers or proc.proc.poll() is not None,
                   timeout=30)
        wait_for_tcp(ports["smtp"], timeout=10)
    except TimeoutError:
        proc.kill()
        raise AssertionError(proc.output())
    assert proc.proc.poll() is None, proc.output()
    return proc, ports


def _send(port: int, rcpt: str, n: int) -> None:
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail("me@localhost", [rcpt], f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode())


class _Backend(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "7")
        self.end_headers()
        self.wfile.write(b"backend")

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass


def test_two_workers_share_smtp_dns_and_stop_cleanly(tmp_path):
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()

    def to_backend(data):
        data["proxy"]["routes"][1]["targets"] = [f"127.0.0.1:{backend.server_address[1]}"]
    proc, ports = _start(tmp_path, edit=to_backend)
    try:
        # the proxy on its shared port, through both workers
        for _ in range(10):
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/", timeout=10) as r:
                assert r.read() == b"backend"
        pids = {i: p[-1] for i, p in _ready_pids(proc).items()}
        assert sorted(pids) == [0, 1] and pids[0] != pids[1] != proc.proc.pid
        _send(ports["smtp"], "alice@localhost", 24)
        maildir = tmp_path / "var" / "mail" / "alice" / "new"
        wait_until(lambda: maildir.exists() and len(os.listdir(maildir)) == 24, timeout=20)
        served = {e["pid"] for e in _events(proc)
                  if e.get("message", "").startswith("connection from")}
        assert served == set(pids.values()), served
        # each worker queued into its own shard of the disk queue
        queue = tmp_path / "var" / "queue"
        assert {"worker-0", "worker-1"} <= set(os.listdir(queue))
        # DNS over UDP and TCP on the shared port
        query = dns.message.make_query("dcrouter.test.", "A")
        for _ in range(6):
            reply = dns.query.udp(query, "127.0.0.1", port=ports["dns"], timeout=5)
            assert reply.answer and reply.answer[0].to_text().endswith("127.0.0.1")
        assert dns.query.tcp(query, "127.0.0.1", port=ports["dns"], timeout=5).answer
        # the API runs in worker 0 and says so
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['api']}/api/stats",
                                    timeout=10) as r:
            stats = json.loads(r.read())
        assert stats["worker"] == {"index": 0, "count": 2, "pid": pids[0]}
        # the queue listing says it covers worker 0's shard only, and dcrouterctl repeats it
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['api']}/api/queue",
                                    timeout=10) as r:
            assert json.loads(r.read())["scope"]["workers"] == 2
        env = dict(twistd_env(), DCROUTER_API_URL=f"http://127.0.0.1:{ports['api']}")
        env.pop("DCROUTER_API_TOKEN", None)
        listed = subprocess.run([os.path.join(os.path.dirname(sys.executable), "dcrouterctl"),
                                 "queue", "list"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert "worker 0's queue shard only; the other 1 workers" in listed.stdout
        # ... and reports worker 1's figures beside its own (snapshots, a few seconds old)
        connections = {e["pid"]: 0 for e in _events(proc)}
        for e in _events(proc):
            if e.get("message", "").startswith("connection from"):
                connections[e["pid"]] += 1

        def worker_1_figures() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['api']}/api/stats",
                                        timeout=10) as r:
                return json.loads(r.read())["workers"]["workers"].get("1", {})
        wait_until(lambda: worker_1_figures().get("email", {}).get("server", {})
                   .get("connections_total") == connections[pids[1]], timeout=10)
        assert worker_1_figures()["pid"] == pids[1]
        assert stats["email"]["server"]["connections_total"] == connections[pids[0]]
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['api']}/metrics",
                                    timeout=10) as r:
            metrics = r.read().decode()
        assert (f'dcrouter_service_stat{{key="workers.1.email.server.connections_total",'
                f'service="workers"}} {connections[pids[1]]}.0') in metrics
        # implicit TLS and STARTTLS on the shared ports, both workers
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        for _ in range(16):  # 16 connections: all on one worker has odds of 1 in 32,768
            with smtplib.SMTP_SSL("127.0.0.1", ports["smtps"], timeout=10, context=ctx) as smtp:
                assert smtp.ehlo("client.test")[0] == 250
            with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as smtp:
                smtp.starttls(context=ctx)
                assert smtp.ehlo("client.test")[0] == 250
        tls_served = {e["pid"] for e in _events(proc)
                      if e.get("message", "").startswith("connection from")
                      and e.get("local_port") == ports["smtps"]}
        assert tls_served == set(pids.values()), tls_served
        # a rule added through worker 0's API reaches worker 1 too (saved, then reloaded there)
        mail2 = tmp_path / "var" / "mail2"
        rule = {"pattern": "*@api.test", "mode": "mta",
                "mta_options": {"allow_local_delivery": True, "local_delivery_path": str(mail2)}}
        request = urllib.request.Request(f"http://127.0.0.1:{ports['api']}/api/email/rules",
                                         data=json.dumps(rule).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 201
        wait_until(lambda: any(e.get("pid") == pids[1] and
                               e.get("message", "").startswith("configuration applied")
                               for e in _events(proc)), timeout=10)
        _send(ports["smtp"], "carol@api.test", 12)
        inbox = mail2 / "carol" / "new"
        wait_until(lambda: inbox.exists() and len(os.listdir(inbox)) == 12, timeout=20)
    finally:
        status = proc.stop()
        backend.shutdown()
    assert status == 0, proc.output()
    wait_until(lambda: not any(_alive(p) for p in pids.values()), timeout=10)
    assert "Traceback" not in proc.output()


def test_killed_worker_is_respawned_and_delivers_its_shard(tmp_path):
    sink_port = free_port()

    def forward_to_sink(data):
        data["email"]["domain_rules"].insert(0, {
            "pattern": "*@relay.test", "mode": "forward",
            "target": {"server": "127.0.0.1", "port": sink_port, "use_tls": False}})
        data["email"]["queue"].update(base_retry_delay=1, max_retry_delay=1, max_retries=100,
                                      check_interval=0.2)
    proc, ports = _start(tmp_path, edit=forward_to_sink)
    sink = Sink(port=sink_port)
    try:
        old = {i: p[-1] for i, p in _ready_pids(proc).items()}
        _send(ports["smtp"], "bob@relay.test", 16)  # the sink is down: everything waits

        def queued_by(pid: int) -> int:
            return sum(1 for e in _events(proc)
                       if e.get("pid") == pid and e.get("message", "").startswith("queued "))
        wait_until(lambda: queued_by(old[0]) + queued_by(old[1]) == 16, timeout=20)
        in_shard_1 = queued_by(old[1])
        assert in_shard_1 > 0
        os.kill(old[1], signal.SIGKILL)
        wait_until(lambda: len(_ready_pids(proc).get(1, [])) == 2, timeout=20)
        new = _ready_pids(proc)[1][-1]
        assert new != old[1] and _alive(new)
        died = [e for e in _events(proc) if e.get("event") == "worker.died"]
        assert died and died[0]["signal"] == signal.SIGKILL and died[0]["index"] == 1
        recovered = [e for e in _events(proc) if e.get("pid") == new and
                     "items recovered" in e.get("message", "")]
        assert recovered and recovered[0]["count"] == in_shard_1
        sink.start()
        wait_until(lambda: len(sink.messages) == 16, timeout=20)

        def delivered_by(pid: int) -> int:  # logged once the sink's 250 is back
            return sum(1 for e in _events(proc) if e.get("pid") == pid and
                       e.get("message", "").startswith("delivered "))
        wait_until(lambda: delivered_by(new) + delivered_by(old[0]) == 16, timeout=10)
        assert delivered_by(new) == in_shard_1
    finally:
        status = proc.stop()
        sink.stop()
    assert status == 0, proc.output()


def test_sighup_reloads_every_worker_and_a_stopped_worker_comes_back(tmp_path):
    proc, ports = _start(tmp_path)
    try:
        pids = {i: p[-1] for i, p in _ready_pids(proc).items()}

        def applied(pid: int) -> int:
            return sum(1 for e in _events(proc) if e.get("pid") == pid and
                       e.get("message", "").startswith("configuration applied"))
        config = tmp_path / "dcrouter.toml"
        text = config.read_text().replace("workers = 2", "workers = 3")
        config.write_text(text.replace('hostname = "localhost"', 'hostname = "reloaded.test"'))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: applied(pids[0]) == 1 and applied(pids[1]) == 1, timeout=15)
        assert "router.workers changes need a restart" in proc.output()
        for _ in range(6):  # both workers greet with the reloaded hostname
            with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as smtp:
                assert b"reloaded.test" in smtp.ehlo("client.test")[1]
        # a broken file: the master refuses it, workers keep running untouched
        config.write_text(text.replace("[email]", "[email]\nports = [99999]", 1))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in proc.output(), timeout=10)
        # SIGTERM to one worker: it stops gracefully and the master starts it again; while the
        # file is broken the new worker cannot start and is retried, the other one serves
        os.kill(pids[1], signal.SIGTERM)

        def deaths(status: int) -> int:
            return sum(1 for e in _events(proc) if e.get("event") == "worker.died"
                       and e.get("index") == 1 and e.get("exit_status") == status)
        wait_until(lambda: deaths(0) == 1 and deaths(2) >= 1, timeout=20)
        assert proc.proc.poll() is None and _alive(pids[0])
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as smtp:
            assert smtp.noop()[0] == 250
        config.write_text(text)
        wait_until(lambda: len(_ready_pids(proc).get(1, [])) == 2, timeout=20)
        assert _alive(pids[0]) and not _alive(pids[1])
    finally:
        status = proc.stop()
    assert status == 0, proc.output()
    assert applied(pids[0]) == 1  # the broken file reached no worker


def test_sigterm_lets_each_worker_finish_its_open_transactions(tmp_path):
    proc, ports = _start(tmp_path)
    sessions = []
    try:
        for i in range(14):  # spread over both workers, each left in the middle of DATA
            smtp = smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=20)
            smtp.ehlo("client.test")
            assert smtp.mail("me@localhost")[0] == 250
            assert smtp.rcpt("dave@localhost")[0] == 250
            smtp.putcmd("DATA")
            assert smtp.getreply()[0] == 354
            smtp.send(f"Subject: in flight {i}\r\n\r\nfirst half\r\n".encode())
            sessions.append(smtp)
        pids = {e["pid"] for e in _events(proc)
                if e.get("message", "").startswith("connection from")}
        assert len(pids) == 2, pids
        proc.signal(signal.SIGTERM)
        wait_until(lambda: "stopping the workers gracefully" in proc.output(), timeout=10)
        for smtp in sessions:
            smtp.send(b"second half\r\n.\r\n")
            code, reply = smtp.getreply()
            assert code == 250 and b"queued as" in reply
            smtp.close()
        assert proc.wait(20) == 0, proc.output()
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert not any(_alive(p) for p in pids)


def test_workers_share_a_redis_queue_and_its_rate_limits(tmp_path):
    from tests.email.peers import start_redis
    redis = start_redis(str(tmp_path))

    def on_redis(data):
        data["email"]["queue"].update(storage_type="redis",
                                      redis_url=f"redis://127.0.0.1:{redis.port}/0")
        data["email"]["domain_rules"][0]["rate_limits"] = {"max_messages_per_minute": 10}
    proc, ports = _start(tmp_path, edit=on_redis)
    try:
        codes = []
        for i in range(20):
            with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.mail("me@localhost")
                code = smtp.rcpt("erin@localhost")[0]  # the rule's limit answers at RCPT
                if code == 250:
                    code = smtp.data(f"Subject: r{i}\r\n\r\nhi\r\n".encode())[0]
                codes.append(code)
        served = {e["pid"] for e in _events(proc)
                  if e.get("message", "").startswith("connection from")}
        assert len(served) == 2
        # one budget of 10 a minute for the rule, shared by both workers through Redis
        assert codes.count(250) == 10 and set(codes) == {250, 451}, codes
        maildir = tmp_path / "var" / "mail" / "erin" / "new"
        wait_until(lambda: maildir.exists() and len(os.listdir(maildir)) == 10, timeout=20)
        assert not (tmp_path / "var" / "queue").exists()  # no disk shards with Redis
    finally:
        status = proc.stop()
        redis.stop()
    assert status == 0, proc.output()


def test_master_that_cannot_bind_stops_before_any_worker(tmp_path):
    data, ports = default_config_with_free_ports(str(tmp_path / "var"))
    data["router"]["workers"] = 2
    write_config(str(tmp_path / "dcrouter.toml"), data)
    with socket.socket() as taken:  # the master binds every port once, for the workers
        taken.bind(("127.0.0.1", ports["smtp"]))
        taken.listen()
        proc = TwistdProcess(str(tmp_path), config="dcrouter.toml")
        status = proc.wait(30)
    out = proc.output()
    assert status == 1, out
    assert f"dcrouter: email.ports[0]: cannot listen on 127.0.0.1:{ports['smtp']}: " \
        "Address already in use" in out, out
    assert "worker 0 started" not in out and "Traceback" not in out, out


def test_master_killed_takes_its_workers_along(tmp_path):
    proc, _ = _start(tmp_path)
    pids = [p[-1] for p in _ready_pids(proc).values()]
    proc.kill()  # SIGKILL: no chance to stop them; their stdin pipe closes
    wait_until(lambda: not any(_alive(p) for p in pids), timeout=15)


# -- the master's decisions (in-process, a fake process reactor) -------------------------------

class _FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, sig: str) -> None:  # noqa: N802 (Twisted's name)
        self.signals.append(sig)


class _ProcessClock(Clock):
    """A clock that records spawnProcess calls instead of starting processes."""

    running = True

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[int, object]] = []
        self.stopped = False

    def spawnProcess(self, proto, executable, args, env, path, childFDs):  # type: ignore
        proto.makeConnection(_FakeTransport(1000 + len(self.spawned)))
        self.spawned.append((int(args[args.index("--index") + 1]), proto))

    def callWhenRunning(self, f, *a, **kw):  # type: ignore[no-untyped-def]
        pass

    def stop(self) -> None:
        self.stopped = True


class _Exit(Exception):
    def __init__(self, code: Optional[int] = None, sig: Optional[int] = None) -> None:
        self.exitCode, self.signal = code, sig


def _master(tmp_path, workers: int = 3):  # type: ignore[no-untyped-def]
    from dcrouter.config import parse_config
    from dcrouter.workers import WorkerMaster
    options = parse_config({"router": {"workers": workers, "state_dir": str(tmp_path)}})
    clock = _ProcessClock()
    master = WorkerMaster(options, str(tmp_path / "x.toml"), reactor=clock, exit_on_error=False)
    master.startService()
    return master, clock


def _ready(proto) -> None:  # type: ignore[no-untyped-def]
    proto.childDataReceived(3, b"ready\n")


def _die(proto, code: Optional[int] = None, sig: Optional[int] = None) -> None:  # type: ignore
    proto.processEnded(Failure(_Exit(code, sig)))


def test_master_starts_worker_0_first_then_the_others(tmp_path):
    master, clock = _master(tmp_path)
    assert [i for i, _ in clock.spawned] == [0]
    _ready(clock.spawned[0][1])
    assert [i for i, _ in clock.spawned] == [0, 1, 2]
    for _, proto in clock.spawned[1:]:
        _ready(proto)
    assert master.started


def test_master_restarts_with_back_off_and_resets_it(tmp_path):
    master, clock = _master(tmp_path)
    _ready(clock.spawned[0][1])
    for _, proto in clock.spawned[1:]:
        _ready(proto)
    delays = []
    for _ in range(3):  # worker 2 keeps dying at once
        _die(master.workers[2], sig=9)
        delays.append(master.backoff[2])
        assert 2 not in master.workers
        # worker 0 being ready again must not start worker 2 early
        master.worker_ready(master.workers[0])
        assert 2 not in master.workers
        clock.advance(delays[-1])
        _ready(master.workers[2])
    assert delays == [0.5, 1.0, 2.0]
    clock.advance(61)  # a worker that ran a minute starts over at the first delay
    _die(master.workers[2], code=1)
    assert master.backoff[2] == 0.5 and master.restarts == 4
    assert len([i for i, _ in clock.spawned if i == 2]) == 4


def test_master_gives_up_when_a_worker_fails_during_the_first_start(tmp_path):
    master, clock = _master(tmp_path)
    _die(clock.spawned[0][1], code=1)
    assert clock.stopped and master.exit_code == 1


def test_master_forwards_sighup_to_ready_workers_and_later_to_starting_ones(tmp_path):
    (tmp_path / "x.toml").write_text("[router]\nworkers = 3\n")
    master, clock = _master(tmp_path)
    _ready(clock.spawned[0][1])
    _ready(clock.spawned[1][1])
    assert master.reload() is True
    sent = {i: p.transport.signals for i, p in clock.spawned}
    assert sent == {0: ["HUP"], 1: ["HUP"], 2: []}
    _ready(clock.spawned[2][1])
    assert sent[2] == ["HUP"]
    clock.spawned[0][1].childDataReceived(3, b"reload-all\n")  # an API reload in worker 0
    assert sent == {0: ["HUP"], 1: ["HUP", "HUP"], 2: ["HUP", "HUP"]}
    (tmp_path / "x.toml").write_text("[router]\nworkers = -1\n")
    assert master.reload() is False


# -- SO_REUSEPORT listeners (in-process: two ListenerSets stand for two workers) ------------

class _Hello(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(self.factory.word)  # type: ignore[attr-defined]
        self.transport.loseConnection()


class _Echo(DatagramProtocol):
    def __init__(self, word: bytes) -> None:
        self.word = word

    def datagramReceived(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
        self.transport.write(self.word, addr)


def _hello_factory(word: bytes) -> Factory:
    factory = Factory.forProtocol(_Hello)
    factory.word = word  # type: ignore[attr-defined]
    return factory


@pytest_twisted.inlineCallbacks
def test_reuse_port_listener_sets_share_tcp_tls_and_udp_ports(tmp_path, monkeypatch):
    from twisted.internet import reactor
    from dcrouter.service import ListenerSet, ListenSpec
    from dcrouter.tlsutil import server_context_factory
    monkeypatch.setattr(ListenerSet, "reuse_port", True)
    tcp, tls, udp = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    v6 = free_port(host="::1")
    specs = [ListenSpec("tcp", "127.0.0.1", tcp, "t"),
             ListenSpec("tcp", "127.0.0.1", tls, "s", True),
             ListenSpec("udp", "127.0.0.1", udp, "u"), ListenSpec("tcp", "::1", v6, "v")]
    context = server_context_factory(str(tmp_path), "localhost")
    sets = []
    for word in (b"A", b"B"):
        echo = _Echo(word)
        factory = _hello_factory(word)
        listeners = ListenerSet(reactor, lambda spec, f=factory, e=echo:
                                e if spec.protocol == "udp" else f, lambda spec: context)
        listeners.start(specs)
        sets.append(listeners)
    try:
        assert sorted(p for _, _, p in sets[0].addresses()) == sorted([tcp, tls, udp, v6])

        def clients() -> dict[str, set[bytes]]:
            seen: dict[str, set[bytes]] = {"tcp": set(), "tls": set(), "udp": set(), "v6": set()}
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            for _ in range(24):
                with socket.create_connection(("127.0.0.1", tcp), timeout=5) as c:
                    seen["tcp"].add(c.recv(1))
                with socket.create_connection(("::1", v6), timeout=5) as c:
                    seen["v6"].add(c.recv(1))
                with ctx.wrap_socket(socket.create_connection(("127.0.0.1", tls), timeout=5),
                                     server_hostname="localhost") as c:
                    seen["tls"].add(c.recv(1))
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.settimeout(5)
                    u.sendto(b"?", ("127.0.0.1", udp))
                    seen["udp"].add(u.recvfrom(10)[0])
            return seen
        seen = yield threads.deferToThread(clients)
        assert seen == {k: {b"A", b"B"} for k in seen}, seen
    finally:
        for listeners in sets:
            yield listeners.stop()


def test_workers_option(tmp_path):
    from dcrouter.config import parse_config
    from dcrouter.errors import ConfigError
    assert parse_config({"router": {"workers": 0}}).router.effective_workers == os.cpu_count()
    assert parse_config({}).router.effective_workers == 1
    with pytest.raises(ConfigError) as e:
        parse_config({"router": {"workers": 1000}})
    assert e.value.path == "router.workers"


# -- shards (real disk, in-process) ----------------------------------------------------------

def _item(i: int) -> QueueItem:
    return QueueItem(id=f"item{i:04d}", mode="mta", rule_pattern="*@x.test",
                     mail_from="a@example.test", recipients=[RecipientState(f"r{i}@x.test")],
                     via=Destination.to(Route(kind="mx")), body_ref=f"body{i:04d}", destination="x.test")


@pytest_twisted.inlineCallbacks
def _fill(root: str, ids: range):
    store = DiskStore(root)
    yield store.open()
    for i in ids:
        body = os.path.join(root, f"in{i}.eml")
        with open(body, "wb") as f:
            f.write(b"Subject: x\r\n\r\nbody %d\r\n" % i)
        yield store.add([_item(i)], body)
    yield store.close()


def test_shard_layout_after_resizing(tmp_path):
    q = str(tmp_path)
    for j in range(5):
        os.makedirs(os.path.join(q, f"worker-{j}"))
    assert shard_layout(q, 0, 2) == (os.path.join(q, "worker-0"),
                                     [os.path.join(q, "worker-2"), os.path.join(q, "worker-4")])
    assert shard_layout(q, 1, 2) == (os.path.join(q, "worker-1"), [os.path.join(q, "worker-3")])
    assert shard_layout(q, 0, 1)[1] == [os.path.join(q, f"worker-{j}") for j in range(5)]
    assert shard_layout(q, 2, 8)[1] == []


@pytest_twisted.inlineCallbacks
def test_shrunk_worker_count_adopts_orphaned_shards(tmp_path):
    q = str(tmp_path / "queue")
    yield _fill(os.path.join(q, "worker-1"), range(0, 3))
    yield _fill(os.path.join(q, "worker-3"), range(3, 7))
    # workers lowered from 4 to 2: worker 1 owns worker-1 and adopts worker-3
    store = sharded_store(q, 1, 2)
    found = yield store.open()
    try:
        assert sorted(i.id for i in found) == [f"item{i:04d}" for i in range(7)]
        assert store.adopted == 4
        assert not os.path.exists(os.path.join(q, "worker-3"))
        body = yield store.read_body(store.items["item0005"])
        assert body.endswith(b"body 5\r\n")
    finally:
        yield store.close()
    # the adopted records are in worker-1's own journal now
    again = DiskStore(os.path.join(q, "worker-1"))
    found = yield again.open()
    yield again.close()
    assert len(found) == 7


@pytest_twisted.inlineCallbacks
def test_one_to_many_and_back(tmp_path):
    q = str(tmp_path / "queue")
    yield _fill(q, range(0, 2))                        # single process, un-sharded
    w0 = sharded_store(q, 0, 2)                       # now two workers: worker 0 adopts it
    found = yield w0.open()
    yield w0.close()
    assert len(found) == 2 and not os.path.exists(os.path.join(q, "journal"))
    single = sharded_store(q, 0, 1)                   # back to one process: adopts worker-0
    found = yield single.open()
    yield single.close()
    assert len(found) == 2 and not os.path.exists(os.path.join(q, "worker-0"))


@pytest_twisted.inlineCallbacks
def test_locked_shard_is_not_adopted(tmp_path):
    q = str(tmp_path / "queue")
    yield _fill(os.path.join(q, "worker-2"), range(0, 1))
    owner = DiskStore(os.path.join(q, "worker-2"))
    yield owner.open()                                # still owned by a live process
    try:
        store = sharded_store(q, 0, 2)
        found = yield store.open()
        yield store.close()
        assert found == [] and os.path.exists(os.path.join(q, "worker-2"))
    finally:
        yield owner.close()


def test_two_workers_generating_one_dkim_key_end_up_with_the_same(tmp_path):
    """Workers share state_dir: the key a second process generates loses to the stored one."""
    from dcrouter.dkimkeys import DkimKeyStore
    first = DkimKeyStore(str(tmp_path)).get("race.test", create=True)
    second_store = DkimKeyStore(str(tmp_path))
    path = second_store.path_for("race.test")
    os.unlink(path)
    # simulate the other worker winning between our existence check and our write
    from dcrouter import dkimkeys
    real = dkimkeys.generate_private_key_pem

    def racing(bits: int = 2048) -> bytes:
        mine = real(bits)
        with open(path, "wb") as f:
            f.write(first.private_pem)
        return mine
    dkimkeys.generate_private_key_pem = racing
    try:
        second = second_store.get("race.test", create=True)
    finally:
        dkimkeys.generate_private_key_pem = real
    assert second.private_pem == first.private_pem
    assert [n for n in os.listdir(os.path.dirname(path)) if ".tmp." in n] == []


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
