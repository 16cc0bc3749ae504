"""Token buckets: refill, all-or-nothing, bounded memory, and shared counters in real Redis."""

from __future__ import annotations

from typing import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from dcrouter.config import parse_config
from dcrouter.email.ratelimit import (
    LocalRateLimiter, RedisRateLimiter, TokenBucket, make_rate_limiter,
)
from tests.email.peers import Peer, start_redis
from tests.support.net import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_continuously() -> None:
    b = TokenBucket(60, 1.0, now=0.0)
    b.tokens = 0.0
    b.refill(0.5)
    assert b.tokens == 0.5 and b.retry_after() == 0.5
    b.refill(100.0)
    assert b.tokens == 60  # capped at capacity


def test_limit_per_minute_then_refill() -> None:
    clock = Clock()
    limiter = LocalRateLimiter(clock)
    for _ in range(3):
        assert limiter.try_acquire([("ip:1", 3)]) is None
    assert limiter.try_acquire([("ip:1", 3)]) == "ip:1"
    clock.now += 20  # 3 a minute: one token every 20 s
    assert limiter.try_acquire([("ip:1", 3)]) is None
    assert limiter.try_acquire([("ip:1", 3)]) == "ip:1"
    assert limiter.try_acquire([("ip:2", 3)]) is None   # another key, its own bucket


def test_all_or_nothing() -> None:
    limiter = LocalRateLimiter(Clock())
    assert limiter.try_acquire([("global", 10), ("ip:1", 1)]) is None
    for _ in range(5):
        assert limiter.try_acquire([("global", 10), ("ip:1", 1)]) == "ip:1"
    # the refused checks took no global tokens: 9 are left
    for _ in range(9):
        assert limiter.try_acquire([("global", 10)]) is None
    assert limiter.try_acquire([("global", 10)]) == "global"
    assert limiter.get_stats()["refused"] == 6


def test_changed_limit_takes_effect() -> None:
    limiter = LocalRateLimiter(Clock())
    assert limiter.try_acquire([("rule:a", 1)]) is None
    assert limiter.try_acquire([("rule:a", 1)]) == "rule:a"
    assert limiter.try_acquire([("rule:a", 5)]) is None  # reconfigured: new bucket


def test_bucket_count_bounded() -> None:
    limiter = LocalRateLimiter(Clock(), max_buckets=100)
    for i in range(1000):
        limiter.try_acquire([(f"ip:{i}", 5)])
    assert limiter.get_stats()["buckets"] == 100


def test_backend_follows_queue_storage() -> None:
    email = parse_config({"email": {}}).email
    assert isinstance(make_rate_limiter(email), LocalRateLimiter)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    peer = start_redis(str(tmp_path_factory.mktemp("redis")))
    yield peer
    peer.stop()


@pytest_twisted.inlineCallbacks
def test_redis_counters_shared_by_two_nodes(redis: Peer) -> None:
    email = parse_config({"email": {"queue": {
        "storage_type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
        "redis_prefix": "node-test"}}}).email
    a = make_rate_limiter(email, reactor)
    b = make_rate_limiter(email, reactor)
    assert isinstance(a, RedisRateLimiter)
    try:
        assert (yield a.acquire([("global", 100), ("ip:9", 3)])) is None
        assert (yield b.acquire([("global", 100), ("ip:9", 3)])) is None
        assert (yield a.acquire([("global", 100), ("ip:9", 3)])) is None
        assert (yield b.acquire([("global", 100), ("ip:9", 3)])) == "ip:9"
        assert (yield a.acquire([("ip:10", 3)])) is None
        assert a.get_stats()["allowed"] + b.get_stats()["allowed"] == 4
        assert b.get_stats()["errors"] == 0
    finally:
        yield a.close()
        yield b.close()


@pytest_twisted.inlineCallbacks
def test_redis_refill_uses_elapsed_time(redis: Peer) -> None:
    clock = Clock()
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{redis.port}/1", "refill", clock=clock,
                               reactor=reactor)
    try:
        assert (yield limiter.acquire([("k", 2)])) is None
        assert (yield limiter.acquire([("k", 2)])) is None
        assert (yield limiter.acquire([("k", 2)])) == "k"
        clock.now += 30   # 2 a minute: one token back
        assert (yield limiter.acquire([("k", 2)])) is None
        assert (yield limiter.acquire([("k", 2)])) == "k"
    finally:
        yield limiter.close()


@pytest_twisted.inlineCallbacks
def test_redis_down_falls_back_to_local_buckets() -> None:
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", "down", timeout=0.5,
                               reactor=reactor)
    try:
        assert (yield limiter.acquire([("k", 1)])) is None
        assert (yield limiter.acquire([("k", 1)])) == "k"   # still limited, locally
        assert limiter.get_stats()["errors"] == 1           # Redis retried only after 5 s
    finally:
        yield limiter.close()


@pytest_twisted.inlineCallbacks
def test_two_processors_share_limits_through_redis(redis: Peer, tmp_path) -> None:  # type: ignore
    from dcrouter.errors import PolicyRejection
    from tests.email.support import make_processor, session

    email = {"queue": {"storage_type": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/2",
                       "redis_prefix": "two-nodes"},
             "rate_limits": {"max_messages_per_minute_per_ip": 3}}
    node_a, _ = make_processor(str(tmp_path / "a"), email)
    node_b, _ = make_processor(str(tmp_path / "b"), email)
    try:
        yield node_a.check_sender(session("192.0.2.77"), "x@y.test")
        yield node_b.check_sender(session("192.0.2.77"), "x@y.test")
        yield node_a.check_sender(session("192.0.2.77"), "x@y.test")
        with pytest.raises(PolicyRejection) as info:
            yield node_b.check_sender(session("192.0.2.77"), "x@y.test")
        assert (info.value.code, info.value.enhanced) == (451, "4.7.1")
        assert node_b.get_stats()["rate_limits"]["backend"] == "redis"
    finally:
        yield node_a.close()
        yield node_b.close()
