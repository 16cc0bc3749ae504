"""Disk-queue shards of worker processes: one directory per worker, adopted when orphaned.

With ``router.workers`` = N > 1 every worker process owns one shard of the
disk queue, ``<queue dir>/worker-<i>`` (each a complete
:class:`~dcrouter.queue.disk.DiskStore` directory with its own lock file, so
exactly one process owns it; a respawned worker takes it over after the
kernel released the dead process's lock).  With one worker the queue
directory itself is the store, as it always was.

Shards nobody owns any more are *adopted* at start, never left behind:

* workers lowered from M to N: worker ``i`` adopts ``worker-<j>`` for every
  ``j >= N`` with ``j % N == i``;
* from several workers back to one: the single process adopts every
  ``worker-<j>``;
* from one process to several: worker 0 adopts the un-sharded store in the
  queue directory itself.

Adoption copies each live item's body into the adopter's store, appends the
item records to its journal (one write, one fsync) and then removes the old
shard.  A crash in between adopts the same items again at the next start
(same ids: records replace each other), so nothing is lost; an item already
delivered in between may be delivered twice - the queue's usual
at-least-once promise.  A shard still locked by a live process is skipped
with an error in the log.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Optional

from dcrouter.errors import QueueError
from dcrouter.logsetup import get_logger
from dcrouter.queue.disk import (
    DirectoryLock, DiskStore, Journal, _shard, current_record, encode_put, fsync_dir, fsync_file,
)
from dcrouter.queue.item import PENDING, PROCESSING

log = get_logger("email.queue")

_SHARD_NAME = re.compile(r"^worker-(\d+)$")
#: What an un-sharded store keeps in the queue directory (removed once adopted).
_STORE_PARTS = ("journal", "bodies", "tmp")


def _body_file(directory: str, body_ref: str) -> str:
    """Where the store in ``directory`` keeps a body (the layout of DiskStore.body_file)."""
    return os.path.join(directory, "bodies", _shard(body_ref), body_ref + ".eml")


def shard_name(index: int) -> str:
    """Directory name of worker ``index``'s shard."""
    return f"worker-{index}"


def existing_shards(queue_dir: str) -> dict[int, str]:
    """``{worker index: path}`` of every shard directory under ``queue_dir``."""
    out: dict[int, str] = {}
    try:
        names = os.listdir(queue_dir)
    except FileNotFoundError:
        return out
    for name in names:
        match = _SHARD_NAME.match(name)
        path = os.path.join(queue_dir, name)
        if match and os.path.isdir(path):
            out[int(match.group(1))] = path
    return out


def shard_layout(queue_dir: str, index: int, count: int) -> tuple[str, list[str]]:
    """(own store directory, directories to adopt) of worker ``index`` of ``count``."""
    shards = existing_shards(queue_dir)
    if count <= 1:
        return queue_dir, [shards[j] for j in sorted(shards)]
    own = os.path.join(queue_dir, shard_name(index))
    adopt = [shards[j] for j in sorted(shards) if j >= count and j % count == index]
    if index == 0 and os.path.isdir(os.path.join(queue_dir, "journal")):
        adopt.insert(0, queue_dir)
    return own, adopt


class ShardedDiskStore(DiskStore):
    """A :class:`DiskStore` that adopts orphaned shards while it opens (in its thread)."""

    def __init__(self, root: str, adopt: Optional[list[str]] = None) -> None:
        super().__init__(root)
        self.adopt_dirs = list(adopt or [])
        self.adopted = 0
        self._adopt_log: list[tuple[str, str, int]] = []

    def _scan(self) -> tuple[list[Any], list[tuple[str, str]]]:
        found, bad = super()._scan()
        known = {item.id for item in found}
        for directory in self.adopt_dirs:
            try:
                items = self._adopt(directory, known)
            except QueueError as e:
                self._adopt_log.append(("locked", f"{directory}: {e}", 0))
                continue
            except OSError as e:
                self._adopt_log.append(("failed", f"{directory}: {e}", 0))
                continue
            found.extend(items)
            known.update(item.id for item in items)
            self.adopted += len(items)
            self._adopt_log.append(("adopted", directory, len(items)))
        return found, bad

    def _loaded(self, result: tuple[list[Any], list[tuple[str, str]]]) -> list[Any]:
        for outcome, where, count in self._adopt_log:
            if outcome == "adopted":
                log.info("adopted queue shard {shard}: {count} items", shard=where, count=count,
                         event="queue.shard_adopted")
            else:
                log.error("queue shard not adopted ({outcome}), its items wait for a later "
                          "start: {error}", outcome=outcome, error=where,
                          event="queue.shard_orphaned")
        self._adopt_log = []
        return super()._loaded(result)

    def _adopt(self, directory: str, known: set[str]) -> list[Any]:
        """Move the live items of the store in ``directory`` into this one (thread)."""
        lock = DirectoryLock(os.path.join(directory, "lock"))
        lock.acquire()  # QueueError while a live process still owns it
        try:
            journal_dir = os.path.join(directory, "journal")
            corrupt_dir = os.path.join(directory, "corrupt")
            items: list[Any] = []
            if os.path.isdir(journal_dir):
                os.makedirs(corrupt_dir, mode=0o700, exist_ok=True)
                live, _bad = Journal(journal_dir, corrupt_dir).replay()
                records = []
                for item_id, (buf, start, end) in live.items():
                    if item_id in known:
                        continue
                    data = buf[start:end]
                    try:  # an older format's record is adopted in the current one
                        item, data, _ = current_record(item_id, data)
                    except (ValueError, KeyError, TypeError, IndexError):
                        continue  # left in the old shard's corrupt/ by replay
                    if item.status == PROCESSING:
                        item.status = PENDING
                    self._copy_body(_body_file(directory, item.body_ref), item.body_ref)
                    records.append(encode_put(item_id, data))
                    items.append(item)
                if records:
                    for sub in os.listdir(self.bodies_dir):
                        fsync_dir(os.path.join(self.bodies_dir, sub))
                    self.journal.append(records)
            self._remove(directory)
            return items
        finally:
            lock.release()

    def _copy_body(self, src: str, body_ref: str) -> None:
        dest = self.body_file(body_ref)
        if os.path.exists(dest) or not os.path.exists(src):
            return
        tmp = os.path.join(self.tmp_dir, f"adopt-{body_ref}")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o600)
        fsync_file(tmp)
        os.rename(tmp, dest)

    @staticmethod
    def _remove(directory: str) -> None:
        """Delete an adopted store: a whole shard, or the store parts of the queue directory."""
        if _SHARD_NAME.match(os.path.basename(directory)):
            shutil.rmtree(directory, ignore_errors=True)
            fsync_dir(os.path.dirname(directory))
            return
        for part in _STORE_PARTS:
            shutil.rmtree(os.path.join(directory, part), ignore_errors=True)
        fsync_dir(directory)


def sharded_store(queue_dir: str, index: int, count: int) -> ShardedDiskStore:
    """The disk store of worker ``index`` of ``count`` (count 1: the queue directory itself)."""
    own, adopt = shard_layout(os.path.abspath(queue_dir), index, count)
    return ShardedDiskStore(own, adopt)
