"""Streaming DATA into spool files under ``state_dir/spool``.

A :class:`SpoolWriter` holds one message in progress: the server writes the
``Received:`` header and then the un-stuffed body in chunks as they arrive,
so no message is ever whole in memory.  On the way, :class:`ResultsFilter`
removes ``Authentication-Results`` header fields that claim dcrouter's own
authserv-id (RFC 8601 5): only dcrouter may speak for itself, and whatever
trusts its results downstream must never see a client's forgery of them.
The writer counts bytes and stops
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


#: A header field name (RFC 5322 ftext), with obsolete white space before the colon allowed.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*\Z")
_AR_NAME = b"authentication-results"
_ID_END = b" \t\r\n;(\""


def _authserv_id(value: bytes) -> Optional[bytes]:
    """The authserv-id at the start of an Authentication-Results value (after CFWS).

    None when the value read so far holds only white space and comments (the id
    may follow on a continuation line); ``b""`` when something else comes first.
    """
    i, size = 0, len(value)
    while i < size:
        ch = value[i:i + 1]
        if ch in (b" ", b"\t", b"\r", b"\n"):
            i += 1
            continue
        if ch == b"(":  # a comment, possibly nested, with quoted pairs
            depth = 0
            while i < size:
                c = value[i:i + 1]
                if c == b"\\":
                    i += 2
                    continue
                if c == b"(":
                    depth += 1
                elif c == b")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            if i >= size:
                return None
            i += 1
            continue
        if ch == b'"':
            out = []
            i += 1
            while i < size:
                c = value[i:i + 1]
                if c == b"\\":
                    out.append(value[i + 1:i + 2])
                    i += 2
                    continue
                if c == b'"':
                    return b"".join(out)
                out.append(c)
                i += 1
            return None
        start = i
        while i < size and value[i:i + 1] not in _ID_END:
            i += 1
        return value[start:i]
    return None


def _normal_id(value: bytes) -> bytes:
    return value.strip().lower().rstrip(b".")


class ResultsFilter:
    """Removes ``Authentication-Results`` fields claiming ``authserv_id`` from a message stream.

    Fed the message as it is spooled (any chunking, CRLF lines), it looks at the
    header section only: a field whose name is ``Authentication-Results`` (any
    case, obsolete space before the colon) is held until its authserv-id - the
    first token after comments and folding, quoted or not - is known, then
    dropped when the id is ours (any version number or result after it), passed
    otherwise.  One that shows no id within ``hold_limit`` bytes is dropped too.
    Memory is bounded by ``hold_limit``; over-long lines are passed or dropped
    as they stream.  ``removed`` counts the fields dropped.
    """

    def __init__(self, authserv_id: str, hold_limit: int = 8192) -> None:
        self.ours = _normal_id(authserv_id.encode("utf-8", "replace"))
        self.active = bool(self.ours)
        self.hold_limit = hold_limit
        self.removed = 0
        self._partial = b""
        self._rest_of_line: Optional[bool] = None
        self._field = "pass"
        self._held: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        """The bytes of ``data`` to store (everything once the header section is over)."""
        if not self.active:
            return data
        out: list[bytes] = []
        if self._rest_of_line is not None:  # inside an over-long line: pass or drop its rest
            newline = data.find(b"\n")
            if newline < 0:
                return data if self._rest_of_line else b""
            if self._rest_of_line:
                out.append(data[:newline + 1])
            self._rest_of_line = None
            data = data[newline + 1:]
        elif self._partial:
            data = self._partial + data
            self._partial = b""
        elif self._field == "pass" and not data.startswith(b"\r\n"):
            fast = self._fast(data)
            if fast is not None:
                return fast
        pos = 0
        while self.active:
            newline = data.find(b"\n", pos)
            if newline < 0:
                tail = data[pos:]
                if len(tail) <= self.hold_limit:
                    self._partial = tail
                else:
                    self._rest_of_line = self._line(tail, out, complete=False)
                return b"".join(out)
            self._line(data[pos:newline + 1], out, complete=True)
            pos = newline + 1
        out.append(data[pos:])
        return b"".join(out)

    def _fast(self, data: bytes) -> Optional[bytes]:
        """``data`` as it is when its header part holds no Authentication-Results (common)."""
        end = data.find(b"\r\n\r\n")
        head = data if end < 0 else data[:end + 2]
        if _AR_NAME in head.lower():
            return None
        if end >= 0:
            self.active = False
            return data
        last = data.rfind(b"\n")
        if len(data) - last - 1 > self.hold_limit:
            return None
        self._partial = data[last + 1:]
        return data[:last + 1]

    def finish(self) -> bytes:
        """What is still held when the message ends inside its header section."""
        out: list[bytes] = []
        if self.active and self._partial:
            self._line(self._partial, out, complete=False)
        self._partial = b""
        self._resolve()
        self.active = False
        return b"".join(out)

    def _line(self, line: bytes, out: list[bytes], complete: bool) -> bool:
        """Handle one header line (``complete``: with its LF); True when it was passed."""
        if complete and line in (b"\r\n", b"\n"):
            self._resolve()
            out.append(line)
            self.active = False
            return True
        if line[:1] in (b" ", b"\t"):
            if self._field == "pass":
                out.append(line)
                return True
            if self._field == "drop":
                return False
            self._held.append(line)
            self._decide(out, final=not complete)
            return self._field == "pass"
        self._resolve()
        name, colon, _ = line.partition(b":")
        if not colon or not _FIELD_NAME.match(name):
            out.append(line)  # not a header field: the body starts here
            self.active = False
            return True
        if name.rstrip(b" \t").lower() == _AR_NAME:
            self._field = "hold"
            self._held = [line]
            self._decide(out, final=not complete)
            return self._field == "pass"
        self._field = "pass"
        out.append(line)
        return True

    def _decide(self, out: list[bytes], final: bool) -> None:
        held = b"".join(self._held)
        found = _authserv_id(held.partition(b":")[2])
        if found is None:
            if final or len(held) > self.hold_limit:
                self._drop()
            return
        if _normal_id(found) == self.ours:
            self._drop()
        else:
            self._field = "pass"
            out.extend(self._held)
            self._held = []

    def _resolve(self) -> None:
        """A new field or the end of the header: a field still held showed no id."""
        if self._field == "hold":
            self._drop()
        self._field = "pass"

    def _drop(self) -> None:
        self._field = "drop"
        self._held = []
        self.removed += 1


class SpoolWriter:
    """One message being written to an open spool file (``path``, ``fd``).

    ``limit`` bounds the body bytes (the header written by :meth:`write_header`
    does not count).  After the limit is exceeded :attr:`oversize` is true,
    the file is removed and further writes are only counted.  With an
    ``authserv_id``, the body passes a :class:`ResultsFilter` for it.
    """

    def __init__(self, path: str, fd: int, limit: int, authserv_id: str = "") -> None:
        self.path = path
        self.limit = limit
        self.size = 0
        self.header_size = 0
        self.oversize = False
        self.has_8bit = False
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._fd: Optional[int] = fd
        self.results = ResultsFilter(authserv_id) if authserv_id else None
        self._dropped = 0

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
        if self.results is not None and self.results.active:
            size = len(data)
            data = self.results.feed(data)
            self._dropped += size - len(data)
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
            if self.results is not None and self.results.active:
                rest = self.results.finish()
                self._dropped -= len(rest)
                self._append(rest)
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
        return self.header_size + self.size - self.removed_bytes

    @property
    def removed_bytes(self) -> int:
        """Body bytes the results filter left out."""
        return self._dropped


def remove_quietly(path: str) -> None:
    """Delete ``path``; a file that is already gone is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
