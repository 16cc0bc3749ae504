"""Queue storage in Redis, shared by several dcrouter processes (txredisapi).

Keys (``P`` is ``redis_prefix``)::

    P:items           hash   item id -> item JSON
    P:due             zset   item id, score = next attempt (epoch seconds)
    P:lease           zset   item id, score = lease expiry
    P:owner           hash   item id -> worker holding the lease
    P:ids             zset   every item id, score 0 (lexicographic listing)
    P:dest            hash   destination -> item count
    P:wstatus         hash   item id -> its waiting status (pending or deferred)
    P:counts          hash   pending/deferred: items waiting in P:due by status;
                             bytes: message bytes of all items; v: format marker
    P:created         zset   item id, score = creation time (oldest item)
    P:body:<ref>      string message body
    P:bodyref:<ref>   int    items using that body

Every change is one Lua script, so it is atomic: ``claim`` first returns
expired leases to ``P:due`` (a worker that died loses its items), then moves
due ids to ``P:lease`` with an expiry and returns them - each item to exactly
one worker at a time.  Leases (:mod:`dcrouter.queue.queue` keeps them short,
``email.queue.lease_time``) are renewed by their holder in one script per
heartbeat for all its items, and are fenced: ``P:owner`` names the worker
that holds each item, and renewing, updating or removing an item another
worker has taken (or that is gone) does nothing and says so, so a worker that
lost a lease never acknowledges the item a second time.  Lease times are
Redis's clock (``TIME`` inside the scripts), so clock skew between nodes
cannot expire a live lease.  Delivery is at-least-once: a worker whose lease
expired mid-delivery (it could not reach Redis for a whole lease) may deliver
an item that another worker delivers as well.  Redis's own persistence
settings (``appendonly``/``appendfsync``) decide what survives a Redis crash.

Counts by status are kept by the same scripts (``P:counts``; processing is
the size of ``P:lease``), so :meth:`RedisStore.stats` never scans the items.
The figures are cached here and re-read by one script on every claim and at
least every :attr:`RedisStore.refresh_interval` seconds, so they include what
other nodes did.  A queue written by a version without ``P:counts`` gets its
counters rebuilt once, atomically, when a node opens it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer
from zope.interface import implementer

from dcrouter.errors import QueueError
from dcrouter.interfaces import IQueueStore
from dcrouter.logsetup import get_logger
from dcrouter.redisaddr import RedisAddress
from dcrouter.queue.item import (
    DEFERRED, DELIVERED, FAILED, PENDING, PROCESSING, STATUSES, WAITING, QueueItem,
)

log = get_logger("email.queue")

_ADD = """
local p = ARGV[1]
local ref = ARGV[2]
local n = tonumber(ARGV[4])
local w = 7
if redis.call('EXISTS', p..':body:'..ref) == 0 then
  redis.call('SET', p..':body:'..ref, ARGV[3])
end
for i = 0, n - 1 do
  if redis.call('HEXISTS', p..':items', ARGV[5 + i * w]) == 1 then
    return redis.error_reply('queue item '..ARGV[5 + i * w]..' exists already')
  end
end
redis.call('INCRBY', p..':bodyref:'..ref, n)
for i = 0, n - 1 do
  local b = 5 + i * w
  local id = ARGV[b]
  redis.call('HSET', p..':items', id, ARGV[b + 1])
  redis.call('ZADD', p..':due', ARGV[b + 2], id)
  redis.call('ZADD', p..':ids', 0, id)
  redis.call('HINCRBY', p..':dest', ARGV[b + 3], 1)
  redis.call('HSET', p..':wstatus', id, ARGV[b + 4])
  redis.call('HINCRBY', p..':counts', ARGV[b + 4], 1)
  redis.call('HINCRBY', p..':counts', 'bytes', ARGV[b + 5])
  redis.call('ZADD', p..':created', ARGV[b + 6], id)
end
return n
"""

#: Lua: Redis's clock in seconds (effects replication, so TIME may precede writes).
_TIME = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local snow = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

_CLAIM = _TIME + """
local p = ARGV[1]
local now = tonumber(ARGV[2])
local expired = redis.call('ZRANGEBYSCORE', p..':lease', '-inf', snow, 'LIMIT', 0, 1000)
for _, id in ipairs(expired) do
  redis.call('ZREM', p..':lease', id)
  redis.call('HDEL', p..':owner', id)
  if redis.call('HEXISTS', p..':items', id) == 1 then
    if redis.call('ZADD', p..':due', now, id) == 1 then
      local st = redis.call('HGET', p..':wstatus', id)
      if st then redis.call('HINCRBY', p..':counts', st, 1) end
    end
  end
end
local ids = redis.call('ZRANGEBYSCORE', p..':due', '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
local expiry = snow + tonumber(ARGV[5])
for _, id in ipairs(ids) do
  redis.call('ZREM', p..':due', id)
  local data = redis.call('HGET', p..':items', id)
  if data then
    local st = redis.call('HGET', p..':wstatus', id)
    if st then redis.call('HINCRBY', p..':counts', st, -1) end
    redis.call('ZADD', p..':lease', expiry, id)
    redis.call('HSET', p..':owner', id, ARGV[4])
    table.insert(out, data)
  end
end
return out
"""

_UPDATE = """
local p = ARGV[1]
local id = ARGV[2]
if (redis.call('HGET', p..':owner', id) or '') ~= ARGV[3] then return 0 end
if redis.call('HEXISTS', p..':items', id) == 0 then return 0 end
redis.call('HSET', p..':items', id, ARGV[4])
redis.call('ZREM', p..':lease', id)
redis.call('HDEL', p..':owner', id)
if redis.call('ZADD', p..':due', ARGV[5], id) == 0 then
  local old = redis.call('HGET', p..':wstatus', id)
  if old then redis.call('HINCRBY', p..':counts', old, -1) end
end
redis.call('HSET', p..':wstatus', id, ARGV[6])
redis.call('HINCRBY', p..':counts', ARGV[6], 1)
return 1
"""

_REMOVE = """
local p = ARGV[1]
local id = ARGV[2]
if (redis.call('HGET', p..':owner', id) or '') ~= ARGV[6] then return 0 end
if redis.call('HDEL', p..':items', id) == 0 then return 0 end
local st = redis.call('HGET', p..':wstatus', id)
if redis.call('ZREM', p..':due', id) == 1 and st then
  redis.call('HINCRBY', p..':counts', st, -1)
end
redis.call('HDEL', p..':wstatus', id)
redis.call('ZREM', p..':created', id)
redis.call('HINCRBY', p..':counts', 'bytes', -tonumber(ARGV[5]))
redis.call('ZREM', p..':lease', id)
redis.call('ZREM', p..':ids', id)
redis.call('HDEL', p..':owner', id)
if redis.call('HINCRBY', p..':dest', ARGV[3], -1) <= 0 then
  redis.call('HDEL', p..':dest', ARGV[3])
end
if redis.call('DECR', p..':bodyref:'..ARGV[4]) <= 0 then
  redis.call('DEL', p..':body:'..ARGV[4], p..':bodyref:'..ARGV[4])
end
return 1
"""

#: Renews the leases ARGV[2] holds on the ids ARGV[4..] to Redis time + ARGV[3] seconds: one
#: HMGET and one ZADD per 1,000 ids, whatever the count; returns the ids it no longer holds.
_RENEW = _TIME + """
local p = ARGV[1]
local expiry = snow + tonumber(ARGV[3])
local lost = {}
local i = 4
while i <= #ARGV do
  local j = math.min(i + 999, #ARGV)
  local ids = {}
  for k = i, j do ids[#ids + 1] = ARGV[k] end
  local owners = redis.call('HMGET', p..':owner', unpack(ids))
  local args = {}
  for k, id in ipairs(ids) do
    if owners[k] == ARGV[2] then
      args[#args + 1] = expiry
      args[#args + 1] = id
    else
      lost[#lost + 1] = id
    end
  end
  if #args > 0 then redis.call('ZADD', p..':lease', 'XX', unpack(args)) end
  i = j + 1
end
return lost
"""

#: Gives the leases ARGV[2] holds on ARGV[4..] back: due at ARGV[3], nothing else changed.
_GIVE_BACK = """
local p = ARGV[1]
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', p..':owner', id) == ARGV[2] then
    redis.call('ZREM', p..':lease', id)
    redis.call('HDEL', p..':owner', id)
    if redis.call('HEXISTS', p..':items', id) == 1 and
        redis.call('ZADD', p..':due', ARGV[3], id) == 1 then
      local st = redis.call('HGET', p..':wstatus', id)
      if st then redis.call('HINCRBY', p..':counts', st, 1) end
    end
    n = n + 1
  end
end
return n
"""

_RESCHEDULE = """
local p = ARGV[1]
local wanted = {}
for i = 3, #ARGV do wanted[ARGV[i]] = true end
local ids = redis.call('ZRANGEBYSCORE', p..':due', '('..ARGV[2], '+inf')
local n = 0
for _, id in ipairs(ids) do
  local st = redis.call('HGET', p..':wstatus', id)
  if (not st) or wanted[st] then
    redis.call('ZADD', p..':due', ARGV[2], id)
    n = n + 1
  end
end
return n
"""

_STATS = """
local p = ARGV[1]
local oldest = redis.call('ZRANGE', p..':created', 0, 0, 'WITHSCORES')
return {redis.call('HLEN', p..':items'), redis.call('ZCARD', p..':lease'),
        redis.call('HGETALL', p..':counts'), redis.call('HGETALL', p..':dest'),
        oldest[2] or ''}
"""

#: Rebuilds P:counts, P:wstatus and P:created from the items, once (queues of older versions).
_REBUILD = """
local p = ARGV[1]
if redis.call('HEXISTS', p..':counts', 'v') == 1 then return 0 end
redis.call('DEL', p..':counts', p..':wstatus', p..':created')
redis.call('HSET', p..':counts', 'v', 1, 'pending', 0, 'deferred', 0, 'bytes', 0)
local ids = redis.call('HKEYS', p..':items')
for _, id in ipairs(ids) do
  local ok, item = pcall(cjson.decode, redis.call('HGET', p..':items', id))
  if ok and type(item) == 'table' then
    local st = item['status']
    if st ~= 'deferred' then st = 'pending' end
    redis.call('HSET', p..':wstatus', id, st)
    if redis.call('ZSCORE', p..':due', id) then
      redis.call('HINCRBY', p..':counts', st, 1)
    end
    redis.call('HINCRBY', p..':counts', 'bytes', tonumber(item['size']) or 0)
    redis.call('ZADD', p..':created', tonumber(item['created']) or 0, id)
  end
end
return #ids
"""


#: Rewrites one item from queue format 1 if it is still the value read (others may change it).
_REWRITE = """
local p = ARGV[1]
if redis.call('HGET', p..':items', ARGV[2]) == ARGV[3] then
  redis.call('HSET', p..':items', ARGV[2], ARGV[4])
  return 1
end
return 0
"""


def _s(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@implementer(IQueueStore)
class RedisStore:
    """Items, bodies and schedule in Redis; leases let several workers share them."""

    durable = True
    shared = True
    #: Seconds between re-reads of the cached counts (they include other nodes' changes).
    refresh_interval = 1.0

    def __init__(self, connect: Callable[[], defer.Deferred], prefix: str = "dcrouter",
                 description: str = "") -> None:
        self._connect = connect
        self.prefix = prefix
        self.description = description
        self.redis: Any = None
        self._cache: dict[str, Any] = _empty_cache()
        self._refresher: Any = None
        self._refresh_failed = False

    @classmethod
    def from_url(cls, url: str, prefix: str = "dcrouter") -> "RedisStore":
        """A store for ``redis://host:port/db`` or ``unix:///path?db=N``."""
        address = RedisAddress.parse(url)
        return cls(lambda: address.connect(reconnect=True, raw=True), prefix, address.label)

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    @defer.inlineCallbacks
    def open(self) -> Any:
        """Connect; nothing to recover locally (Redis holds everything)."""
        self.redis = yield self._connect()
        rebuilt = yield self._eval(_REBUILD, [self.prefix])
        if int(rebuilt or 0):
            log.info("redis queue {where}: status counters rebuilt for {count} items",
                     where=self.description, count=int(rebuilt))
        yield self._upgrade_format()
        yield self.refresh()
        log.info("redis queue {where} opened: {count} items", where=self.description,
                 count=self._cache["size"])
        self._start_refresher()
        return []

    @defer.inlineCallbacks
    def _upgrade_format(self) -> Any:
        """Rewrite items of queue format 1 (which held credentials) once, in HSCAN batches.

        ``P:format`` marks a queue whose items have been rewritten; an item a
        node of the old version writes later is still read (and rewritten by its
        next update).
        """
        marker = self._key("format")
        done = yield self.redis.get(marker)
        if done is not None and _s(done) == "2":
            return 0
        cursor, count = "0", 0
        while True:
            cursor, rows = yield self.redis.execute_command(
                "HSCAN", self._key("items"), cursor, "COUNT", 500)
            cursor = _s(cursor)
            pairs = list(rows or [])
            for i in range(0, len(pairs) - 1, 2):
                item_id, data = pairs[i], pairs[i + 1]
                raw = data if isinstance(data, bytes) else _s(data).encode("utf-8")
                if not raw.startswith(b'{"v":1,'):
                    continue
                try:
                    new = QueueItem.from_json(raw).to_json()
                except (ValueError, KeyError, TypeError) as e:
                    log.error("unreadable item in Redis: {error}", error=str(e))
                    continue
                count += int((yield self._eval(_REWRITE, [self.prefix, _s(item_id), raw, new]))
                             or 0)
            if cursor == "0":
                break
        yield self.redis.set(marker, "2")
        if count:
            log.info("redis queue {where}: {count} items of queue format 1 rewritten (the "
                     "destination is now resolved at delivery; stored credentials dropped)",
                     where=self.description, count=count, event="queue.upgraded")
        return count

    def _start_refresher(self) -> None:
        from twisted.internet import task
        if self.refresh_interval <= 0:
            return
        self._refresher = task.LoopingCall(self._refresh_quietly)
        self._refresher.start(self.refresh_interval, now=False)

    def _refresh_quietly(self) -> Any:
        if self.redis is None:
            return None

        def ok(_: Any) -> None:
            self._refresh_failed = False

        def failed(failure: Any) -> None:
            if not self._refresh_failed:  # log once per outage
                log.warn("redis queue {where}: cannot read the counts: {error}",
                         where=self.description, error=str(failure.value))
            self._refresh_failed = True
        return self.refresh().addCallbacks(ok, failed)

    @defer.inlineCallbacks
    def refresh(self) -> Any:
        """Re-read the counters behind ``count`` and ``stats`` (one script, no scan)."""
        size, lease, counts, dest, oldest = yield self._eval(_STATS, [self.prefix])
        self._cache = {"size": int(size), "lease": int(lease), "counts": _pairs(counts),
                       "dest": _pairs(dest),
                       "oldest": float(oldest) if _s(oldest) else None}

    def _eval(self, script: str, args: list[Any]) -> defer.Deferred:
        return self.redis.eval(script, [], args)

    @defer.inlineCallbacks
    def add(self, items: list[QueueItem], body_path: str) -> Any:
        """Read the body file, store body and items in one script, delete the file."""
        from twisted.internet import threads
        if not items:
            return None

        def read() -> bytes:
            try:
                with open(body_path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise QueueError(f"cannot take over the message file: {e}") from None
        body = yield threads.deferToThread(read)
        args: list[Any] = [self.prefix, items[0].body_ref, body, len(items)]
        for item in items:
            args += [item.id, item.to_json(), repr(item.next_attempt), item.destination,
                     item.status if item.status in WAITING else PENDING, item.size,
                     repr(item.created_at)]
        yield self._eval(_ADD, args)
        self._cache["size"] += len(items)
        counts = self._cache["counts"]
        for item in items:
            dest = self._cache["dest"]
            dest[item.destination] = dest.get(item.destination, 0) + 1
            status = item.status if item.status in WAITING else PENDING
            counts[status] = counts.get(status, 0) + 1
            counts["bytes"] = counts.get("bytes", 0) + item.size
        yield threads.deferToThread(_unlink, body_path)
        return None

    @defer.inlineCallbacks
    def claim_due(self, now: float, limit: int, owner: str, lease_seconds: float,
                  accept: Callable[[QueueItem], bool] = lambda item: True) -> Any:
        """Lease up to ``limit`` items due at ``now`` for ``lease_seconds`` of Redis time
        (expired leases are reclaimed first)."""
        rows = yield self._eval(_CLAIM, [self.prefix, repr(now), limit, owner,
                                         repr(lease_seconds)])
        items = []
        for row in rows or []:
            try:
                item = QueueItem.from_json(row)
            except (ValueError, KeyError, TypeError) as e:
                log.error("unreadable item in Redis: {error}", error=str(e))
                continue
            item.status = PROCESSING
            item.lease_owner = owner
            items.append(item)
        yield self.refresh()
        return items

    def renew(self, items: list[QueueItem], owner: str, seconds: float) -> defer.Deferred:
        """Extend the leases ``owner`` holds on ``items`` to ``seconds`` from now (one
        script); fires with the ids it no longer holds (taken by another worker, or gone)."""
        if not items:
            return defer.succeed([])
        d = self._eval(_RENEW, [self.prefix, owner, repr(seconds)] + [item.id for item in items])
        return d.addCallback(lambda lost: [_s(i) for i in lost or []])

    def give_back(self, items: list[QueueItem], owner: str, when: float) -> defer.Deferred:
        """Drop the leases ``owner`` holds on ``items``, due again at ``when`` (a node that
        stops hands its work to the others at once); fires with the count."""
        if not items:
            return defer.succeed(0)
        return self._eval(_GIVE_BACK, [self.prefix, owner, repr(when)] +
                          [item.id for item in items]).addCallback(int)

    def update(self, item: QueueItem) -> defer.Deferred:
        """Store a waiting item back (drops the lease); fires with 0, changing nothing,
        when ``item.lease_owner`` does not hold it (another worker does, or nobody while
        the item says it is leased)."""
        owner = item.lease_owner
        item.lease_owner = ""
        if item.status not in WAITING:
            return defer.succeed(0)
        return self._eval(_UPDATE, [self.prefix, item.id, owner, item.to_json(),
                                    repr(item.next_attempt), item.status])

    def remove(self, item: QueueItem) -> defer.Deferred:
        """Delete an item (and its body when unused); fires with 0, changing nothing, when
        ``item.lease_owner`` does not hold it or it is gone."""
        owner, item.lease_owner = item.lease_owner, ""
        d = self._eval(_REMOVE, [self.prefix, item.id, item.destination, item.body_ref,
                                 item.size, owner])

        def done(removed: Any) -> Any:
            if int(removed or 0):
                self._cache["size"] = max(0, self._cache["size"] - 1)
            return removed
        return d.addCallback(done)

    @defer.inlineCallbacks
    def read_body(self, item: QueueItem) -> Any:
        """The body bytes."""
        body = yield self.redis.get(self._key(f"body:{item.body_ref}"))
        if body is None:
            raise QueueError(f"body of {item.id} is missing in Redis")
        return body if isinstance(body, bytes) else body.encode("utf-8")

    @defer.inlineCallbacks
    def get(self, item_id: str) -> Any:
        """The item (status processing while leased) or None."""
        data = yield self.redis.hget(self._key("items"), item_id)
        if data is None:
            return None
        item = QueueItem.from_json(data)
        leased = yield self.redis.execute_command("ZSCORE", self._key("lease"), item_id)
        if leased is not None:
            item.status = PROCESSING
            owner = yield self.redis.hget(self._key("owner"), item_id)
            item.lease_owner = _s(owner) if owner is not None else ""
        return item

    @defer.inlineCallbacks
    def list(self, status: Optional[str] = None, limit: int = 100,
             cursor: Optional[str] = None) -> Any:
        """Items by id after ``cursor``; fires with (items, next cursor)."""
        if status is not None and status not in STATUSES:
            raise QueueError(f"unknown status {status!r}")
        start = f"({cursor}" if cursor else "-"
        page: list[QueueItem] = []
        more = False
        while True:
            ids = yield self.redis.execute_command("ZRANGEBYLEX", self._key("ids"), start, "+",
                                                   "LIMIT", 0, 500)
            if not ids:
                break
            for raw in ids:
                item = yield self.get(_s(raw))
                if item is None or (status is not None and item.status != status):
                    continue
                if len(page) == limit:
                    more = True
                    break
                page.append(item)
            if more or len(ids) < 500:
                break
            start = "(" + _s(ids[-1])
        return page, (page[-1].id if more and page else None)

    def reschedule(self, when: float, statuses: tuple[str, ...] = WAITING) -> defer.Deferred:
        """Every waiting item with a status in ``statuses`` due at ``when``."""
        wanted = [s for s in statuses if s in WAITING]
        if not wanted:
            return defer.succeed(0)
        return self._eval(_RESCHEDULE, [self.prefix, repr(when)] + wanted).addCallback(int)

    def count(self, destination: Optional[str] = None) -> int:
        """Cached counts (refreshed on every claim)."""
        if destination is None:
            return int(self._cache["size"])
        return int(self._cache["dest"].get(destination, 0))

    def stats(self, top: int = 10) -> dict[str, Any]:
        """Cached figures (see :meth:`refresh`): counts by status as the local stores give
        them, top destinations, oldest item, bytes."""
        dest = sorted(self._cache["dest"].items(), key=lambda kv: -kv[1])[:top]
        counts = self._cache["counts"]
        return {
            "size": self._cache["size"],
            "by_status": {PENDING: max(0, counts.get(PENDING, 0)),
                          PROCESSING: self._cache["lease"],
                          DEFERRED: max(0, counts.get(DEFERRED, 0)),
                          DELIVERED: 0, FAILED: 0},
            "by_destination": dict(dest),
            "oldest_created_at": self._cache["oldest"],
            "bytes": max(0, counts.get("bytes", 0)),
        }

    def close(self) -> defer.Deferred:
        """Stop the refresher and disconnect."""
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        self._refresher = None
        if self.redis is None:
            return defer.succeed(None)
        redis, self.redis = self.redis, None
        return defer.maybeDeferred(redis.disconnect)


def _empty_cache() -> dict[str, Any]:
    return {"size": 0, "lease": 0, "counts": {}, "dest": {}, "oldest": None}


def _pairs(flat: Any) -> dict[str, int]:
    """HGETALL through EVAL (a flat list) or directly (a dict), as {str: int}."""
    if isinstance(flat, dict):
        return {_s(k): int(v) for k, v in flat.items()}
    items = list(flat or [])
    return {_s(items[i]): int(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _unlink(path: str) -> None:
    import os
    try:
        os.unlink(path)
    except OSError:
        pass
