"""Queues written in format 1 (frozen routes with credentials) load, lose their secrets, deliver.

The fixtures were written by the previous version (see fixtures/README.md): a disk
journal and the keys of a Redis queue, each with four items - forward with AUTH
credentials, mx with DKIM fields, local, and a bounce.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest_twisted

from dcrouter.config.queue import QueueOptions
from dcrouter.message import BY_ADDRESS, BY_RULE
from dcrouter.queue import UnifiedDeliveryQueue
from dcrouter.queue.disk import DiskStore
from dcrouter.queue.redisstore import RedisStore
from tests.delivery.harness import Stack, wait_for
from tests.delivery.peers import CertAuthority, Sink

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
#: The password the format 1 items froze into their routes.
OLD_SECRET = b"v1-fixture-s3cret-pass"
FWD, MX, LOCAL, BOUNCE = ("01JV1FIXTUREFWD00001", "01JV1FIXTUREMX000001",
                          "01JV1FIXTURELOCAL001", "01JV1FIXTUREBOUNCE01")


def _files_holding(root: str, needle: bytes) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                if needle in f.read():
                    found.append(os.path.join(folder, name))
    return found


def _rules(tmp_path, fwd_sink: Sink, ca: CertAuthority, bounce_sink: Sink) -> list[dict]:
    return [
        {"pattern": "*@fwd.test", "mode": "forward",
         "target": {"server": fwd_sink.host, "port": fwd_sink.port, "use_tls": True,
                    "ca_path": ca.ca_path,
                    "authentication": {"user": "relay", "pass": "the-current-password"}}},
        {"pattern": "*@local.test", "mode": "mta",
         "mta_options": {"allow_local_delivery": True,
                         "local_delivery_path": str(tmp_path / "mail")}},
        {"pattern": "*@example.org", "mode": "forward",
         "target": {"server": bounce_sink.host, "port": bounce_sink.port}},
    ]


def _check_loaded(items: dict, deferred: bool) -> None:
    assert set(items) == {FWD, MX, LOCAL, BOUNCE}
    fwd = items[FWD]
    assert fwd.via.kind == BY_RULE and fwd.rule_pattern == "*@fwd.test"
    if deferred:   # the disk fixture holds a later record of it: deferred once
        assert fwd.status == "deferred" and fwd.attempts == 1
    assert fwd.destination == "127.0.0.1:2525"    # the old scheduling key is kept
    assert [r.address for r in fwd.recipients] == ["a@fwd.test", "b@fwd.test"]
    assert OLD_SECRET not in fwd.to_json() and b"relay" not in fwd.to_json()
    mx = items[MX]
    # its d= was taken from the envelope by that version: not trusted, sent unsigned
    assert mx.dkim is None and b"dkim" not in mx.to_json()
    assert items[LOCAL].via.kind == BY_RULE and items[LOCAL].rule_pattern == "*@local.test"
    bounce = items[BOUNCE]
    assert bounce.is_bounce and bounce.via.kind == BY_ADDRESS


async def _deliver_all_but_mx(stack: Stack, tmp_path, fwd_sink: Sink, bounce_sink: Sink):
    await stack.queue.when_ready()
    assert await stack.queue.delete(MX)      # no rule *@mx.test here
    stack.queue.resume()

    def finished(item_id):
        entry = stack.queue.finished.get(item_id)
        return entry is not None and entry[1].status == "delivered"
    await wait_for(lambda: all(finished(i) for i in (FWD, LOCAL, BOUNCE)), 20)
    # the credentials of the rule in force now, over verified TLS, not the frozen ones
    assert fwd_sink.messages[0].auth_user == "relay" and fwd_sink.messages[0].tls
    assert fwd_sink.messages[0].rcpt_tos == ["a@fwd.test", "b@fwd.test"]
    assert bounce_sink.messages[0].rcpt_tos == ["sender@example.org"]
    assert os.listdir(tmp_path / "mail" / "d" / "new")


@pytest_twisted.ensureDeferred
async def test_disk_queue_of_format_1_loads_forgets_the_password_and_delivers(tmp_path):
    root = str(tmp_path / "queue")
    shutil.copytree(os.path.join(FIXTURES, "v1-disk"), root)
    assert _files_holding(root, OLD_SECRET), "the fixture holds the old password"
    ca = CertAuthority(str(tmp_path))
    fwd_sink = Sink(tls=ca, require_tls=True, users={"relay": "the-current-password"}).start()
    bounce_sink = Sink().start()
    store = DiskStore(root)
    stack = Stack(str(tmp_path), store=store,
                  rules=_rules(tmp_path, fwd_sink, ca, bounce_sink))
    stack.queue.pause()
    try:
        await stack.queue.when_ready()
        assert store.upgraded == 4
        _check_loaded({i: store.items[i].materialize() for i in store.items}, True)
        # rewritten and compacted at the start: no file of the queue keeps the password
        assert _files_holding(root, OLD_SECRET) == []
        await _deliver_all_but_mx(stack, tmp_path, fwd_sink, bounce_sink)
    finally:
        await stack.stop()
        fwd_sink.stop()
        bounce_sink.stop()
    # a second start has nothing left to upgrade
    again = UnifiedDeliveryQueue(QueueOptions(storage_type="disk", persistent_path=root),
                                 str(tmp_path))
    again.startService()
    try:
        await again.when_ready()
        assert again.store.upgraded == 0 and again.store.count() == 0
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_an_adopted_shard_of_format_1_is_rewritten_too(tmp_path):
    """Workers 2 -> 1: the shard of the old format is adopted in the current one."""
    from dcrouter.queue.shards import sharded_store
    queue_dir = str(tmp_path / "queue")
    os.makedirs(queue_dir)
    shutil.copytree(os.path.join(FIXTURES, "v1-disk"), os.path.join(queue_dir, "worker-1"))
    store = sharded_store(queue_dir, 0, 1)
    queue = UnifiedDeliveryQueue(QueueOptions(storage_type="disk"), str(tmp_path), store=store)
    queue.startService()
    try:
        await queue.when_ready()
        assert store.adopted == 4 and not os.path.exists(os.path.join(queue_dir, "worker-1"))
        _check_loaded({i: store.items[i].materialize() for i in store.items}, True)
        assert _files_holding(queue_dir, OLD_SECRET) == []
    finally:
        await queue.stopService()


async def _restore(store: RedisStore, dump: dict) -> None:
    redis = store.redis
    for key, entry in dump.items():
        await redis.delete(key)
        if entry["type"] == "hash":
            for field, value in entry["value"].items():
                await redis.hset(key, field, value if isinstance(value, str) else str(value))
        elif entry["type"] == "zset":
            for member, score in entry["value"]:
                await redis.execute_command("ZADD", key, repr(float(score)), member)
        else:
            await redis.set(key, entry["value"])


async def _all_values(store: RedisStore, prefix: str) -> bytes:
    redis = store.redis
    out = []
    for key in await redis.keys(f"{prefix}:*"):
        kind = await redis.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "hash":
            for k, v in (await redis.hgetall(key)).items():
                out += [k if isinstance(k, bytes) else str(k).encode(),
                        v if isinstance(v, bytes) else str(v).encode()]
        elif kind == "string":
            v = await redis.get(key)
            out.append(v if isinstance(v, bytes) else str(v).encode())
    return b"\n".join(out)


@pytest_twisted.ensureDeferred
async def test_redis_queue_of_format_1_loads_forgets_the_password_and_delivers(
        tmp_path, redis_url):
    with open(os.path.join(FIXTURES, "v1-redis.json")) as f:
        dump = json.load(f)
    # write the old keys through a store that is opened but not yet upgraded
    loader = RedisStore.from_url(redis_url, "v1fix")
    loader.redis = await loader._connect()
    await _restore(loader, dump)
    assert OLD_SECRET in await _all_values(loader, "v1fix")
    ca = CertAuthority(str(tmp_path))
    fwd_sink = Sink(tls=ca, require_tls=True, users={"relay": "the-current-password"}).start()
    bounce_sink = Sink().start()
    stack = Stack(str(tmp_path), queue={"storage_type": "redis", "redis_url": redis_url,
                                        "redis_prefix": "v1fix", "lease_time": 30.0},
                  rules=_rules(tmp_path, fwd_sink, ca, bounce_sink))
    stack.queue.pause()
    try:
        await stack.queue.when_ready()
        items, _ = await stack.queue.list_items(limit=10)
        _check_loaded({i.id: i for i in items}, False)
        assert OLD_SECRET not in await _all_values(loader, "v1fix")
        assert (await loader.redis.get("v1fix:format")) in (b"2", "2")
        await _deliver_all_but_mx(stack, tmp_path, fwd_sink, bounce_sink)
    finally:
        await stack.stop()
        await loader.redis.disconnect()
        fwd_sink.stop()
        bounce_sink.stop()
