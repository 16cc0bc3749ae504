"""Short, renewed and fenced leases on the Redis queue, against a real redis-server.

* In one process, two queues on one Redis: lease times are Redis's clock (a
  claimer with a fast clock takes no live lease), renewals report leases
  another node took, and a node that lost a lease does not acknowledge the
  item (the store refuses too), but takes it back when it claims it again.
* Two ``twistd dcrouter`` processes on one Redis queue, with a short lease:
  node A holds every message in a slow next hop (the sink keeps each session
  in DATA); node B does not take them while A renews its leases (for three
  lease times); then A is killed with SIGKILL and B delivers every message,
  each exactly once, well within the 30 seconds the issue asks for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import threading
import time
from typing import Any

import pytest_twisted
from twisted.internet import reactor, task

from dcrouter.config.queue import QueueOptions
from dcrouter.queue import UnifiedDeliveryQueue
from dcrouter.queue.leases import LOST
from tests.delivery.peers import Sink, SinkHandler
from tests.queue.helpers import request, spool_message
from tests.support.configs import write_config
from tests.support.net import free_port, wait_for_tcp
from tests.support.proc import TwistdProcess, wait_until


def make_queue(tmp_path: Any, url: str, prefix: str, **opts: Any) -> UnifiedDeliveryQueue:
    options = QueueOptions(storage_type="redis", redis_url=url, redis_prefix=prefix, **opts)
    queue = UnifiedDeliveryQueue.from_options(options, str(tmp_path))
    queue.startService()
    return queue


def test_default_leases_let_a_survivor_take_over_within_30_seconds() -> None:
    options = QueueOptions()
    # a dead node's items are free after one lease; the survivor looks every check_interval
    assert options.lease_time + options.check_interval <= 20
    assert options.renew_interval <= options.lease_time / 2  # one missed renewal is fine
    from dcrouter.config import parse_config
    from dcrouter.errors import ConfigError
    try:
        parse_config({"email": {"queue": {"lease_time": 10, "lease_renew_interval": 6}}})
    except ConfigError as e:
        assert "lease_renew_interval" in str(e)
    else:
        raise AssertionError("a renewal interval over half the lease was accepted")


@pytest_twisted.ensureDeferred
async def test_lease_times_are_redis_time_not_the_claimers_clock(tmp_path: Any,
                                                                 redis_url: str) -> None:
    a = make_queue(tmp_path, redis_url, "skew", lease_time=30)
    b = make_queue(tmp_path, redis_url, "skew", lease_time=30)
    try:
        await a.when_ready()
        await b.when_ready()
        await a.enqueue([request(spool_message(str(tmp_path)))])
        held = await a.claim(5)
        assert len(held) == 1
        # b's clock runs an hour fast: everything looks due to it, but a's lease is live
        taken = await b.store.claim_due(time.time() + 3600, 5, b.owner, 30)
        assert taken == []
        score = await a.store.redis.execute_command("ZSCORE", "skew:lease", held[0].id)
        redis_now = await a.store.redis.execute_command("TIME")
        assert 25 < float(score) - int(redis_now[0]) <= 31
    finally:
        await a.stopService()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_a_node_that_lost_its_lease_does_not_acknowledge(tmp_path: Any,
                                                               redis_url: str) -> None:
    a = make_queue(tmp_path, redis_url, "fence", lease_time=30)
    b = make_queue(tmp_path, redis_url, "fence", lease_time=30)
    try:
        await a.when_ready()
        await b.when_ready()
        await a.enqueue([request(spool_message(str(tmp_path)), [r])
                         for r in ("x@example.com", "y@example.com", "z@example.com")])
        first, second, third = await a.claim(3)
        assert await a.renew() == 3

        async def stall_past_lease(item: Any) -> None:
            """a stalls past its lease on ``item`` (forced: it runs out now); b takes it."""
            await a.store.redis.execute_command("ZADD", "fence:lease", 0, item.id)
            assert [i.id for i in await b.claim(5)] == [item.id]

        await stall_past_lease(first)
        # a's next heartbeat learns it: `first` is lost, the others renewed
        assert await a.renew() == 2
        assert first.lease_owner == LOST and a.get_stats()["leases_lost"] == 1
        # a's delivery of `first` finishes: neither completion nor deferral is recorded
        for r in first.recipients:
            r.status = "delivered"
        assert await a.complete(first) == 0
        assert await a.defer_item(first, "451 late") == 0
        assert a.counters["lease_lost"] == 2 and a.counters["delivered"] == 0
        item = await b.get_item(first.id)
        assert item is not None and item.status == "processing"
        assert item.lease_owner == b.owner
        # the store refuses stale acknowledgements on its own, too (a bypassing the queue)
        stale = await a.store.get(third.id)
        stale.lease_owner = "someone-else"
        assert await a.store.remove(stale) == 0
        assert await a.store.get(third.id) is not None
        # `second` is lost while a still delivers it; b defers it, and when a claims it
        # again the object in delivery takes the new lease and may acknowledge
        await stall_past_lease(second)
        assert await a.renew() == 1 and second.lease_owner == LOST
        taken = await b.get_item(second.id)
        await b.defer_item(taken, "451 b failed", delay=0)
        again = await a.claim(5)
        assert again == [] and second.lease_owner == a.owner  # adopted, not handed out twice
        for r in second.recipients:
            r.status = "delivered"
        assert await a.complete(second) == 1
        assert await a.store.get(second.id) is None
        # a clean stop gives the remaining lease back: b may take it at once
        await a.stopService()
        assert [i.id for i in await b.claim(5)] == [third.id]
    finally:
        if a.running:
            await a.stopService()
        await b.stopService()


class HoldingHandler(SinkHandler):
    """A slow next hop: every session waits in DATA until ``release`` is set; a session
    whose client has gone by then is not counted as delivered."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.waiting: list[str] = []  # HELO names of the sessions waiting in DATA

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.waiting.append(session.host_name or "")
        while not self.release.is_set():
            await asyncio.sleep(0.05)
            if server.transport is None or server.transport.is_closing():
                return "421 4.4.2 gone"
        return await super().handle_DATA(server, session, envelope)


def node_config(name: str, state_dir: str, smtp_port: int, sink_port: int, redis_url: str,
                lease: float) -> dict:
    """A router with one SMTP port, a forward rule to the sink and the shared Redis queue."""
    return {
        "router": {"state_dir": state_dir},
        "email": {
            "hostname": name, "listen": "127.0.0.1", "ports": [smtp_port],
            "submission_ports": [], "implicit_tls_ports": [],
            "relay_networks": ["127.0.0.0/8"],
            "domain_rules": [{"pattern": "*@example.com", "mode": "forward",
                              "target": {"server": "127.0.0.1", "port": sink_port}}],
            "queue": {"storage_type": "redis", "redis_url": redis_url,
                      "redis_prefix": "twonodes", "lease_time": lease,
                      "lease_renew_interval": lease / 4, "check_interval": 0.2,
                      "base_retry_delay": 0.2, "max_retry_delay": 1.0, "max_retries": 50},
            "delivery": {"connect_timeout": 2.0, "command_timeout": 60.0,
                         "per_destination_concurrency": 10, "concurrent_deliveries": 20},
        },
    }


def redis_call(url: str, *args: str) -> Any:
    """One command to the redis-server of ``url`` over a plain socket (RESP); the reply."""
    import socket
    host, _, rest = url[len("redis://"):].partition(":")
    port = int(rest.partition("/")[0])
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args))
        f = s.makefile("rb")

        def read() -> Any:
            line = f.readline().rstrip(b"\r\n")
            kind, rest_ = line[:1], line[1:]
            if kind == b"*":
                return [read() for _ in range(int(rest_))]
            if kind == b"$":
                n = int(rest_)
                return None if n < 0 else f.read(n + 2)[:-2]
            if kind == b":":
                return int(rest_)
            if kind == b"-":
                raise RuntimeError(rest_.decode())
            return rest_
        return read()


def message_ids(sink: Sink) -> list[tuple[str, str]]:
    """(message-id, HELO of the delivering node) of every message the sink accepted."""
    out = []
    for m in list(sink.messages):
        for line in m.content.split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                out.append((line.split(b"<")[1].split(b"@")[0].decode(), m.helo))
    return out


def test_killed_router_leaves_its_messages_to_the_other_within_the_bound(
        tmp_path: Any, redis_url: str) -> None:
    lease = 2.0
    handler = HoldingHandler()
    sink = Sink()
    sink.handler = handler
    sink.controller.handler = handler
    sink.start()
    nodes: dict[str, TwistdProcess] = {}
    ports = {"node-a.test": free_port(), "node-b.test": free_port()}

    def start(name: str) -> TwistdProcess:
        work = tmp_path / name
        work.mkdir()
        config = write_config(str(work / "dcrouter.toml"), node_config(
            name, str(work / "var"), ports[name], sink.port, redis_url, lease))
        proc = TwistdProcess(str(work), config=config)
        try:
            wait_for_tcp(ports[name], timeout=30)
        except TimeoutError:
            raise AssertionError(f"{name} did not start:\n{proc.output()[-3000:]}") from None
        return proc

    try:
        nodes["a"] = start("node-a.test")
        count = 6
        try:
            with smtplib.SMTP("127.0.0.1", ports["node-a.test"], timeout=10) as client:
                for n in range(count):
                    client.sendmail("s@sender.test", ["r@example.com"],
                                    f"Subject: m{n}\r\nMessage-ID: <m{n}@two.test>\r\n\r\n"
                                    "body\r\n")
        except smtplib.SMTPException:
            raise AssertionError(f"node-a:\n{nodes['a'].output()[-3000:]}") from None
        # A has every message leased and stuck at the slow next hop
        a_pid = f":{nodes['a'].proc.pid}:"

        def holders() -> list[str]:
            return [v.decode() for v in redis_call(redis_url, "HVALS", "twonodes:owner")]
        # A has leased every message; those it is sending are stuck at the slow next hop
        try:
            wait_until(lambda: len(holders()) == count and handler.waiting, timeout=30,
                       interval=0.1)
        except TimeoutError:
            raise AssertionError(f"leases {holders()}, waiting {handler.waiting}; node-a:\n"
                                 f"{nodes['a'].output()[-5000:]}") from None
        assert all(a_pid in owner for owner in holders())
        nodes["b"] = start("node-b.test")
        # three lease times later B still has taken nothing: A's renewals keep its leases
        # (two real processes: only real time can show that leases did not run out)
        time.sleep(3 * lease)
        assert set(handler.waiting) == {"node-a.test"}, handler.waiting
        owners = holders()
        assert len(owners) == count and all(a_pid in owner for owner in owners), owners
        assert nodes["b"].proc.poll() is None and nodes["a"].proc.poll() is None
        nodes["a"].signal(signal.SIGKILL)
        nodes["a"].proc.wait(10)
        handler.release.set()
        expected = {f"m{n}" for n in range(count)}
        try:  # the bound; the lease is 2 s, so this is generous on a loaded machine
            wait_until(lambda: {m for m, _ in message_ids(sink)} >= expected, timeout=30,
                       interval=0.1)
        except TimeoutError:
            raise AssertionError(f"delivered {message_ids(sink)}; node-b output:\n"
                                 f"{nodes['b'].output()[-3000:]}") from None
        delivered = message_ids(sink)
        assert sorted(m for m, _ in delivered) == sorted(expected), "each exactly once"
        assert {helo for _, helo in delivered} == {"node-b.test"}
        assert nodes["b"].stop() == 0
    finally:
        for proc in nodes.values():
            proc.kill()
        sink.stop()


@pytest_twisted.ensureDeferred
async def test_heartbeat_renews_all_leases_in_one_call_with_an_injected_clock(
        tmp_path: Any, redis_url: str) -> None:
    clock = task.Clock()
    options = QueueOptions(storage_type="redis", redis_url=redis_url, redis_prefix="beat",
                           lease_time=9)
    queue = UnifiedDeliveryQueue.from_options(options, str(tmp_path), reactor=clock)
    queue.startService()
    try:
        await queue.when_ready()
        await queue.enqueue([request(spool_message(str(tmp_path)), [f"r{i}@example.com"])
                             for i in range(50)])
        held = await queue.claim(50)
        assert len(held) == 50 and queue.get_stats()["leases_held"] == 50
        calls = []
        real = queue.store.renew

        def counting(items: Any, owner: str, seconds: float) -> Any:
            calls.append(len(items))
            return real(items, owner, seconds)
        queue.store.renew = counting  # type: ignore[method-assign]
        clock.advance(2.9)
        assert calls == []
        clock.advance(0.2)  # renew_interval = lease_time / 3 = 3 s
        assert calls == [50]
        for _ in range(200):  # the renewal's reply, from the real reactor
            if not queue.leases._busy:  # type: ignore[union-attr]
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        for item in held[:20]:
            for r in item.recipients:
                r.status = "delivered"
            await queue.complete(item)
        clock.advance(3.0)
        assert calls == [50, 30]  # acknowledged items are no longer renewed
        # Redis stops answering (CLIENT PAUSE): a renewal that hangs for a whole lease is
        # given up, so the heartbeat goes on once Redis answers again
        assert queue.leases is not None
        while queue.leases._busy:
            await task.deferLater(reactor, 0.02, lambda: None)
        assert redis_call(redis_url, "CLIENT", "PAUSE", "1000", "ALL") == b"OK"
        clock.advance(3.0)
        assert calls == [50, 30, 30] and queue.leases._busy
        clock.advance(9.0)  # lease_time
        assert not queue.leases._busy
        await task.deferLater(reactor, 1.2, lambda: None)  # the pause ends
        clock.advance(3.0)
        assert calls == [50, 30, 30, 30]
    finally:
        await queue.stopService()
