"""The API's failed-authentication limit shared by several dcrouter nodes through Redis.

When the router's queue lives in Redis (``email.queue.storage_type =
"redis"``), every node's API counts wrong tokens per client address in the
same sorted set (``<redis_prefix>:api:authfail:<ip>``, scores are the times
of the failures, the key expires after the window), so an attacker cannot
multiply its guesses by the number of nodes.  Each check is one Lua script.
If Redis cannot be reached, the node's own in-process limit still applies
(logged once), and Redis is tried again after ``retry_interval`` seconds.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Optional

from twisted.internet import defer

from dcrouter.logsetup import get_logger
from dcrouter.redisaddr import RedisAddress

log = get_logger("api.auth")

#: KEYS[1]: the address's set; ARGV: now, window, limit.  Returns seconds to wait (0: free).
_BLOCKED = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then return 0 end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + window - now)
"""

#: KEYS[1]: the address's set; ARGV: now, window, a unique member.  Returns the count.
_RECORD = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
return redis.call('ZCARD', KEYS[1])
"""


class SharedFailureLimiter:
    """Failures per address in a sliding window, kept in Redis for every node."""

    def __init__(self, redis_url: str, prefix: str, limit: int, window: float = 60.0,
                 clock: Callable[[], float] = time.time, timeout: float = 2.0,
                 retry_interval: float = 5.0, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.address = RedisAddress.parse(redis_url)
        self.prefix = prefix
        self.limit = limit
        self.window = window
        self.clock = clock
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.reactor = reactor
        self.errors = 0
        self.redis: Any = None
        self._down_since: Optional[float] = None

    def _key(self, client_ip: str) -> str:
        return f"{self.prefix}:api:authfail:{client_ip}"

    @defer.inlineCallbacks
    def _eval(self, script: str, key: str, args: list[Any]) -> Any:
        """Run a script; fires with None when Redis is unavailable (the caller falls back)."""
        now = time.monotonic()
        if self._down_since is not None and now - self._down_since < self.retry_interval:
            return None
        try:
            if self.redis is None:
                d = self.address.connect(reconnect=False, timeout=self.timeout)
                d.addTimeout(self.timeout, self.reactor)
                self.redis = yield d
            d = self.redis.eval(script, [key], args)
            d.addTimeout(self.timeout, self.reactor)
            result = yield d
        except Exception as e:  # noqa: BLE001 - any Redis trouble: the local limit applies
            self.errors += 1
            if self._down_since is None:
                log.warn("API authentication limit: redis unavailable, counting failures "
                         "in this process only: {error}", error=str(e) or type(e).__name__)
            self._down_since = now
            connection, self.redis = self.redis, None
            if connection is not None:
                connection.disconnect()
            return None
        self._down_since = None
        return result

    @defer.inlineCallbacks
    def blocked_for(self, client_ip: str) -> Any:
        """Fires with the seconds until ``client_ip`` may try again (0: not blocked)."""
        result = yield self._eval(_BLOCKED, self._key(client_ip),
                                  [repr(self.clock()), repr(self.window), self.limit])
        if result is None:
            return 0
        wait = float(result.decode() if isinstance(result, bytes) else result)
        return max(1, math.ceil(wait)) if wait > 0 else 0

    @defer.inlineCallbacks
    def record(self, client_ip: str) -> Any:
        """Count a failure; fires with the address's failures in the window (None: no Redis)."""
        member = f"{self.clock()!r}:{os.urandom(6).hex()}"
        result = yield self._eval(_RECORD, self._key(client_ip),
                                  [repr(self.clock()), repr(self.window), member])
        return None if result is None else int(result)

    def close(self) -> defer.Deferred:
        """Disconnect."""
        connection, self.redis = self.redis, None
        if connection is None:
            return defer.succeed(None)
        return defer.maybeDeferred(connection.disconnect)
