"""Durable queue storage on the local disk (the default store).

Layout under the queue directory (0700, files 0600)::

    lock                  fcntl lock: one process owns the directory
    items/<c>/<id>.json   one item's metadata (c: last character of the id)
    bodies/<c>/<ref>.eml  message bodies, shared by the items of one message
    tmp/                  files being written
    corrupt/              unreadable items found at start

Every change goes through a :class:`GroupCommitter`: callers queue file
operations and get a Deferred; one worker thread runs every queued operation
as a batch (write temp file, fsync, rename; then fsync each touched
directory once) and fires all of the batch's Deferreds together, so
concurrent SMTP sessions share fsyncs and the reactor never blocks.  Bodies
are made durable before the items that name them.

On start the index is rebuilt from ``items/`` in a thread: items that were
``processing`` at a crash become ``pending`` again (the lease is only kept in
memory), unreadable or bodiless items move to ``corrupt/`` with a log event,
orphaned bodies are removed.  The lock is released by the kernel when the
owning process dies, so another process may adopt the directory afterwards.
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import os
import shutil
import threading
from typing import Any, Optional

from twisted.internet import defer, threads
from zope.interface import implementer

from dcrouter.errors import QueueError
from dcrouter.interfaces import IQueueStore
from dcrouter.logsetup import get_logger
from dcrouter.queue.item import PENDING, PROCESSING, QueueItem
from dcrouter.queue.memory import LocalStore

log = get_logger("email.queue")

_SHARDS = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _shard(name: str) -> str:
    c = name[-1:].upper()
    return c if c in _SHARDS else "0"


def fsync_dir(path: str) -> None:
    """fsync a directory so renames and unlinks in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupCommitter:
    """Runs queued file operations in batches in one thread; shares the fsyncs.

    Operations (tuples) of one batch run in phases: bodies in, items written
    or removed, bodies removed; each phase ends by fsyncing the directories it
    touched.
    """

    def __init__(self, tmp_dir: str, sync_threads: int = 16) -> None:
        self.tmp_dir = tmp_dir
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=sync_threads,
                                                           thread_name_prefix="queue-fsync")
        self._pending: list[tuple[tuple[tuple[Any, ...], ...], defer.Deferred]] = []
        self._running = False
        self._counter = 0
        self.batches = 0
        self.operations = 0

    def submit(self, *ops: tuple[Any, ...]) -> defer.Deferred:
        """Queue operations; fires when all of them are durable (they share one batch)."""
        d: defer.Deferred = defer.Deferred()
        if not ops:
            d.callback(None)
            return d
        self._pending.append((ops, d))
        self._kick()
        return d

    def _kick(self) -> None:
        if self._running or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._running = True
        flat = [op for ops, _ in batch for op in ops]
        d = threads.deferToThread(self._run, flat)

        def done(result: Any) -> None:
            self._running = False
            self.batches += 1
            self.operations += len(flat)
            for _, waiter in batch:
                if isinstance(result, BaseException):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            self._kick()

        def failed(failure: Any) -> None:
            done(failure.value)
        d.addCallbacks(done, failed)

    def shutdown(self) -> None:
        """Stop the fsync threads (pending batches finish first)."""
        self._pool.shutdown(wait=False)

    def _tmp(self) -> str:
        self._counter += 1
        return os.path.join(self.tmp_dir, f"{os.getpid()}.{threading.get_ident()}.{self._counter}")

    def _run(self, ops: list[tuple[Any, ...]]) -> None:
        phases: dict[int, list[tuple[Any, ...]]] = {0: [], 1: [], 2: []}
        for op in ops:
            phases[{"body": 0, "write": 1, "unlink": 1, "unlink_body": 2}[op[0]]].append(op)
        for phase in (0, 1, 2):
            dirs: set[str] = set()
            to_sync: list[str] = []
            renames: list[tuple[str, str]] = []
            for op in phases[phase]:
                kind = op[0]
                if kind == "body":
                    if self._move_body(op[1], op[2]):
                        to_sync.append(op[2])
                    dirs.add(os.path.dirname(op[2]))
                elif kind == "write":
                    tmp = self._tmp()
                    self._write(tmp, op[2])
                    to_sync.append(tmp)
                    renames.append((tmp, op[1]))
                    dirs.add(os.path.dirname(op[1]))
                else:
                    try:
                        os.unlink(op[1])
                    except FileNotFoundError:
                        pass
                    dirs.add(os.path.dirname(op[1]))
            # fsyncs of one phase run in parallel: the file system commits them together
            self._parallel(fsync_file, to_sync)
            for tmp, final in renames:
                os.rename(tmp, final)
            self._parallel(fsync_dir, sorted(dirs))

    def _parallel(self, func: Any, paths: list[str]) -> None:
        if len(paths) <= 1:
            for path in paths:
                func(path)
            return
        for _ in self._pool.map(func, paths):
            pass

    @staticmethod
    def _write(path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def _move_body(self, src: str, dest: str) -> bool:
        """Move a body in; True when it needs an fsync."""
        if os.path.exists(dest):
            return False
        try:
            os.rename(src, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            tmp = self._tmp()
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o600)
            fsync_file(tmp)
            os.rename(tmp, dest)
            os.unlink(src)
            return False
        os.chmod(dest, 0o600)
        return True


def fsync_file(path: str) -> None:
    """fsync a file's data and metadata."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryLock:
    """An exclusive fcntl lock on ``<dir>/lock``: one process per queue directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise QueueError naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise QueueError(f"queue directory {os.path.dirname(self.path)} is in use by another "
                             f"dcrouter process (pid {holder}); each process needs its own "
                             "persistent_path (or use storage_type = 'redis' to share a queue)"
                             ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        """Drop the lock."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@implementer(IQueueStore)
class DiskStore(LocalStore):
    """Items and bodies as files, made durable with group-committed fsyncs."""

    durable = True

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.items_dir = os.path.join(self.root, "items")
        self.bodies_dir = os.path.join(self.root, "bodies")
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.corrupt_dir = os.path.join(self.root, "corrupt")
        self.lock = DirectoryLock(os.path.join(self.root, "lock"))
        self.committer = GroupCommitter(self.tmp_dir)
        self.recovered = 0
        self.corrupt = 0

    def item_path(self, item_id: str) -> str:
        """Where an item's metadata lives."""
        return os.path.join(self.items_dir, _shard(item_id), item_id + ".json")

    def body_file(self, body_ref: str) -> str:
        """Where a body lives."""
        return os.path.join(self.bodies_dir, _shard(body_ref), body_ref + ".eml")

    def body_path(self, item: QueueItem) -> str:
        """A readable path of the item's body."""
        return self.body_file(item.body_ref)

    # -- start ------------------------------------------------------------------
    def open(self) -> defer.Deferred:
        """Lock the directory (now), then rebuild the index in a thread."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.lock.acquire()
        d = threads.deferToThread(self._scan)
        d.addCallback(self._loaded)
        return d

    def _scan(self) -> tuple[list[QueueItem], list[tuple[str, str]]]:
        for sub in (self.items_dir, self.bodies_dir, self.tmp_dir, self.corrupt_dir):
            os.makedirs(sub, mode=0o700, exist_ok=True)
        for c in _SHARDS:
            os.makedirs(os.path.join(self.items_dir, c), mode=0o700, exist_ok=True)
            os.makedirs(os.path.join(self.bodies_dir, c), mode=0o700, exist_ok=True)
        for name in os.listdir(self.tmp_dir):
            os.unlink(os.path.join(self.tmp_dir, name))
        bodies: set[str] = set()
        for c in os.listdir(self.bodies_dir):
            for name in os.listdir(os.path.join(self.bodies_dir, c)):
                bodies.add(name[:-4])
        found: list[QueueItem] = []
        bad: list[tuple[str, str]] = []
        for c in os.listdir(self.items_dir):
            folder = os.path.join(self.items_dir, c)
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                try:
                    with open(path, "rb") as f:
                        item = QueueItem.from_json(f.read())
                    if item.body_ref not in bodies:
                        raise ValueError(f"body {item.body_ref} is missing")
                except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
                    target = os.path.join(self.corrupt_dir, name)
                    os.replace(path, target)
                    bad.append((target, str(e)[:200]))
                    continue
                if item.status == PROCESSING:
                    item.status = PENDING
                found.append(item)
        used = {item.body_ref for item in found}
        for ref in bodies - used:
            try:
                os.unlink(self.body_file(ref))
            except OSError:
                pass
        fsync_dir(self.corrupt_dir)
        return found, bad

    def _loaded(self, result: tuple[list[QueueItem], list[tuple[str, str]]]) -> list[QueueItem]:
        found, bad = result
        for path, reason in bad:
            log.error("corrupt queue file moved to {path}: {reason}", path=path, reason=reason,
                      event="queue.corrupt")
        for item in found:
            self._index_add(item)
        self.recovered = len(found)
        self.corrupt = len(bad)
        log.info("disk queue {root} opened: {count} items recovered, {corrupt} corrupt",
                 root=self.root, count=len(found), corrupt=len(bad))
        return found

    # -- changes ----------------------------------------------------------------
    def add(self, items: list[QueueItem], body_path: str) -> defer.Deferred:
        """Move the body in, write the items; fires when all are durable."""
        if not items:
            return defer.succeed(None)
        ops: list[tuple[Any, ...]] = []
        if items[0].body_ref not in self.body_refs:
            ops.append(("body", body_path, self.body_file(items[0].body_ref)))
        for item in items:
            ops.append(("write", self.item_path(item.id), item.to_json()))
        d = self.committer.submit(*ops)

        def index(_: Any) -> None:
            for item in items:
                self._index_add(item)
        return d.addCallback(index)

    def _persist(self, item: QueueItem) -> defer.Deferred:
        if item.status == PROCESSING:
            return defer.succeed(True)
        return self.committer.submit(("write", self.item_path(item.id), item.to_json()))

    def remove(self, item: QueueItem) -> defer.Deferred:
        """Delete the item's file and, when unused, its body."""
        if item.id not in self.items:
            return defer.succeed(None)
        ops: list[tuple[Any, ...]] = [("unlink", self.item_path(item.id))]
        if self._index_remove(item):
            ops.append(("unlink_body", self.body_file(item.body_ref)))
        return self.committer.submit(*ops)

    def read_body(self, item: QueueItem) -> defer.Deferred:
        """The body bytes (read in a thread)."""
        path = self.body_file(item.body_ref)

        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()
        return threads.deferToThread(read)

    def close(self) -> defer.Deferred:
        """Release the directory lock."""
        self.lock.release()
        self.committer.shutdown()
        return defer.succeed(None)

    def stats(self, top: int = 10) -> dict[str, Any]:
        """Local counts plus fsync batching figures."""
        out = super().stats(top)
        out["commit_batches"] = self.committer.batches
        out["commit_operations"] = self.committer.operations
        return out
