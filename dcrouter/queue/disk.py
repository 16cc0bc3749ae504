"""Durable queue storage on the local disk (the default store).

Layout under the queue directory (0700, files 0600)::

    lock                    fcntl lock: one process owns the directory
    journal/<n>.log         append-only item records (segments, oldest first)
    bodies/<c>/<ref>.eml    message bodies, shared by the items of one message
    tmp/                    files being written
    corrupt/                damaged records found at start

Item metadata lives in a journal: each change appends one record
``<crc32> P <id> <item json>`` (item added or changed) or ``<crc32> D <id>``
(item gone).  Every change goes through a :class:`GroupCommitter`: callers
queue operations and get a Deferred; one worker thread runs all queued
operations as a batch - bodies renamed in and fsynced (in parallel), their
directories fsynced, then every journal record of the batch appended with
one write and one fsync, then unused bodies removed - and fires the batch's
Deferreds together.  So concurrent SMTP sessions share fsyncs, the reactor
never blocks, and a body is durable before the record that names it.

On start the journal is replayed in a thread (sequential reads: fast even
for a million items): items that were ``processing`` at a crash become
``pending`` again (leases are only kept in memory); a record with a bad
checksum or a torn tail is copied to ``corrupt/`` with a log event and
skipped, never failing the start.  When the journal holds many more records
than live items, the committer rewrites it as one compact segment.  The lock
is released by the kernel when the owning process dies, so another process
may adopt the directory afterwards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import gc
import fcntl
import os
import shutil
import threading
import zlib
from typing import Any, Optional

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from zope.interface import implementer

from dcrouter.errors import QueueError
from dcrouter.interfaces import IQueueStore
from dcrouter.logsetup import get_logger
from dcrouter.queue.item import PENDING, PROCESSING, QueueItem, StoredItem
from dcrouter.queue.memory import LocalStore
from dcrouter.tlsutil import ensure_private_dir

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


def fsync_file(path: str) -> None:
    """fsync a file's data and metadata."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_put(item_id: str, data: bytes) -> bytes:
    """A journal record: item ``item_id`` is now ``data`` (item JSON)."""
    payload = b"P " + item_id.encode("ascii") + b" " + data
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def encode_delete(item_id: str) -> bytes:
    """A journal record: item ``item_id`` is gone."""
    payload = b"D " + item_id.encode("ascii")
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


class Journal:
    """Append-only segments of item records, snapshots, replay and compaction.

    Files: ``<n>.log`` segments and ``<n>.snap`` snapshots (the live items of
    every segment up to ``n``).  Replay reads the newest snapshot, then the
    segments after it.  Appends happen in the committer thread; a compaction
    runs in its own thread on segments that no longer change.
    """

    def __init__(self, directory: str, corrupt_dir: str) -> None:
        self.directory = directory
        self.corrupt_dir = corrupt_dir
        self._fd: Optional[int] = None
        self.segment = 0
        self._base = 0       # records up to the last rotation (or the live count after compaction)
        self._appended = 0   # records appended since

    @property
    def records(self) -> int:
        """Records a replay would read (roughly: used to decide when to compact)."""
        return self._base + self._appended

    def _numbers(self, suffix: str) -> list[int]:
        out = []
        for name in os.listdir(self.directory):
            if name.endswith(suffix) and name[:-len(suffix)].isascii() and name[:-len(suffix)].isdigit():
                out.append(int(name[:-len(suffix)]))
        return sorted(out)

    def _path(self, number: int) -> str:
        return os.path.join(self.directory, f"{number:010d}.log")

    def _snap_path(self, number: int) -> str:
        return os.path.join(self.directory, f"{number:010d}.snap")

    def _files(self, upto: Optional[int] = None) -> tuple[list[tuple[str, int]], int]:
        snaps = [n for n in self._numbers(".snap") if upto is None or n <= upto]
        base = snaps[-1] if snaps else 0
        files = [(self._snap_path(base), base)] if snaps else []
        files += [(self._path(n), n) for n in self._numbers(".log")
                  if n > base and (upto is None or n <= upto)]
        return files, base

    def replay(self) -> tuple[dict[str, tuple[bytes, int, int]], list[tuple[str, str]]]:
        """Live records (id -> (file data, start, end) of the payload) and damaged ones.

        Payloads are not copied: the file buffers stay alive until the caller
        drops the returned dict (fewer allocations, less fragmentation).  Torn
        tails are cut off; leftovers of an interrupted compaction are removed.
        """
        tmp = os.path.join(self.directory, "compact.tmp")
        if os.path.exists(tmp):
            os.unlink(tmp)
        files, base = self._files()
        self._remove_covered(base)
        live, bad, records = self._read(files, repair=True)
        numbers = [n for _, n in files]
        self.segment = max(numbers) if numbers else 0
        self._base, self._appended = records, 0
        return live, bad

    def _read(self, files: list[tuple[str, int]], repair: bool
              ) -> tuple[dict[str, tuple[bytes, int, int]], list[tuple[str, str]], int]:
        live: dict[str, tuple[bytes, int, int]] = {}
        bad: list[tuple[str, str]] = []
        records = 0
        apply = self._apply
        for path, number in files:
            with open(path, "rb") as f:
                data = f.read()
            offset = 0
            size = len(data)
            while offset < size:
                end = data.find(b"\n", offset)
                if end < 0:
                    break
                records += 1
                if not apply(data, offset, end, live) and repair:
                    bad.append((self._save_bad(number, offset, data[offset:end]),
                                "bad checksum or format"))
                offset = end + 1
            if offset < size and repair:
                # a torn write (never acknowledged): save it and cut it off
                saved = self._save_bad(number, offset, data[offset:])
                with open(path, "r+b") as f:
                    f.truncate(offset)
                    os.fsync(f.fileno())
                bad.append((saved, "torn record at the end of a journal segment"))
        return live, bad, records

    def _remove_covered(self, base: int) -> None:
        """Delete segments and older snapshots that the snapshot ``base`` covers."""
        removed = False
        for n in self._numbers(".log"):
            if n <= base:
                os.unlink(self._path(n))
                removed = True
        for n in self._numbers(".snap"):
            if n < base:
                os.unlink(self._snap_path(n))
                removed = True
        if removed:
            fsync_dir(self.directory)

    @staticmethod
    def _apply(data: bytes, start: int, end: int, live: dict[str, tuple[bytes, int, int]]
               ) -> bool:
        if end - start < 12 or data[start + 8:start + 9] != b" ":
            return False
        try:
            crc = int(data[start:start + 8], 16)
        except ValueError:
            return False
        view = memoryview(data)[start + 9:end]
        if crc != zlib.crc32(view):
            return False
        op = data[start + 9:start + 11]
        if op == b"P ":
            sep = data.find(b" ", start + 11, end)
            if sep < 0:
                return False
            live[data[start + 11:sep].decode("ascii")] = (data, sep + 1, end)
            return True
        if op == b"D ":
            live.pop(data[start + 11:end].decode("ascii"), None)
            return True
        return False

    def _save_bad(self, number: int, offset: int, data: bytes) -> str:
        path = os.path.join(self.corrupt_dir, f"journal-{number:010d}-{offset}.bad")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return path

    def open_for_append(self) -> None:
        """Append to a fresh segment after the existing ones."""
        self.segment += 1
        self._fd = os.open(self._path(self.segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                           0o600)
        fsync_dir(self.directory)

    def append(self, records: list[bytes]) -> None:
        """Write records with one write and one fsync."""
        assert self._fd is not None
        data = memoryview(b"".join(records))
        while data:
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)
        self._appended += len(records)

    def rotate(self) -> int:
        """Start a new segment; returns the number of the last one (now immutable)."""
        last = self.segment
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._base += self._appended
        self._appended = 0
        self.open_for_append()
        return last

    def compact_upto(self, upto: int) -> int:
        """Write the live items of every file up to ``upto`` as snapshot ``upto``; drop those files.

        Safe beside appends to later segments.  Returns the live count.
        """
        files, _ = self._files(upto)
        live, _, _ = self._read(files, repair=False)
        tmp = os.path.join(self.directory, "compact.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            chunk: list[bytes] = []
            for item_id, (buf, start, end) in live.items():
                chunk.append(encode_put(item_id, buf[start:end]))
                if len(chunk) >= 10000:
                    os.write(fd, b"".join(chunk))
                    chunk = []
            os.write(fd, b"".join(chunk))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self._snap_path(upto))
        fsync_dir(self.directory)
        self._remove_covered(upto)
        count = len(live)
        self._base = count
        return count

    def compact(self) -> int:
        """Rotate and compact everything so far (when no commit runs); returns the live count."""
        return self.compact_upto(self.rotate())

    def close(self) -> None:
        """Close the append segment."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class GroupCommitter:
    """Runs queued operations in batches in one thread; shares the fsyncs.

    Operations: ``("body", src, dest)``, ``("put", id, json)``, ``("del", id)``,
    ``("unlink_body", path)``, ``("keep_body", path, directory)`` (moved aside instead).
    """

    def __init__(self, journal: Journal, tmp_dir: str, sync_threads: int = 16) -> None:
        self.journal = journal
        self.tmp_dir = tmp_dir
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=sync_threads,
                                                           thread_name_prefix="queue-fsync")
        # deletes bodies of removed items, in order, one thread
        self._cleanup = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                              thread_name_prefix="queue-cleanup")
        self._pending: list[tuple[tuple[tuple[Any, ...], ...], defer.Deferred]] = []
        self._running = False
        self._counter = 0
        self.batches = 0
        self.operations = 0
        self.compactions = 0
        self.live_hint = 0
        self._idle_waiters: list[defer.Deferred] = []
        self.closed = False
        self.compacting = False
        self.compact_slack = 100000

    def submit(self, *ops: tuple[Any, ...]) -> defer.Deferred:
        """Queue operations; fires when all of them are durable (they share one batch).

        After :meth:`shutdown` nothing is written any more (a restart recovers the
        last durable state: deliveries finishing during shutdown may be repeated).
        """
        d: defer.Deferred = defer.Deferred()
        if self.closed:
            d.errback(QueueError("the disk queue is closed"))
            return d
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
        groups = [ops for ops, _ in batch]
        d = threads.deferToThread(self._run, groups, self.live_hint)

        def done(result: Any) -> None:
            self._running = False
            self.batches += 1
            self.operations += sum(len(ops) for ops in groups)
            for n, (_, waiter) in enumerate(batch):
                error = result if isinstance(result, BaseException) else result[n]
                if error is not None:
                    waiter.errback(error)
                else:
                    waiter.callback(None)
            self._kick()
            if not self._running:
                waiters, self._idle_waiters = self._idle_waiters, []
                for w in waiters:
                    w.callback(None)

        def failed(failure: Any) -> None:
            log.failure("queue commit failed", failure)
            done(failure.value)
        d.addCallbacks(done, failed)

    def idle(self) -> defer.Deferred:
        """Fires when no batch is running or waiting."""
        if not self._running and not self._pending:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def shutdown(self) -> None:
        """Stop the fsync threads; later submissions fail."""
        self.closed = True
        self._pool.shutdown(wait=False)
        self._cleanup.shutdown(wait=False)

    def cleanup_done(self) -> defer.Deferred:
        """Fires when the bodies of removed items submitted so far are deleted."""
        return threads.deferToThread(self._cleanup.submit(lambda: None).result)

    def _tmp(self) -> str:
        self._counter += 1
        return os.path.join(self.tmp_dir, f"{os.getpid()}.{threading.get_ident()}.{self._counter}")

    def _run(self, groups: list[tuple[tuple[Any, ...], ...]], live_hint: int
             ) -> list[Optional[BaseException]]:
        """One batch; returns per submission None (durable) or the error that stopped it.

        A submission whose body cannot be moved in (e.g. its spool file is gone)
        fails alone: its records are not written, the other submissions go on.
        """
        body_files: list[str] = []
        body_dirs: set[str] = set()
        records: list[bytes] = []
        unlinks: list[str] = []
        moves: list[tuple[str, str]] = []
        results: list[Optional[BaseException]] = []
        for ops in groups:
            try:
                for op in ops:
                    if op[0] == "body":
                        if self._move_body(op[1], op[2]):
                            body_files.append(op[2])
                        body_dirs.add(os.path.dirname(op[2]))
            except OSError as e:
                results.append(QueueError(f"cannot take over the message file: {e}"))
                continue
            results.append(None)
            for op in ops:
                kind = op[0]
                if kind == "put":
                    records.append(encode_put(op[1], op[2]))
                elif kind == "del":
                    records.append(encode_delete(op[1]))
                elif kind == "unlink_body":
                    unlinks.append(op[1])
                elif kind == "keep_body":
                    moves.append((op[1], op[2]))
        # bodies first: the moved files and their directories are fsynced together, in
        # parallel (the file system commits them in one journal transaction); only then
        # the records that refer to them
        self._parallel_mixed([(fsync_file, path) for path in body_files] +
                             [(fsync_dir, path) for path in sorted(body_dirs)])
        if records:
            self.journal.append(records)
        if unlinks or moves:
            # bodies of removed items go only after their removal is durable; deleting
            # them is clean-up, off the batch's path (close() waits for it)
            self._cleanup.submit(self._unlink_bodies, unlinks, moves)
        if not self.compacting and self.journal.records > 2 * live_hint + self.compact_slack:
            upto = self.journal.rotate()
            self.compacting = True
            threading.Thread(target=self._compact, args=(upto,), name="queue-compact",
                             daemon=True).start()
        return results

    def _compact(self, upto: int) -> None:
        """Compaction thread: snapshot the segments up to ``upto`` while appends go on."""
        from twisted.internet import reactor
        in_reactor = getattr(reactor, "callFromThread")
        try:
            live = self.journal.compact_upto(upto)
            self.compactions += 1
            in_reactor(log.info, "queue journal compacted: {count} live items",
                                   count=live)
        except Exception as e:  # retried at the next trigger; the journal stays valid
            in_reactor(log.error, "queue journal compaction failed: {error}",
                                   error=repr(e))
        finally:
            self.compacting = False

    def _parallel_mixed(self, calls: list[tuple[Any, str]]) -> None:
        if len(calls) <= 1:
            for func, path in calls:
                func(path)
            return
        for _ in self._pool.map(lambda call: call[0](call[1]), calls):
            pass

    @staticmethod
    def _unlink_bodies(paths: list[str], moves: list[tuple[str, str]]) -> None:
        dirs = set()
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            dirs.add(os.path.dirname(path))
        for path, directory in moves:
            try:
                os.rename(path, os.path.join(directory, os.path.basename(path)))
            except FileNotFoundError:
                continue
            dirs.update((os.path.dirname(path), directory))
        for directory in sorted(dirs):
            fsync_dir(directory)

    def _parallel(self, func: Any, paths: list[str]) -> None:
        if len(paths) <= 1:
            for path in paths:
                func(path)
            return
        for _ in self._pool.map(func, paths):
            pass

    def _move_body(self, src: str, dest: str) -> bool:
        """Move a body in; True when it still needs an fsync."""
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


def _list_bodies(directory: str) -> list[str]:
    """Body refs stored in one shard directory."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [name[:-4] for name in names if name.endswith(".eml")]


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


#: How the JSON of a queue format 1 record starts (it held the resolved route).
_FORMAT_1 = b'{"v":1,'


def current_record(item_id: str, payload: bytes) -> tuple[StoredItem, bytes, bool]:
    """A journal payload as a StoredItem of the current format: (item, payload, rewritten).

    Format 1 payloads (route and credentials frozen in) are rewritten; raises
    ValueError/KeyError/TypeError/IndexError when the record is damaged.
    """
    item = StoredItem(item_id, payload)
    if not item.raw.startswith(_FORMAT_1):
        return item, payload, False
    payload = item.materialize().journal_payload()
    return StoredItem(item_id, payload), payload, True


@implementer(IQueueStore)
class DiskStore(LocalStore):
    """Item journal and body files, made durable with group-committed fsyncs."""

    durable = True

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = os.path.abspath(root)
        self.journal_dir = os.path.join(self.root, "journal")
        self.bodies_dir = os.path.join(self.root, "bodies")
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.corrupt_dir = os.path.join(self.root, "corrupt")
        self.lock = DirectoryLock(os.path.join(self.root, "lock"))
        self.journal = Journal(self.journal_dir, self.corrupt_dir)
        self.committer = GroupCommitter(self.journal, self.tmp_dir)
        self.recovered = 0
        self.corrupt = 0
        #: Records of queue format 1 rewritten at the start.
        self.upgraded = 0
        #: Body refs being moved in whose items are not indexed yet.
        self._adding: collections.Counter[str] = collections.Counter()
        #: Bodies no item referred to, deleted after the start (left by a crash).
        self.orphans_removed = 0
        #: Fires when the start's sweep for orphaned bodies is done.
        self.swept: defer.Deferred = defer.succeed(0)

    def body_file(self, body_ref: str) -> str:
        """Where a body lives."""
        return os.path.join(self.bodies_dir, _shard(body_ref), body_ref + ".eml")

    def body_path(self, item: QueueItem) -> str:
        """A readable path of the item's body."""
        return self.body_file(item.body_ref)

    # -- start ------------------------------------------------------------------
    def open(self) -> defer.Deferred:
        """Lock the directory (now), then replay the journal in a thread."""
        ensure_private_dir(self.root)  # parents it creates are 0700 too
        os.chmod(self.root, 0o700)
        self.lock.acquire()
        # a million new objects would trigger many full collections: pause the cyclic GC
        # while loading, then move the loaded index out of its reach (gc.freeze)
        was_enabled = gc.isenabled()
        gc.disable()
        d = threads.deferToThread(self._scan)
        d.addCallback(self._loaded)

        def restore(result: Any) -> Any:
            if was_enabled:
                gc.enable()
            gc.freeze()
            return result
        d.addBoth(restore)
        return d

    def _scan(self) -> tuple[list[Any], list[tuple[str, str]]]:
        for sub in (self.journal_dir, self.bodies_dir, self.tmp_dir, self.corrupt_dir):
            os.makedirs(sub, mode=0o700, exist_ok=True)
        for c in _SHARDS:
            os.makedirs(os.path.join(self.bodies_dir, c), mode=0o700, exist_ok=True)
        for name in os.listdir(self.tmp_dir):
            os.unlink(os.path.join(self.tmp_dir, name))
        live, bad = self.journal.replay()
        found: list[Any] = []
        upgraded: list[bytes] = []
        for item_id, (buf, start, end) in live.items():
            data = buf[start:end]
            try:
                item, payload, rewritten = current_record(item_id, data)
                if rewritten:
                    upgraded.append(encode_put(item_id, payload))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                path = self.journal._save_bad(0, len(found), data)
                bad.append((path, f"item {item_id}: {str(e)[:200]}"))
                continue
            if item.status == PROCESSING:
                item.status = PENDING
            found.append(item)
        del live
        self.journal.open_for_append()
        if upgraded:
            # format 1 froze credentials into the records: rewrite them, then compact, so
            # no segment keeps an old record
            self.journal.append(upgraded)
            self.journal.compact()
            self.upgraded = len(upgraded)
        if bad:
            fsync_dir(self.corrupt_dir)
        return found, bad

    def _loaded(self, result: tuple[list[Any], list[tuple[str, str]]]) -> list[Any]:
        found, bad = result
        for path, reason in bad:
            log.error("damaged queue record saved to {path}: {reason}", path=path, reason=reason,
                      event="queue.corrupt")
        for item in found:
            self._index_add(item)
        self.recovered = len(found)
        self.corrupt = len(bad)
        self.committer.live_hint = len(self.items)
        log.info("disk queue {root} opened: {count} items recovered, {corrupt} damaged records",
                 root=self.root, count=len(found), corrupt=len(bad))
        if self.upgraded:
            log.info("disk queue {root}: {count} records of queue format 1 rewritten (the "
                     "destination is now resolved at delivery; stored credentials dropped)",
                     root=self.root, count=self.upgraded, event="queue.upgraded")
        self.swept = defer.ensureDeferred(self._sweep_orphans())
        self.swept.addErrback(lambda f: log.error("orphaned body sweep failed: {error}",
                                                  error=str(f.value)))
        return found

    async def _sweep_orphans(self) -> int:
        """Delete bodies that no item refers to, one shard directory at a time.

        A crash between moving a body in and its record becoming durable (the
        client got no 250 and sends again), or between a removal's record and
        the unlink, leaves such files. Listing runs in a thread; the check runs in
        the reactor against the index and the adds in flight, and the unlinks go
        through the committer, so they follow every removal record already queued.
        """
        removed = 0
        # with damaged records at the start, a body without an item may belong to one of
        # them: it is moved to corrupt/ beside them rather than deleted
        keep = self.corrupt > 0
        for shard in _SHARDS:
            directory = os.path.join(self.bodies_dir, shard)
            names = await threads.deferToThread(_list_bodies, directory)
            orphans = [self.body_file(ref) for ref in names
                       if ref not in self.body_refs and ref not in self._adding]
            if not orphans or self.committer.closed:
                continue
            await self.committer.submit(*[("keep_body", path, self.corrupt_dir) if keep
                                          else ("unlink_body", path) for path in orphans])
            removed += len(orphans)
        if removed:
            log.warn("{action} {count} orphaned message bodies of {root} (left by a crash)",
                     action="moved to corrupt/" if keep else "removed", count=removed,
                     root=self.root, event="queue.orphans")
        self.orphans_removed += removed
        return removed

    # -- changes ----------------------------------------------------------------
    def add(self, items: list[QueueItem], body_path: str) -> defer.Deferred:
        """Move the body in, journal the items; fires when all are durable."""
        if not items:
            return defer.succeed(None)
        ops: list[tuple[Any, ...]] = []
        ref = items[0].body_ref
        if ref not in self.body_refs:
            ops.append(("body", body_path, self.body_file(ref)))
        for item in items:
            ops.append(("put", item.id, item.journal_payload()))
        self._adding[ref] += 1
        d = self.committer.submit(*ops)

        def index(result: Any) -> Any:
            self._adding[ref] -= 1
            if self._adding[ref] <= 0:
                del self._adding[ref]
            if isinstance(result, Failure):
                return result
            for item in items:
                self._index_add(item)
            self.committer.live_hint = len(self.items)
            return None
        return d.addBoth(index)

    def _persist(self, item: QueueItem) -> defer.Deferred:
        if item.status == PROCESSING:
            return defer.succeed(True)
        return self.committer.submit(("put", item.id, item.journal_payload()))

    def remove(self, item: QueueItem) -> defer.Deferred:
        """Journal the item's removal and, when unused, delete its body."""
        if item.id not in self.items:
            return defer.succeed(None)
        ops: list[tuple[Any, ...]] = [("del", item.id)]
        if self._index_remove(item):
            ops.append(("unlink_body", self.body_file(item.body_ref)))
        self.committer.live_hint = len(self.items)
        return self.committer.submit(*ops)

    def _damaged(self, item: Any, reason: str) -> None:
        """A recovered item whose JSON is unreadable: save it, journal its removal."""
        path = os.path.join(self.corrupt_dir, f"item-{item.id}.bad")
        with open(path, "wb") as f:
            f.write(item.raw)
        log.error("damaged queue item {queue_id} saved to {path}: {reason}", queue_id=item.id,
                  path=path, reason=reason[:200], event="queue.corrupt")
        unused = self._index_remove(item)
        ops: list[tuple[Any, ...]] = [("del", item.id)]
        if unused:
            ops.append(("unlink_body", self.body_file(item.body_ref)))
        self.committer.submit(*ops)

    def read_body(self, item: QueueItem) -> defer.Deferred:
        """The body bytes (read in a thread)."""
        path = self.body_file(item.body_ref)

        def read() -> bytes:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                raise QueueError(f"body of {item.id} is missing ({path})") from None
        return threads.deferToThread(read)

    def close(self) -> defer.Deferred:
        """Let pending commits finish, then close the journal and release the lock."""
        d = self.swept.addCallback(lambda _: self.committer.idle())
        d.addCallback(lambda _: self.committer.cleanup_done())

        def finish(_: Any) -> None:
            self.committer.shutdown()
            self.journal.close()
            self.lock.release()
        return d.addCallback(finish)

    def stats(self, top: int = 10) -> dict[str, Any]:
        """Local counts plus fsync batching figures."""
        out = super().stats(top)
        out["commit_batches"] = self.committer.batches
        out["commit_operations"] = self.committer.operations
        out["journal_compactions"] = self.committer.compactions
        out["orphaned_bodies_removed"] = self.orphans_removed
        return out
