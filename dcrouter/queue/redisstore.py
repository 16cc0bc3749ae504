"""Queue storage in Redis, shared by several dcrouter processes (txredisapi).

Keys (``P`` is ``redis_prefix``)::

    P:items           hash   item id -> item JSON
    P:due             zset   item id, score = next attempt (epoch seconds)
    P:lease           zset   item id, score = lease expiry
    P:owner           hash   item id -> worker holding the lease
    P:ids             zset   every item id, score 0 (lexicographic listing)
    P:dest            hash   destination -> item count
    P:body:<ref>      string message body
    P:bodyref:<ref>   int    items using that body

Every change is one Lua script, so it is atomic: ``claim`` first returns
expired leases to ``P:due`` (a worker that died loses its items), then moves
due ids to ``P:lease`` with an expiry and returns them - each item to exactly
one worker at a time; workers renew the leases of items in delivery.  Delivery
is at-least-once: a worker whose lease expired mid-delivery may deliver an item
that another worker delivers as well.  Redis's own persistence settings
(``appendonly``/``appendfsync``) decide what survives a Redis crash.
"""

from __future__ import annotations

import time
import urllib.parse
from typing import Any, Callable, Optional

from twisted.internet import defer
from zope.interface import implementer

from dcrouter.errors import QueueError
from dcrouter.interfaces import IQueueStore
from dcrouter.logsetup import get_logger
from dcrouter.queue.item import PROCESSING, STATUSES, WAITING, QueueItem

log = get_logger("email.queue")

_ADD = """
local p = ARGV[1]
local ref = ARGV[2]
local n = tonumber(ARGV[4])
if redis.call('EXISTS', p..':body:'..ref) == 0 then
  redis.call('SET', p..':body:'..ref, ARGV[3])
end
for i = 0, n - 1 do
  if redis.call('HEXISTS', p..':items', ARGV[5 + i * 4]) == 1 then
    return redis.error_reply('queue item '..ARGV[5 + i * 4]..' exists already')
  end
end
redis.call('INCRBY', p..':bodyref:'..ref, n)
for i = 0, n - 1 do
  local id = ARGV[5 + i * 4]
  redis.call('HSET', p..':items', id, ARGV[6 + i * 4])
  redis.call('ZADD', p..':due', ARGV[7 + i * 4], id)
  redis.call('ZADD', p..':ids', 0, id)
  redis.call('HINCRBY', p..':dest', ARGV[8 + i * 4], 1)
end
return n
"""

_CLAIM = """
local p = ARGV[1]
local now = tonumber(ARGV[2])
local expired = redis.call('ZRANGEBYSCORE', p..':lease', '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(expired) do
  redis.call('ZREM', p..':lease', id)
  redis.call('HDEL', p..':owner', id)
  if redis.call('HEXISTS', p..':items', id) == 1 then
    redis.call('ZADD', p..':due', now, id)
  end
end
local ids = redis.call('ZRANGEBYSCORE', p..':due', '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', p..':due', id)
  local data = redis.call('HGET', p..':items', id)
  if data then
    redis.call('ZADD', p..':lease', ARGV[5], id)
    redis.call('HSET', p..':owner', id, ARGV[4])
    table.insert(out, data)
  end
end
return out
"""

_UPDATE = """
local p = ARGV[1]
local id = ARGV[2]
local cur = redis.call('HGET', p..':owner', id)
if cur and cur ~= ARGV[3] then return 0 end
if redis.call('HEXISTS', p..':items', id) == 0 then return 0 end
redis.call('HSET', p..':items', id, ARGV[4])
redis.call('ZREM', p..':lease', id)
redis.call('HDEL', p..':owner', id)
redis.call('ZADD', p..':due', ARGV[5], id)
return 1
"""

_REMOVE = """
local p = ARGV[1]
local id = ARGV[2]
if redis.call('HDEL', p..':items', id) == 0 then return 0 end
redis.call('ZREM', p..':due', id)
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

_RENEW = """
local p = ARGV[1]
local n = 0
for i = 4, #ARGV do
  if redis.call('HGET', p..':owner', ARGV[i]) == ARGV[2] then
    redis.call('ZADD', p..':lease', 'XX', ARGV[3], ARGV[i])
    n = n + 1
  end
end
return n
"""

_RESCHEDULE = """
local p = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', p..':due', '('..ARGV[2], '+inf')
for _, id in ipairs(ids) do
  redis.call('ZADD', p..':due', ARGV[2], id)
end
return #ids
"""


def _s(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@implementer(IQueueStore)
class RedisStore:
    """Items, bodies and schedule in Redis; leases let several workers share them."""

    durable = True
    shared = True

    def __init__(self, connect: Callable[[], defer.Deferred], prefix: str = "dcrouter",
                 description: str = "") -> None:
        self._connect = connect
        self.prefix = prefix
        self.description = description
        self.redis: Any = None
        self._cache: dict[str, Any] = {"size": 0, "due": 0, "lease": 0, "dest": {}}

    @classmethod
    def from_url(cls, url: str, prefix: str = "dcrouter") -> "RedisStore":
        """A store for ``redis://host:port/db`` or ``unix:///path?db=N``."""
        import txredisapi
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme == "unix":
            query = urllib.parse.parse_qs(parsed.query)
            db = int(query.get("db", ["0"])[0])
            return cls(lambda: txredisapi.UnixConnection(parsed.path, dbid=db, charset=None,
                                                         convertNumbers=False, reconnect=True),
                       prefix, url)
        db = int((parsed.path or "/0").strip("/") or 0)
        return cls(lambda: txredisapi.Connection(parsed.hostname or "127.0.0.1",
                                                 parsed.port or 6379, dbid=db, charset=None,
                                                 convertNumbers=False, reconnect=True,
                                                 password=parsed.password),
                   prefix, f"{parsed.hostname}:{parsed.port or 6379}/{db}")

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    @defer.inlineCallbacks
    def open(self) -> Any:
        """Connect; nothing to recover locally (Redis holds everything)."""
        self.redis = yield self._connect()
        yield self.refresh()
        log.info("redis queue {where} opened: {count} items", where=self.description,
                 count=self._cache["size"])
        return []

    @defer.inlineCallbacks
    def refresh(self) -> Any:
        """Re-read the counters behind ``count`` and ``stats``."""
        size = yield self.redis.hlen(self._key("items"))
        due = yield self.redis.zcard(self._key("due"))
        lease = yield self.redis.zcard(self._key("lease"))
        dest = yield self.redis.hgetall(self._key("dest"))
        self._cache = {"size": int(size), "due": int(due), "lease": int(lease),
                       "dest": {_s(k): int(v) for k, v in (dest or {}).items()}}

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
            args += [item.id, item.to_json(), repr(item.next_attempt), item.destination]
        yield self._eval(_ADD, args)
        self._cache["size"] += len(items)
        for item in items:
            dest = self._cache["dest"]
            dest[item.destination] = dest.get(item.destination, 0) + 1
        yield threads.deferToThread(_unlink, body_path)
        return None

    @defer.inlineCallbacks
    def claim_due(self, now: float, limit: int, owner: str, lease_seconds: float,
                  accept: Callable[[QueueItem], bool] = lambda item: True) -> Any:
        """Lease up to ``limit`` due items (expired leases are reclaimed first)."""
        rows = yield self._eval(_CLAIM, [self.prefix, repr(now), limit, owner,
                                         repr(now + lease_seconds)])
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
        """Extend the leases this worker still holds."""
        if not items:
            return defer.succeed(0)
        return self._eval(_RENEW, [self.prefix, owner, repr(time.time() + seconds)] +
                          [item.id for item in items])

    def update(self, item: QueueItem) -> defer.Deferred:
        """Store a waiting item back (drops the lease); ignored if another worker holds it."""
        owner = item.lease_owner
        item.lease_owner = ""
        if item.status not in WAITING:
            return defer.succeed(0)
        return self._eval(_UPDATE, [self.prefix, item.id, owner, item.to_json(),
                                    repr(item.next_attempt)])

    def remove(self, item: QueueItem) -> defer.Deferred:
        """Delete an item (and its body when unused)."""
        d = self._eval(_REMOVE, [self.prefix, item.id, item.destination, item.body_ref])

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
        """Every waiting item due at ``when`` (Redis does not tell pending from deferred)."""
        return self._eval(_RESCHEDULE, [self.prefix, repr(when)]).addCallback(int)

    def count(self, destination: Optional[str] = None) -> int:
        """Cached counts (refreshed on every claim)."""
        if destination is None:
            return int(self._cache["size"])
        return int(self._cache["dest"].get(destination, 0))

    def stats(self, top: int = 10) -> dict[str, Any]:
        """Cached figures: queued (due), processing (leased), top destinations."""
        dest = sorted(self._cache["dest"].items(), key=lambda kv: -kv[1])[:top]
        return {
            "size": self._cache["size"],
            "by_status": {"pending": self._cache["due"], "processing": self._cache["lease"],
                          "deferred": 0, "delivered": 0, "failed": 0},
            "by_destination": dict(dest),
            "oldest_created_at": None,
            "bytes": 0,
        }

    def close(self) -> defer.Deferred:
        """Disconnect."""
        if self.redis is None:
            return defer.succeed(None)
        redis, self.redis = self.redis, None
        return defer.maybeDeferred(redis.disconnect)


def _unlink(path: str) -> None:
    import os
    try:
        os.unlink(path)
    except OSError:
        pass
