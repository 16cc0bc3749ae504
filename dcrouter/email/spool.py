"""Streaming DATA into spool files under ``state_dir/spool``.

A :class:`SpoolWriter` holds one message in progress: the server writes the
``Received:`` header and then the un-stuffed body in chunks as they arrive,
so no message is ever whole in memory.  The writer counts bytes and stops
storing (but keeps counting) once the size limit is passed; the server then
answers 552 and the file is deleted.  No fsync here: the queue makes the file
durable when it takes it over (see ``docs/architecture.md``).
"""

from __future__ import annotations

import os
from typing import Optional

#: Bytes collected in memory before one ``os.write``.
WRITE_BUFFER = 256 * 1024


def spool_dir(state_dir: str) -> str:
    """``state_dir/spool``, created (mode 0700) if missing."""
    path = os.path.join(state_dir, "spool")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


class SpoolWriter:
    """One message being written to ``<spool>/<queue_id>.eml``.

    ``limit`` bounds the body bytes (the header written by :meth:`write_header`
    does not count).  After the limit is exceeded :attr:`oversize` is true,
    the file is removed and further writes are only counted.
    """

    def __init__(self, directory: str, queue_id: str, limit: int) -> None:
        self.path = os.path.join(directory, f"{queue_id}.eml")
        self.limit = limit
        self.size = 0
        self.header_size = 0
        self.oversize = False
        self.has_8bit = False
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

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
