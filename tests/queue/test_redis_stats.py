"""The Redis store's counts by status against a real redis-server, step by step beside the disk store.

The same operations (enqueue, lease, defer, complete, release, delete, flush)
run on a disk queue and on a Redis queue; after each one both report the same
``by_status``, size, bytes and destinations.  Further: a second node sees the
counts, an old-format queue gets its counters rebuilt, and flush only touches
deferred items.
"""

from __future__ import annotations

import os

import pytest_twisted

from dcrouter.config.queue import QueueOptions
from dcrouter.queue import UnifiedDeliveryQueue
from dcrouter.queue.redisstore import RedisStore
from tests.queue.helpers import request, spool_message

BODY = b"Subject: stats\r\n\r\n" + b"x" * 200 + b"\r\n"


def make_queue(state_dir: str, url: str = "", prefix: str = "") -> UnifiedDeliveryQueue:
    if url:
        options = QueueOptions(storage_type="redis", redis_url=url, redis_prefix=prefix)
    else:
        options = QueueOptions(storage_type="disk",
                               persistent_path=os.path.join(state_dir, "queue"))
    os.makedirs(state_dir, exist_ok=True)
    queue = UnifiedDeliveryQueue.from_options(options, state_dir)
    queue.startService()
    return queue


async def figures(queue: UnifiedDeliveryQueue) -> dict:
    if isinstance(queue.store, RedisStore):
        await queue.store.refresh()
    stats = queue.get_stats()
    return {"by_status": stats["by_status"], "size": stats["size"], "bytes": stats["bytes"],
            "by_destination": stats["by_destination"],
            "has_oldest": stats["oldest_age"] > 0}


class Pair:
    """A disk queue and a Redis queue driven through the same steps."""

    def __init__(self, tmp_path, url: str, prefix: str) -> None:
        self.disk = make_queue(str(tmp_path / "disk"))
        self.redis = make_queue(str(tmp_path / "redis"), url, prefix)
        self.tmp = tmp_path
        self.held: dict[str, list] = {"disk": [], "redis": []}

    def queues(self):
        return (("disk", self.disk), ("redis", self.redis))

    async def ready(self) -> None:
        for _, queue in self.queues():
            await queue.when_ready()

    async def enqueue(self, recipients: list[str]) -> None:
        for name, queue in self.queues():
            path = spool_message(str(self.tmp / name), BODY)
            await queue.enqueue([request(path, [r]) for r in recipients])

    async def claim(self, limit: int) -> None:
        for name, queue in self.queues():
            got = await queue.claim(limit)
            assert len(got) == limit, (name, len(got))
            self.held[name] += got

    async def on_held(self, action) -> None:
        for name, queue in self.queues():
            await action(queue, self.held[name].pop(0))

    async def same(self, expected_by_status: dict[str, int]) -> dict:
        disk = await figures(self.disk)
        redis = await figures(self.redis)
        assert redis == disk, f"redis {redis} != disk {disk}"
        for status, count in expected_by_status.items():
            assert disk["by_status"][status] == count, (status, disk)
        return disk

    async def stop(self) -> None:
        for _, queue in self.queues():
            await queue.stopService()


def delivered(item):
    for r in item.recipients:
        r.status = "delivered"
    return item


@pytest_twisted.ensureDeferred
async def test_counts_by_status_match_the_disk_store(tmp_path, redis_url):
    pair = Pair(tmp_path, redis_url, "stats1")
    await pair.ready()
    try:
        await pair.same({"pending": 0, "processing": 0, "deferred": 0})
        await pair.enqueue(["a@one.test", "b@one.test", "c@two.test", "d@two.test"])
        state = await pair.same({"pending": 4, "processing": 0, "deferred": 0})
        assert state["size"] == 4 and state["bytes"] == 4 * len(BODY) and state["has_oldest"]
        await pair.claim(2)
        await pair.same({"pending": 2, "processing": 2, "deferred": 0})
        await pair.on_held(lambda q, item: q.defer_item(item, "451 later", delay=3600))
        await pair.same({"pending": 2, "processing": 1, "deferred": 1})
        await pair.on_held(lambda q, item: q.complete(delivered(item)))
        state = await pair.same({"pending": 2, "processing": 0, "deferred": 1})
        assert state["size"] == 3 and state["bytes"] == 3 * len(BODY)
        await pair.claim(1)
        await pair.same({"pending": 1, "processing": 1, "deferred": 1})
        await pair.on_held(lambda q, item: q.release(item))  # back to pending, unattempted
        await pair.same({"pending": 2, "processing": 0, "deferred": 1})
        # retry-now of the deferred item keeps it deferred (but due): same on both
        for _, queue in pair.queues():
            page, _ = await queue.list_items(status="deferred")
            assert len(page) == 1
            assert await queue.retry_now(page[0].id)
        await pair.same({"pending": 2, "processing": 0, "deferred": 1})
        # operator deletes a pending item
        for _, queue in pair.queues():
            page, _ = await queue.list_items(status="pending")
            assert await queue.delete(page[0].id)
        await pair.same({"pending": 1, "processing": 0, "deferred": 1})
        # everything leased, then delivered: all counts back to zero
        await pair.claim(2)
        await pair.same({"pending": 0, "processing": 2, "deferred": 0})
        for _ in range(2):
            await pair.on_held(lambda q, item: q.complete(delivered(item)))
        state = await pair.same({"pending": 0, "processing": 0, "deferred": 0})
        assert state["size"] == 0 and state["bytes"] == 0 and not state["has_oldest"]
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_second_node_sees_the_counts_and_expired_leases(tmp_path, redis_url):
    options = dict(storage_type="redis", redis_url=redis_url, redis_prefix="stats2",
                   lease_time=0.3)
    a = UnifiedDeliveryQueue.from_options(QueueOptions(**options), str(tmp_path))
    b = UnifiedDeliveryQueue.from_options(QueueOptions(**options), str(tmp_path))
    a.startService()
    b.startService()
    try:
        await a.when_ready()
        await b.when_ready()
        await a.enqueue([request(spool_message(str(tmp_path), BODY), [r])
                         for r in ("x@one.test", "y@one.test", "z@one.test")])
        taken = await a.claim(2)
        await a.defer_item(taken[0], "451", delay=3600)
        await b.store.refresh()
        assert b.get_stats()["by_status"] == {"pending": 1, "processing": 1, "deferred": 1,
                                              "delivered": 0, "failed": 0}
        # a dies (its lease heartbeat stops): its lease expires, b's next claim takes the
        # item back (counted pending)
        from twisted.internet import reactor, task
        a.leases.stop()
        await task.deferLater(reactor, 0.5, lambda: None)
        got = await b.claim(10)
        assert {i.id for i in got} >= {taken[1].id}
        await b.store.refresh()
        assert b.get_stats()["by_status"]["processing"] == len(got) == 2
        assert b.get_stats()["by_status"]["pending"] == 0
        assert b.get_stats()["by_status"]["deferred"] == 1
        # flush makes only deferred items due; the counts stay by status
        assert await b.flush() == 1
        await b.store.refresh()
        assert b.get_stats()["by_status"]["deferred"] == 1
        # the periodic refresh brings a's cache up to date without an explicit call
        a.store.refresh_interval = 0.1
        await task.deferLater(reactor, 1.3, lambda: None)
        assert a.get_stats()["by_status"]["processing"] == 2
    finally:
        await a.stopService()
        await b.stopService()


@pytest_twisted.ensureDeferred
async def test_old_format_queue_gets_counters_rebuilt_once(tmp_path, redis_url):
    queue = make_queue(str(tmp_path), redis_url, "stats3")
    await queue.when_ready()
    try:
        await queue.enqueue([request(spool_message(str(tmp_path), BODY), [r])
                             for r in ("p@one.test", "q@one.test", "r@one.test")])
        item = (await queue.claim(1))[0]
        await queue.defer_item(item, "451", delay=3600)
        leased = (await queue.claim(1))[0]
        expected = (await figures(queue))
        assert expected["by_status"]["pending"] == 1 and expected["by_status"]["deferred"] == 1
        assert leased.status == "processing"
        # stop as a crash would: the lease stays in Redis (a clean stop gives it back)
        assert queue.leases is not None
        queue.leases.stop()
        queue.leases.held.clear()
    finally:
        await queue.stopService()
    # drop what a version without counters would not have written
    store = RedisStore.from_url(redis_url, "stats3")
    store.refresh_interval = 0
    store.redis = await store._connect()
    await store.redis.delete("stats3:counts", "stats3:wstatus", "stats3:created")
    await store.close()
    again = make_queue(str(tmp_path), redis_url, "stats3")
    await again.when_ready()
    try:
        assert await figures(again) == expected
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_api_stats_and_metrics_show_redis_counts_by_status(tmp_path, redis_url):
    from prometheus_client.parser import text_string_to_metric_families

    from twisted.internet import reactor, task

    from tests.api.support import Client, hold_items, router_config
    from tests.support.router import options_from, start_router, stop_router

    state_dir = str(tmp_path / "var")
    data, _ = router_config(state_dir)
    data["email"]["queue"].update(storage_type="redis", redis_url=redis_url,
                                  redis_prefix="stats-api", base_retry_delay=3600)
    router = start_router(options_from(data, state_dir))
    client = Client(router.by_name["api"].listeners.port_for("api.port"))
    queue = router.email.queue
    try:
        await queue.when_ready()
        assert isinstance(queue.store, RedisStore)
        await hold_items(router, ["one@hold.test", "two@hold.test", "three@hold.test"])
        seen: dict = {}

        async def api_depth() -> dict:
            stats = (await client.get("/api/stats")).json()
            metrics = (await client.get("/metrics")).text
            depth = {s.labels["status"]: s.value for f in text_string_to_metric_families(metrics)
                     if f.name == "dcrouter_queue_depth" for s in f.samples}
            seen.update(api=stats["email"]["queue"]["by_status"], metrics=depth)
            return seen

        await api_depth()
        assert seen["api"]["pending"] == 3 and seen["api"]["deferred"] == 0
        assert seen["metrics"]["pending"] == 3.0
        # delivery to a closed port fails: the items wait as deferred (retry in an hour)
        queue.resume()

        async def all_deferred() -> bool:
            depth = await api_depth()
            return depth["api"]["deferred"] == 3 and depth["metrics"].get("deferred") == 3.0
        for _ in range(100):
            if await all_deferred():
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        assert seen["api"]["deferred"] == 3, seen
        assert seen["api"]["pending"] == 0 and seen["api"]["processing"] == 0, seen
        assert seen["metrics"]["deferred"] == 3.0 and seen["metrics"]["pending"] == 0.0, seen
    finally:
        await stop_router(router)
