"""The Redis store against a real redis-server: leases, expiry, and two nodes where one dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest_twisted

from dcrouter.config.queue import QueueOptions
from dcrouter.message import Route
from dcrouter.queue import UnifiedDeliveryQueue
from dcrouter.queue.redisstore import RedisStore
from tests.delivery.harness import wait_for
from tests.delivery.peers import Sink
from tests.queue.helpers import request, spool_message
from tests.support.proc import REPO, twistd_env


def make_queue(tmp_path, url, prefix, **opts):
    options = QueueOptions(storage_type="redis", redis_url=url, redis_prefix=prefix, **opts)
    queue = UnifiedDeliveryQueue.from_options(options, str(tmp_path))
    queue.startService()
    return queue


@pytest_twisted.inlineCallbacks
def test_items_leases_and_bodies(tmp_path, redis_url):
    prefix = "t1"
    a = make_queue(tmp_path, redis_url, prefix, lease_time=0.5)
    b = make_queue(tmp_path, redis_url, prefix, lease_time=0.5)
    yield a.when_ready()
    yield b.when_ready()
    try:
        path = spool_message(str(tmp_path), b"Subject: r\r\n\r\nredis body\r\n")
        ids = yield a.enqueue([request(path, ["x@one.test", "y@two.test"], route=Route(kind="mx"))])
        assert len(ids) == 2 and not os.path.exists(path)
        assert isinstance(a.store, RedisStore)
        got_a = yield a.claim(1)
        got_b = yield b.claim(10)
        assert len(got_a) == 1 and len(got_b) == 1, "each item goes to exactly one worker"
        assert {got_a[0].id, got_b[0].id} == set(ids)
        body = yield b.read_body(got_b[0])
        assert body == b"Subject: r\r\n\r\nredis body\r\n"
        item = yield a.get_item(got_a[0].id)
        assert item.status == "processing"
        # a dies silently (no more lease renewals): its lease runs out and b takes the item
        from twisted.internet import reactor, task
        a.leases.stop()
        yield task.deferLater(reactor, 0.7, lambda: None)
        renewed = yield b.renew()  # b is alive and keeps its own lease
        assert renewed == 1
        taken = yield b.claim(10)
        assert [i.id for i in taken] == [got_a[0].id]
        # a's late update is ignored (b holds the lease now)
        got_a[0].attempts = 1
        yield a.defer_item(got_a[0], "451 late", delay=0)
        assert (yield b.claim(10)) == []
        for it in taken + got_b:
            for r in it.recipients:
                r.status = "delivered"
            yield b.complete(it)
        yield b.store.refresh()
        assert b.get_stats()["size"] == 0
        keys = yield b.store.redis.keys(f"{prefix}:body:*")
        assert keys == []
        # deferral and listing
        ids = yield a.enqueue([request(spool_message(str(tmp_path)))])
        item = (yield a.claim(1))[0]
        item.attempts = 1
        yield a.defer_item(item, "451 later", delay=3600)
        page, _ = yield a.list_items()
        assert [i.id for i in page] == ids and page[0].status == "deferred"
        assert (yield a.flush()) == 1
        assert [i.id for i in (yield b.claim(5))] == ids
    finally:
        yield a.stopService()
        yield b.stopService()


@pytest_twisted.ensureDeferred
async def test_two_nodes_one_killed_every_message_delivered(tmp_path, redis_url):
    sink = Sink().start()
    sink.handler.delay = 0.1
    producer = make_queue(tmp_path, redis_url, "two")
    await producer.when_ready()
    nodes = {}
    try:
        route = Route(kind="forward", server="127.0.0.1", port=sink.port)
        expected = set()
        for n in range(24):
            body = b"Subject: m%d\r\nMessage-ID: <m%d@test>\r\n\r\nbody\r\n" % (n, n)
            await producer.enqueue([request(spool_message(str(tmp_path), body), route=route)])
            expected.add(f"m{n}@test")
        env = twistd_env()
        for name in ("node-a", "node-b"):
            state = tmp_path / name
            state.mkdir()
            nodes[name] = subprocess.Popen(
                [sys.executable, "-m", "tests.queue.redis_node", redis_url, "two", name,
                 str(state)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT)

        def by(name):
            return [m for m in sink.messages if m.helo == name]
        await wait_for(lambda: len(by("node-a")) >= 3, timeout=30)
        nodes["node-a"].send_signal(signal.SIGKILL)
        nodes["node-a"].wait(10)
        killed_after = len(by("node-a"))

        def delivered():
            seen = set()
            for m in sink.messages:
                for line in m.content.split(b"\r\n"):
                    if line.lower().startswith(b"message-id:"):
                        seen.add(line.split(b"<")[1].split(b">")[0].decode())
            return seen
        await wait_for(lambda: delivered() >= expected, timeout=40)
        assert killed_after < 24, "node-a was killed while work remained"
        assert by("node-b"), "the surviving node delivered the rest"
        from twisted.internet import reactor, task
        for _ in range(100):
            await producer.store.refresh()
            if producer.store.count() == 0:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        assert producer.store.count() == 0, "every item left the shared queue"
    finally:
        for proc in nodes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        await producer.stopService()
        sink.stop()


@pytest_twisted.inlineCallbacks
def test_suppression_list_shared_through_redis(tmp_path, redis_url):
    from dcrouter.delivery.suppression import SuppressionList
    queue = make_queue(tmp_path, redis_url, "supp")
    yield queue.when_ready()
    try:
        one = SuppressionList("", 3600, redis=lambda: queue.store.redis, redis_key="supp:s")
        one.add("gone@example.com", "550 5.1.1 user unknown")
        from tests.delivery.harness import wait_for as wait
        other = SuppressionList("", 3600, redis=lambda: queue.store.redis, redis_key="supp:s")
        for _ in range(50):
            yield other.load()
            if other.is_suppressed("gone@example.com"):
                break
        assert other.is_suppressed("gone@example.com"), "another node sees the entry"
        one.remove("gone@example.com")
        yield wait(lambda: True)
        third = SuppressionList("", 3600, redis=lambda: queue.store.redis, redis_key="supp:s")
        yield third.load()
        assert not third.is_suppressed("gone@example.com")
    finally:
        yield queue.stopService()
