"""Decoding the SMTP message streams: DATA (dot-stuffed lines) and BDAT chunks (RFC 3030).

:class:`DotDecoder` is fed the raw bytes as they arrive and returns message
bytes ready for the spool: every line ends in CRLF (a bare LF counts as a line
end), one leading dot is removed from dot-stuffed lines (RFC 5321 4.5.2), and
the line holding only a dot ends the message.  It never holds more than one
partial line, and splits a line longer than ``partial_flush`` bytes.

:class:`ChunkReader` takes exactly the declared number of octets of one BDAT
chunk off the input, untouched (no line or dot processing), in whatever
pieces the network delivers them.
"""

from __future__ import annotations

#: A line longer than this is passed on in pieces (never buffered whole).
PARTIAL_FLUSH = 64 * 1024


class DotDecoder:
    """Streaming decoder of one message's DATA section."""

    def __init__(self, partial_flush: int = PARTIAL_FLUSH) -> None:
        self.partial_flush = partial_flush
        self.line_start = True

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
            self.line_start = False
            return piece, rest, False
        chunk, rest = buf[:last + 1], buf[last + 1:]
        # Whole runs of lines are converted at once; only lines starting with a dot
        # (stuffed lines and the terminator) are looked at one by one.
        out: list[bytes] = []
        pos = 0
        at_start = self.line_start
        while True:
            if at_start and chunk.startswith(b".", pos):
                end = chunk.index(b"\n", pos)
                line = chunk[pos:end]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if line == b".":
                    self.line_start = True
                    return b"".join(out), chunk[end + 1:] + rest, True
                out.append(line[1:] + b"\r\n")
                pos = end + 1
                if pos == len(chunk):
                    break
                continue
            following = chunk.find(b"\n.", pos)
            segment = chunk[pos:] if following < 0 else chunk[pos:following + 1]
            if segment:
                out.append(segment.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
            if following < 0:
                break
            pos = following + 1
            at_start = True
        self.line_start = True
        return b"".join(out), rest, False


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
