"""A streaming MIME walker: a message file read once, in blocks, under a budget.

The standard ``email`` parser builds the whole tree in memory before anyone
can count its parts; this walker reads the spool file in blocks of
:data:`BLOCK` bytes, keeps only the boundaries of the open multiparts, and
hands each entity to a handler as it is reached:

* ``handler.entity(headers, path, depth)`` for every entity (the message,
  each part, each attached message), headers parsed by :mod:`email`
  (compat32, read as Latin-1: never raises on malformed input, and 8-bit
  values map back to their bytes);
* ``handler.leaf(headers, path, depth)`` returns a sink (``feed(bytes)``,
  ``close()``) for a leaf's body with the transfer encoding removed, or None.

Every entity is charged to the budget (MaxFiles, MaxRecursion: multipart and
message/rfc822 nesting both count) and every decoded byte (MaxScanSize), so a
message of a million parts or a thousand levels stops at the limit.  A line
that matches the delimiter of any open multipart ends the parts inside it
(mail clients do the same with a missing inner close delimiter).  Base64 is
decoded through padding in the middle of a body (each segment on its own),
where :func:`binascii.a2b_base64` alone would stop.
"""

from __future__ import annotations

import binascii
import dataclasses
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32
from typing import IO, Any, Optional, Protocol

from dcrouter.email.scanning.limits import Budget, LimitExceeded

#: Bytes read from the file at a time.
BLOCK = 256 * 1024
#: Longest line piece looked at for a boundary (longer lines are body data).
MAX_LINE = 8192
#: Header bytes one entity may have.
MAX_HEADER_BYTES = 256 * 1024

_B64_KEEP = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_B64_DELETE = bytes(b for b in range(256) if b not in _B64_KEEP)


class Handler(Protocol):
    """What the walker reports to (see the module docstring)."""

    def entity(self, headers: Message, path: str, depth: int) -> None:
        """Every entity, in order."""

    def leaf(self, headers: Message, path: str, depth: int) -> Any:
        """A sink for a leaf's decoded body, or None to skip it."""


class Base64Decoder:
    """Streaming, lenient base64: non-alphabet bytes skipped, padding ends a segment."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.acc = b""

    @staticmethod
    def _decode(data: bytes) -> bytes:
        rest = len(data) % 4
        if rest == 1:
            data = data[:-1]
        elif rest:
            data += b"=" * (4 - rest)
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            return b""

    def feed(self, data: bytes) -> None:
        """Decode what is complete and pass it on."""
        data = data.translate(None, _B64_DELETE)
        if not data:
            return
        segments = data.split(b"=")
        for segment in segments[:-1]:
            self.acc += segment
            if self.acc:
                self.sink.feed(self._decode(self.acc))
                self.acc = b""
        self.acc += segments[-1]
        whole = len(self.acc) - len(self.acc) % 4
        if whole:
            self.sink.feed(binascii.a2b_base64(self.acc[:whole]))
            self.acc = self.acc[whole:]

    def close(self) -> None:
        """Decode the rest (as if padded) and close the sink."""
        if self.acc:
            self.sink.feed(self._decode(self.acc))
            self.acc = b""
        self.sink.close()


class QuotedPrintableDecoder:
    """Streaming quoted-printable, decoded a complete line at a time."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.acc = b""

    def feed(self, data: bytes) -> None:
        """Decode the complete lines and pass them on."""
        self.acc += data
        end = self.acc.rfind(b"\n")
        if end < 0 and len(self.acc) < MAX_LINE:
            return
        cut = end + 1 if end >= 0 else len(self.acc)
        self.sink.feed(binascii.a2b_qp(self.acc[:cut]))
        self.acc = self.acc[cut:]

    def close(self) -> None:
        """Decode the rest and close the sink."""
        if self.acc:
            self.sink.feed(binascii.a2b_qp(self.acc))
        self.sink.close()


class _Counted:
    """Charges every decoded byte to the budget before passing it on."""

    def __init__(self, sink: Any, budget: Budget, where: str) -> None:
        self.sink = sink
        self.budget = budget
        self.where = where

    def feed(self, data: bytes) -> None:
        if data:
            self.budget.charge_bytes(len(data), self.where)
            self.sink.feed(data)

    def close(self) -> None:
        self.sink.close()


def decoder_for(headers: Message, sink: Any) -> Any:
    """The streaming decoder of the entity's Content-Transfer-Encoding."""
    cte = str(headers.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64":
        return Base64Decoder(sink)
    if cte == "quoted-printable":
        return QuotedPrintableDecoder(sink)
    return sink


class _Reader:
    """Blocks of a file, with line and "up to the next line starting with --" reads."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.buf = b""
        self.eof = False
        self.at_line_start = True

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(BLOCK)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def readline(self) -> bytes:
        """The next line (up to MAX_LINE bytes of it); b"" at the end of the file."""
        while True:
            end = self.buf.find(b"\n", 0, MAX_LINE)
            if end >= 0:
                line, self.buf = self.buf[:end + 1], self.buf[end + 1:]
                self.at_line_start = True
                return line
            if len(self.buf) >= MAX_LINE or not self._fill():
                line, self.buf = self.buf[:MAX_LINE], self.buf[MAX_LINE:]
                self.at_line_start = False
                return line

    def body(self) -> Optional[bytes]:
        """Data before the next line that starts with ``--`` (b"" when one is next);
        None at the end of the file."""
        while True:
            if self.at_line_start and len(self.buf) < 2 and not self.eof:
                self._fill()
                continue
            if self.at_line_start and self.buf[:2] == b"--":
                return b""
            hit = self.buf.find(b"\n--")
            if hit >= 0:
                data, self.buf = self.buf[:hit + 1], self.buf[hit + 1:]
                self.at_line_start = True
                return data
            if self.eof:
                if not self.buf:
                    return None
                data, self.buf = self.buf, b""
                self.at_line_start = data.endswith(b"\n")
                return data
            if len(self.buf) > 2:   # keep two bytes: "\n-" may go on in the next block
                data, self.buf = self.buf[:-2], self.buf[-2:]
                self.at_line_start = data.endswith(b"\n")
                return data
            self._fill()


@dataclasses.dataclass
class _Frame:
    """An open multipart: its delimiter and how many parts it has had."""

    delimiter: bytes
    depth: int
    path: str
    parts: int = 0


def _parse_headers(lines: list[bytes]) -> Message:
    """The header block as a Message; read as Latin-1 so that every value maps back to
    its bytes (8-bit names and boundaries survive; see analysis.part_names)."""
    return HeaderParser(policy=compat32).parsestr(b"".join(lines).decode("latin-1"))


def walk(f: IO[bytes], budget: Budget, handler: Handler, where: str = "message",
         depth: int = 0) -> None:
    """Walk the message in ``f``; raises ScanVerdict/ScanTimeExceeded from the budget."""
    reader = _Reader(f)
    frames: list[_Frame] = []
    mode = "headers"
    header_lines: list[bytes] = []
    header_bytes = 0
    path, level = where, depth
    sink: Any = None

    def start(headers: Message) -> str:
        nonlocal sink, path, level
        budget.charge_file(path)
        budget.enter(level, path)
        handler.entity(headers, path, level)
        ctype = headers.get_content_type()
        cte = str(headers.get("content-transfer-encoding", "")).strip().lower()
        boundary = headers.get_param("boundary") if ctype.startswith("multipart/") else None
        if isinstance(boundary, tuple):
            boundary = boundary[2]
        if boundary:
            text = str(boundary).strip()
            try:   # the header's own bytes (headers are read as Latin-1)
                raw = text.encode("latin-1")
            except UnicodeEncodeError:
                raw = text.encode("utf-8", "replace")
            delimiter = b"--" + raw
            frames.append(_Frame(delimiter, level, path))
            return "preamble"
        if ctype == "message/rfc822" and cte in ("", "7bit", "8bit", "binary"):
            path, level = path + "/message", level + 1
            return "headers"
        target = handler.leaf(headers, path, level)
        sink = decoder_for(headers, _Counted(target, budget, path)) if target is not None \
            else None
        return "body"

    def end_leaf() -> None:
        nonlocal sink
        if sink is not None:
            current, sink = sink, None
            current.close()

    def match(line: bytes) -> tuple[int, bool]:
        """(index of the frame whose delimiter this is, closing?) or (-1, False)."""
        text = line.rstrip(b" \t\r\n")
        for i in range(len(frames) - 1, -1, -1):
            d = frames[i].delimiter
            if text == d:
                return i, False
            if text == d + b"--":
                return i, True
        return -1, False

    while True:
        budget.check_time()
        if mode == "headers":
            line = reader.readline()
            if not line:
                mode = start(_parse_headers(header_lines))
                break
            index, closing = match(line) if frames and line.startswith(b"--") else (-1, False)
            if index < 0:
                if line in (b"\r\n", b"\n"):
                    headers = _parse_headers(header_lines)
                    header_lines, header_bytes = [], 0
                    mode = start(headers)
                    continue
                header_bytes += len(line)
                if header_bytes > MAX_HEADER_BYTES:
                    raise LimitExceeded("Heuristics.Limits.Exceeded.MaxHeaderSize",
                                        f"{path}: more than {MAX_HEADER_BYTES} header bytes")
                header_lines.append(line)
                continue
            # a delimiter where headers were expected: a part without a body
            start(_parse_headers(header_lines))
            header_lines, header_bytes = [], 0
        else:
            data = reader.body()
            if data is None:
                break
            if data:
                if mode == "body" and sink is not None:
                    sink.feed(data)
                continue
            line = reader.readline()
            index, closing = match(line) if frames else (-1, False)
            if index < 0:
                if mode == "body" and sink is not None:
                    sink.feed(line)
                continue
        # a delimiter of frames[index]: the parts inside it end here
        end_leaf()
        del frames[index + 1:]
        frame = frames[index]
        if closing:
            frames.pop()
            mode = "epilogue"
            continue
        frame.parts += 1
        path, level = f"{frame.path}/{frame.parts}", frame.depth + 1
        mode = "headers"
    end_leaf()


__all__ = ["BLOCK", "Base64Decoder", "Handler", "MAX_HEADER_BYTES", "QuotedPrintableDecoder",
           "decoder_for", "walk"]
