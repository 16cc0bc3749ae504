"""Streaming DATA into spool files under ``state_dir/spool``.

A :class:`SpoolWriter` holds one message in progress: the server writes the
``Received:`` header and then the un-stuffed body in chunks as they arrive,
so no message is ever whole in memory.  The writer counts bytes and stops
storing (but keeps counting) once the size limit is passed; the server then
answers 552 and the file is deleted.  No fsync here: the queue makes the file
durable when it takes it over (see ``docs/architecture.md``).

Creating a file costs about as much as everything else the server does for a
10 KB message, so :class:`SpoolFiles` creates empty spool files ahead of time
in a thread and hands them out open.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any, Optional

from twisted.internet import threads

from dcrouter.logsetup import get_logger

log = get_logger("email.spool")

#: Bytes collected in memory before one ``os.write``.
WRITE_BUFFER = 256 * 1024


def spool_dir(state_dir: str) -> str:
    """``state_dir/spool``, created (mode 0700) if missing."""
    path = os.path.join(state_dir, "spool")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _create(directory: str) -> tuple[str, int]:
    path = os.path.join(directory, f"{uuid.uuid4().hex}.eml")
    return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


class SpoolFiles:
    """A pool of empty, open spool files made ahead of time in a thread.

    :meth:`take` returns ``(path, fd)``; when the pool is empty it creates one
    on the spot.  :meth:`close` deletes the files never handed out.
    """

    def __init__(self, directory: str, reactor: Any = None, target: int = 256) -> None:
        self.directory = directory
        self.reactor = reactor
        self.target = target
        self._ready: list[tuple[str, int]] = []
        self._refilling = False
        self._closed = False

    def take(self) -> tuple[str, int]:
        """An open, empty spool file."""
        if self.reactor is not None and len(self._ready) < self.target // 2:
            self._refill()
        if self._ready:
            return self._ready.pop()
        return _create(self.directory)

    def _refill(self) -> None:
        if self._refilling or self._closed:
            return
        self._refilling = True
        want = self.target - len(self._ready)
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      self._create_many, want)

        def done(files: list[tuple[str, int]]) -> None:
            self._refilling = False
            if self._closed:
                self._discard(files)
            else:
                self._ready.extend(files)

        def failed(failure: Any) -> None:
            self._refilling = False
            log.failure("cannot create spool files", failure)

        d.addCallbacks(done, failed)

    def _create_many(self, count: int) -> list[tuple[str, int]]:
        return [_create(self.directory) for _ in range(count)]

    @staticmethod
    def _discard(files: list[tuple[str, int]]) -> None:
        for path, fd in files:
            os.close(fd)
            remove_quietly(path)

    def ready_paths(self) -> set[str]:
        """Paths of the prepared files not yet handed out."""
        return {path for path, _ in self._ready}

    def close(self) -> None:
        """Delete the files not handed out; no more refills."""
        self._closed = True
        files, self._ready = self._ready, []
        self._discard(files)


#: Names of the server's spool files and of files the processor derives from them
#: (``<name>.ar``, ``<name>.<n>``); other writers' files (bounces) are left alone.
_SPOOL_NAME = re.compile(r"^[0-9a-f]{32}\.eml(\.[A-Za-z0-9]+)?$")


def clean_spool(directory: str) -> int:
    """Delete the server's leftovers of a previous run (never acknowledged); returns a count."""
    count = 0
    for name in os.listdir(directory):
        if _SPOOL_NAME.match(name):
            remove_quietly(os.path.join(directory, name))
            count += 1
    return count


class SpoolWriter:
    """One message being written to an open spool file (``path``, ``fd``).

    ``limit`` bounds the body bytes (the header written by :meth:`write_header`
    does not count).  After the limit is exceeded :attr:`oversize` is true,
    the file is removed and further writes are only counted.
    """

    def __init__(self, path: str, fd: int, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.size = 0
        self.header_size = 0
        self.oversize = False
        self.has_8bit = False
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._fd: Optional[int] = fd

    def write_header(self, data: bytes) -> None:
        """Write trace header bytes (not counted against the limit)."""
        self.header_size += len(data)
        self._append(data)

    def write(self, data: bytes) -> None:
        """Append body bytes; past the limit only count them."""
        self.size += len(data)
        if self.oversize:
            return
        if self.size > self.limit:
            self.oversize = True
            self._discard()
            return
        if not self.has_8bit and not data.isascii():
            self.has_8bit = True
        self._append(data)

    def _append(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= WRITE_BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self._fd is None or not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def finish(self) -> str:
        """Flush and close; returns the path.  Only for a message within the limit."""
        assert not self.oversize
        try:
            self._flush()
        finally:
            self._close()
        return self.path

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _discard(self) -> None:
        self._buffer, self._buffered = [], 0
        self._close()
        remove_quietly(self.path)

    def abort(self) -> None:
        """Drop the message: close and delete the file."""
        self._discard()

    @property
    def total_size(self) -> int:
        """Bytes in the finished file (header + body)."""
        return self.header_size + self.size


def remove_quietly(path: str) -> None:
    """Delete ``path``; a file that is already gone is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
