"""Rate limits of the email gateway: hierarchical token buckets.

A limit of N messages a minute is a bucket holding at most N tokens,
refilled at N/60 tokens a second.  One message takes one token from each
bucket that applies to it - global, per client IP, per authenticated user,
and per matched rule - all or nothing: when any bucket is empty nothing is
taken and the caller answers ``451 4.7.1`` (the sender retries later).  The
per-IP bucket does not apply to clients in ``email.client_limit_exceptions``
(default ``relay_networks``; :func:`per_ip_exempt`), as Postfix exempts
``mynetworks`` from its client rate limits.

:class:`LocalRateLimiter` keeps buckets in memory (bounded: idle buckets are
dropped).  :class:`RedisRateLimiter` keeps them in Redis, updated by one Lua
script per check so several dcrouter nodes share their counters; if Redis
cannot be reached it falls back to its local limiter rather than refuse or
silently pass mail.
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Any, Callable, Optional

from twisted.internet import defer

from dcrouter.email.limits import LimitExceptions
from dcrouter.logsetup import get_logger
from dcrouter.redisaddr import RedisAddress

log = get_logger("email.ratelimit")

#: A bucket request: (bucket key, messages per minute).
Limit = tuple[str, int]


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``rate`` tokens a second."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.tokens = capacity
        self.updated = now

    def refill(self, now: float) -> None:
        """Add what accrued since the last look."""
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def retry_after(self, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are there."""
        missing = cost - self.tokens
        return 0.0 if missing <= 0 else missing / self.rate


class LocalRateLimiter:
    """Token buckets in this process's memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_buckets: int = 100000) -> None:
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: "collections.OrderedDict[str, TokenBucket]" = collections.OrderedDict()
        self.allowed = 0
        self.refused = 0

    def _bucket(self, key: str, per_minute: int, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None or bucket.capacity != per_minute:
            bucket = TokenBucket(per_minute, per_minute / 60.0, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def try_acquire(self, limits: list[Limit]) -> Optional[str]:
        """Take one token from every bucket, or none; returns the first empty bucket's key."""
        now = self.clock()
        buckets = []
        for key, per_minute in limits:
            bucket = self._bucket(key, per_minute, now)
            bucket.refill(now)
            if bucket.tokens < 1.0:
                self.refused += 1
                return key
            buckets.append(bucket)
        for bucket in buckets:
            bucket.tokens -= 1.0
        self.allowed += 1
        return None

    def acquire(self, limits: list[Limit]) -> defer.Deferred:
        """As :meth:`try_acquire`, as a Deferred (the interface shared with Redis)."""
        return defer.succeed(self.try_acquire(limits))

    def get_stats(self) -> dict:
        """Buckets held, checks allowed and refused."""
        return {"backend": "memory", "buckets": len(self._buckets), "allowed": self.allowed,
                "refused": self.refused}

    def close(self) -> defer.Deferred:
        """Nothing to close."""
        return defer.succeed(None)


#: KEYS: bucket keys; ARGV: now, then capacity per key.  Returns 0 or the 1-based
#: index of the first empty bucket.  Each bucket is a hash {tokens, ts}.
_LUA = """
local now = tonumber(ARGV[1])
local state = {}
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[i + 1])
  local rate = cap / 60.0
  local vals = redis.call('HMGET', key, 'tokens', 'ts', 'cap')
  local tokens = tonumber(vals[1])
  local ts = tonumber(vals[2])
  if tokens == nil or tonumber(vals[3]) ~= cap then
    tokens = cap
    ts = now
  end
  if now > ts then
    tokens = math.min(cap, tokens + (now - ts) * rate)
  end
  if tokens < 1 then
    return i
  end
  state[i] = tokens
end
for i, key in ipairs(KEYS) do
  local cap = tonumber(ARGV[i + 1])
  redis.call('HSET', key, 'tokens', tostring(state[i] - 1), 'ts', tostring(now),
             'cap', tostring(cap))
  redis.call('EXPIRE', key, 120)
end
return 0
"""


class RedisRateLimiter:
    """Token buckets in Redis, shared by every node using the same ``prefix``.

    Connects on first use (a router without limits never talks to Redis);
    after a failure it uses its local buckets and tries Redis again after
    ``retry_interval`` seconds.
    """

    def __init__(self, redis_url: str, prefix: str = "dcrouter",
                 clock: Callable[[], float] = time.time, timeout: float = 2.0,
                 reactor: Any = None, retry_interval: float = 5.0) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.reactor = reactor
        self.timeout = timeout
        self.address = RedisAddress.parse(redis_url)
        self.prefix = prefix
        self.clock = clock
        self.retry_interval = retry_interval
        self.fallback = LocalRateLimiter()
        self.allowed = 0
        self.refused = 0
        self.errors = 0
        self.redis: Any = None
        self._down_since: Optional[float] = None

    @defer.inlineCallbacks
    def _connection(self) -> Any:
        if self.redis is None:
            d = self.address.connect(reconnect=False, timeout=self.timeout)
            d.addTimeout(self.timeout, self.reactor)
            self.redis = yield d
        return self.redis

    @defer.inlineCallbacks
    def acquire(self, limits: list[Limit]) -> Any:
        """Fires with None (allowed) or the key of the first empty bucket."""
        if not limits:
            return None
        now = time.monotonic()
        if self._down_since is not None and now - self._down_since < self.retry_interval:
            return self.fallback.try_acquire(limits)
        keys = [f"{self.prefix}:ratelimit:{key}" for key, _ in limits]
        args = [repr(self.clock())] + [str(per_minute) for _, per_minute in limits]
        try:
            redis = yield self._connection()
            d = redis.eval(_LUA, keys, args)
            d.addTimeout(self.timeout, self.reactor)
            result = yield d
        except Exception as e:  # noqa: BLE001 - any Redis trouble falls back to local buckets
            self.errors += 1
            self._down_since = now
            connection, self.redis = self.redis, None
            if connection is not None:
                connection.disconnect()
            log.warn("rate limits: redis unavailable, using local buckets: {error}",
                     error=str(e) or type(e).__name__)
            return self.fallback.try_acquire(limits)
        self._down_since = None
        index = int(result)
        if index == 0:
            self.allowed += 1
            return None
        self.refused += 1
        return limits[index - 1][0]

    def get_stats(self) -> dict:
        """Checks allowed, refused and Redis errors."""
        return {"backend": "redis", "allowed": self.allowed, "refused": self.refused,
                "errors": self.errors, "connected": self.redis is not None}

    def close(self) -> defer.Deferred:
        """Disconnect from Redis."""
        connection, self.redis = self.redis, None
        if connection is None:
            return defer.succeed(None)
        return defer.maybeDeferred(connection.disconnect)


@functools.lru_cache(maxsize=8)
def _exceptions(networks: tuple[str, ...]) -> LimitExceptions:
    return LimitExceptions(networks)


def per_ip_exempt(email: Any, ip: str) -> bool:
    """Is ``ip`` exempt from the per-IP message rate limit? It is inside
    ``email.client_limit_exceptions`` (default ``relay_networks``: Postfix exempts
    ``mynetworks`` from its client rate limits)."""
    networks = email.client_limit_exceptions
    if networks is None:
        networks = email.relay_networks
    return _exceptions(tuple(networks)).covers(ip)


def make_rate_limiter(email: Any, reactor: Any = None) -> Any:
    """Redis-backed when ``email.queue.storage_type == "redis"``, else in memory."""
    if email.queue.storage_type == "redis":
        return RedisRateLimiter(email.queue.redis_url, email.queue.redis_prefix,
                                reactor=reactor)
    return LocalRateLimiter()


__all__ = ["Limit", "LocalRateLimiter", "RedisRateLimiter", "TokenBucket", "make_rate_limiter",
           "per_ip_exempt"]
