"""The suppression list: recipients that hard-bounced, refused at RCPT until they expire.

Entries live in memory (``is_suppressed`` is synchronous: the SMTP server asks
it for every RCPT), are saved to ``state_dir/suppression.json`` (written in a
thread, atomically) and, with the Redis queue store, mirrored in a Redis hash
so every node shares them.

Worker processes of one machine (``router.workers``) each write their own
file, ``suppression-worker-<i>.json``, and read the others' every few seconds
(``sync``), so no write is lost and a bounce seen by one worker suppresses in
all. A lifted suppression is kept as a dated tombstone until it would have
expired, so the newest of "added" and "removed" wins everywhere.
"""

from __future__ import annotations

import glob
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
        #: Lifted suppressions: address -> {"removed": time, "expires": time}.
        self._removed: dict[str, dict[str, Any]] = {}
        self._saving = False
        self._dirty = False
        self._peer_mtimes: dict[str, float] = {}

    @property
    def redis(self) -> Any:
        """The Redis connection of the shared queue store, if any (once connected)."""
        return self._redis() if self._redis is not None else None

    def load(self) -> defer.Deferred:
        """Read the saved list (own file and the other workers' files, then Redis)."""
        d: defer.Deferred = defer.succeed(None)
        if self.path:
            d = threads.deferToThread(self._read_changed_files)
            d.addCallback(self._merge_files)
        redis = self.redis
        if redis is not None:
            d.addCallback(lambda _: redis.hgetall(self.redis_key))
            d.addCallback(lambda data: self._merge({
                (k.decode() if isinstance(k, bytes) else k): json.loads(v)
                for k, v in (data or {}).items()}))
        d.addErrback(lambda f: log.failure("could not load the suppression list", f))
        return d

    def sync(self) -> defer.Deferred:
        """Merge what other workers wrote since the last look (files read in a thread)."""
        if not self.path:
            return defer.succeed(None)
        d = threads.deferToThread(self._read_changed_files, peers_only=True)
        d.addCallback(self._merge_files)
        d.addErrback(lambda f: log.failure("could not read the other suppression files", f))
        return d

    def _files(self) -> list[str]:
        """Own file and every sibling ``suppression*.json`` (other workers, older layouts)."""
        directory = os.path.dirname(self.path) or "."
        found = set(glob.glob(os.path.join(glob.escape(directory), "suppression*.json")))
        found.add(self.path)
        return sorted(found)

    def _read_changed_files(self, peers_only: bool = False) -> list[dict[str, Any]]:
        out = []
        for path in self._files():
            if peers_only and path == self.path:
                continue
            try:
                mtime = os.stat(path).st_mtime
                if peers_only and self._peer_mtimes.get(path) == mtime:
                    continue
                with open(path, "rb") as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                if not isinstance(e, FileNotFoundError):
                    log.warn("suppression file {path} unreadable: {error}", path=path,
                             error=str(e))
                continue
            self._peer_mtimes[path] = mtime
            if isinstance(data, dict):
                out.append(data)
        return out

    def _merge_files(self, files: list[dict[str, Any]]) -> None:
        changed = False
        for data in files:
            changed = self._merge(data) or changed
        if changed:
            self._save()

    @staticmethod
    def _stamp(record: Optional[dict[str, Any]]) -> float:
        if record is None:
            return 0.0
        return float(record.get("removed", record.get("added", 0)))

    def _merge(self, data: dict[str, Any]) -> bool:
        """Take every record newer than what is known of its address; True if any."""
        now = time.time()
        changed = False
        for address, record in data.items():
            if not isinstance(record, dict) or float(record.get("expires", 0)) <= now:
                continue
            key = normalize(address)
            known = self._entries.get(key) or self._removed.get(key)
            if self._stamp(record) <= self._stamp(known):
                continue
            if "removed" in record:
                self._entries.pop(key, None)
                self._removed[key] = record
            else:
                self._removed.pop(key, None)
                self._entries[key] = record
            changed = True
        return changed

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
        self._removed.pop(key, None)
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
        entry = self._entries.pop(key, None)
        found = entry is not None
        if entry is not None:
            # a dated tombstone, so other workers' files do not bring the entry back
            self._removed[key] = {"removed": max(time.time(), self._stamp(entry) + 1e-6),
                                  "expires": entry["expires"]}
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
        now = time.time()
        records = {k: v for k, v in self._removed.items() if v["expires"] > now}
        records.update(self._entries)
        snapshot = json.dumps(records).encode("utf-8")
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
