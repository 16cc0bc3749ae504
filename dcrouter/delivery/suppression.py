"""The suppression list: recipients that hard-bounced, refused at RCPT until they expire.

Entries live in memory (``is_suppressed`` is synchronous: the SMTP server asks
it for every RCPT), are saved to ``state_dir/suppression.json`` (written in a
thread, atomically) and, with the Redis queue store, mirrored in a Redis hash
so every node shares them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

from twisted.internet import defer, threads

from dcrouter.logsetup import get_logger

log = get_logger("email.suppression")


def normalize(address: str) -> str:
    """Addresses compare case-insensitively, without angle brackets."""
    return address.strip().strip("<>").lower()


class SuppressionList:
    """Hard-bounced recipients with an expiry (``ttl`` seconds; 0 disables the list)."""

    def __init__(self, path: str = "", ttl: float = 2592000.0,
                 redis: Optional[Callable[[], Any]] = None, redis_key: str = "") -> None:
        self.path = path
        self.ttl = ttl
        self._redis = redis
        self.redis_key = redis_key
        self._entries: dict[str, dict[str, Any]] = {}
        self._saving = False
        self._dirty = False

    @property
    def redis(self) -> Any:
        """The Redis connection of the shared queue store, if any (once connected)."""
        return self._redis() if self._redis is not None else None

    def load(self) -> defer.Deferred:
        """Read the saved list (file, then Redis)."""
        d: defer.Deferred = defer.succeed(None)
        if self.path and os.path.exists(self.path):
            d = threads.deferToThread(self._read_file)
            d.addCallback(self._merge)
        redis = self.redis
        if redis is not None:
            d.addCallback(lambda _: redis.hgetall(self.redis_key))
            d.addCallback(lambda data: self._merge({
                (k.decode() if isinstance(k, bytes) else k): json.loads(v)
                for k, v in (data or {}).items()}))
        d.addErrback(lambda f: log.failure("could not load the suppression list", f))
        return d

    def _read_file(self) -> dict[str, Any]:
        with open(self.path, "rb") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}

    def _merge(self, data: dict[str, Any]) -> None:
        now = time.time()
        for address, entry in data.items():
            if isinstance(entry, dict) and float(entry.get("expires", 0)) > now:
                self._entries[normalize(address)] = entry

    def is_suppressed(self, address: str) -> bool:
        """True when ``address`` hard-bounced recently (synchronous)."""
        if self.ttl <= 0:
            return False
        entry = self._entries.get(normalize(address))
        if entry is None:
            return False
        if entry["expires"] <= time.time():
            self._entries.pop(normalize(address), None)
            return False
        return True

    def add(self, address: str, reason: str = "", ttl: Optional[float] = None) -> None:
        """Suppress ``address`` for ``ttl`` seconds (default: the list's ttl)."""
        ttl = self.ttl if ttl is None else ttl
        if ttl <= 0:
            return
        now = time.time()
        key = normalize(address)
        entry = {"reason": reason[:300], "added": now, "expires": now + ttl}
        self._entries[key] = entry
        log.info("suppressing {address} for {ttl:.0f}s: {reason}", address=key, ttl=ttl,
                 reason=reason[:300])
        redis = self.redis
        if redis is not None:
            redis.hset(self.redis_key, key, json.dumps(entry)).addErrback(
                lambda f: log.failure("could not store suppression in Redis", f))
        self._save()

    def remove(self, address: str) -> bool:
        """Lift a suppression; True if there was one."""
        key = normalize(address)
        found = self._entries.pop(key, None) is not None
        redis = self.redis
        if redis is not None:
            redis.hdel(self.redis_key, key).addErrback(
                lambda f: log.failure("could not remove suppression from Redis", f))
        if found:
            self._save()
        return found

    def list(self) -> list[dict[str, Any]]:
        """Current entries: address, reason, added, expires."""
        now = time.time()
        return [dict(entry, address=address) for address, entry in sorted(self._entries.items())
                if entry["expires"] > now]

    def __len__(self) -> int:
        return len(self.list())

    def _save(self) -> None:
        if not self.path:
            return
        if self._saving:
            self._dirty = True
            return
        self._saving = True
        snapshot = json.dumps(self._entries).encode("utf-8")
        d = threads.deferToThread(self._write, snapshot)

        def done(_: Any) -> None:
            self._saving = False
            if self._dirty:
                self._dirty = False
                self._save()
        d.addErrback(lambda f: log.failure("could not save the suppression list", f))
        d.addBoth(done)

    def _write(self, data: bytes) -> None:
        tmp = self.path + ".tmp"
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
