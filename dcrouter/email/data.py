"""Decoding the SMTP message streams: DATA (dot-stuffed lines) and BDAT chunks (RFC 3030).

:class:`DotDecoder` is fed the raw bytes as they arrive and returns message
bytes ready for the spool: every line ends in CRLF, one leading dot is removed
from dot-stuffed lines (RFC 5321 4.5.2), and only ``CRLF . CRLF`` ends the
message - a dot line after a bare LF, or ended by one (``\n.\n``,
``\n.\r\n``, ``\r\n.\n``), is message content, so one DATA can never turn
into two transactions here or at a next hop (SMTP smuggling, CVE-2023-51766
and its siblings).  Bare LF and bare CR are written as CRLF (Postfix 3.9's
``smtpd_forbid_bare_newline = normalize``) and recorded, so that the session
can refuse the message instead when configured to.  The decoder never holds
more than one partial line, and splits a line longer than ``partial_flush``
bytes.

:class:`ChunkReader` takes exactly the declared number of octets of one BDAT
chunk off the input (no dot processing), in whatever pieces the network
delivers them; :class:`NewlineNormaliser` then gives bare LF and bare CR in
those octets the same treatment as in DATA, across chunk boundaries.
"""

from __future__ import annotations

#: A line longer than this is passed on in pieces (never buffered whole).
PARTIAL_FLUSH = 64 * 1024


def _clean(data: bytes) -> bool:
    """Does every CR and every LF of ``data`` belong to a CRLF?"""
    crlf = data.count(b"\r\n")
    return data.count(b"\n") == crlf and data.count(b"\r") == crlf


class DotDecoder:
    """Streaming decoder of one message's DATA section.

    ``bare_lf`` / ``bare_cr`` become true once a line ended in a bare LF or held
    a bare CR (both were written as CRLF).
    """

    def __init__(self, partial_flush: int = PARTIAL_FLUSH) -> None:
        self.partial_flush = partial_flush
        self.line_start = True
        #: The last complete line ended in CRLF: a terminator may follow.
        self.after_crlf = True
        self.bare_lf = False
        self.bare_cr = False

    @property
    def bare(self) -> bool:
        """Was any bare LF or bare CR seen?"""
        return self.bare_lf or self.bare_cr

    def feed(self, buf: bytes) -> tuple[bytes, bytes, bool]:
        """Decode what can be decoded.

        Returns ``(message bytes, unconsumed bytes, finished)``: the unconsumed
        bytes are a partial line (feed them again with more data) or, once
        finished, whatever followed the terminating line (pipelined commands).
        """
        last = buf.rfind(b"\n")
        if last < 0:
            if len(buf) <= self.partial_flush:
                return b"", buf, False
            keep = 1 if buf.endswith(b"\r") else 0  # a CR that may start a CRLF
            piece, rest = buf[:len(buf) - keep], buf[len(buf) - keep:]
            if self.line_start and piece.startswith(b"."):
                piece = piece[1:]
            if b"\r" in piece:
                self.bare_cr = True
                piece = piece.replace(b"\r", b"\r\n")
            self.line_start = False
            return piece, rest, False
        chunk, rest = buf[:last + 1], buf[last + 1:]
        if _clean(chunk):
            return self._feed_clean(chunk, rest)
        return self._feed_mixed(chunk, rest)

    def _feed_clean(self, chunk: bytes, rest: bytes) -> tuple[bytes, bytes, bool]:
        """Complete lines, every one ended by CRLF, no bare CR: whole runs of lines are
        passed at once; only lines starting with a dot are looked at one by one."""
        out: list[bytes] = []
        pos = 0
        at_start = self.line_start
        after_crlf = self.after_crlf
        size = len(chunk)
        while True:
            if at_start and chunk.startswith(b".", pos):
                end = chunk.index(b"\n", pos)
                if end - pos == 2:  # the line is "." CRLF
                    if after_crlf:
                        self.line_start = self.after_crlf = True
                        return b"".join(out), chunk[end + 1:] + rest, True
                    out.append(b".\r\n")  # after a bare LF: content, as sent
                else:
                    out.append(chunk[pos + 1:end + 1])
                after_crlf = True
                pos = end + 1
                if pos == size:
                    break
                continue
            following = chunk.find(b"\n.", pos)
            if following < 0:
                out.append(chunk[pos:] if pos else chunk)
                break
            out.append(chunk[pos:following + 1])
            pos = following + 1
            at_start = after_crlf = True
        self.line_start = self.after_crlf = True
        return b"".join(out), rest, False

    def _feed_mixed(self, chunk: bytes, rest: bytes) -> tuple[bytes, bytes, bool]:
        """Complete lines, some ended by a bare LF or holding a bare CR: line by line."""
        out: list[bytes] = []
        at_start = self.line_start
        after_crlf = self.after_crlf
        consumed = 0
        for line in chunk.split(b"\n")[:-1]:
            consumed += len(line) + 1
            crlf = line.endswith(b"\r")
            if crlf:
                line = line[:-1]
            else:
                self.bare_lf = True
            if at_start and line.startswith(b"."):
                if line == b".":
                    if crlf and after_crlf:
                        self.line_start = self.after_crlf = True
                        return b"".join(out), chunk[consumed:] + rest, True
                    # ".\n", or ".\r\n" after a bare LF: not the end, kept as content
                else:
                    line = line[1:]
            if b"\r" in line:
                self.bare_cr = True
                line = line.replace(b"\r", b"\r\n")
            out.append(line + b"\r\n")
            at_start = True
            after_crlf = crlf
        self.line_start = True
        self.after_crlf = after_crlf
        return b"".join(out), rest, False


class NewlineNormaliser:
    """Bare LF and bare CR of a BDAT message written as CRLF, across chunk boundaries.

    ``bare_lf`` / ``bare_cr`` tell whether any was seen.
    """

    def __init__(self) -> None:
        self.pending_cr = False
        self.bare_lf = False
        self.bare_cr = False

    @property
    def bare(self) -> bool:
        """Was any bare LF or bare CR seen?"""
        return self.bare_lf or self.bare_cr

    def feed(self, data: bytes, final: bool = False) -> bytes:
        """The normalised form of the next octets; ``final`` at the end of the message."""
        if self.pending_cr:
            data = b"\r" + data
            self.pending_cr = False
        if not final and data.endswith(b"\r"):
            data = data[:-1]  # it may start a CRLF that the next chunk completes
            self.pending_cr = True
        if _clean(data):
            return data
        crlf = data.count(b"\r\n")
        if data.count(b"\n") != crlf:
            self.bare_lf = True
        if data.count(b"\r") != crlf:
            self.bare_cr = True
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


class ChunkReader:
    """The octets of one BDAT chunk as they arrive: exactly ``size`` of them.

    ``last`` is the chunk's LAST flag; ``keep`` is False when the chunk is read
    only to be thrown away (a refused BDAT must still be read to stay in sync).
    """

    def __init__(self, size: int, last: bool, keep: bool = True) -> None:
        self.size = size
        self.last = last
        self.keep = keep
        self.remaining = size

    def feed(self, buf: bytes) -> tuple[bytes, bytes, bool]:
        """``(chunk octets, bytes after the chunk, chunk complete)`` for input ``buf``."""
        take = min(self.remaining, len(buf))
        self.remaining -= take
        if take == len(buf):
            return buf, b"", self.remaining == 0
        return buf[:take], buf[take:], self.remaining == 0


def dot_stuff(message: bytes) -> bytes:
    """What a client sends for ``message`` (CRLF lines): stuffed lines and the terminator."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    lines = message.split(b"\r\n")[:-1] if message else []
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"
