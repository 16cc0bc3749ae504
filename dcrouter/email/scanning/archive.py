"""ZIP archives read under a :class:`~dcrouter.email.scanning.limits.Budget`, streaming.

The central directory is read here (not by :mod:`zipfile`, which builds
every entry before anyone can count them) and checked before anything is
unpacked:

* more entries than the budget has files left, or a directory larger than
  that many entries can be: ``MaxFiles`` before a single entry is built;
* a declared size over ``MaxFileSize``, a declared ratio over ``MaxRatio``,
  declared sizes that add up to more than ``MaxScanSize``: exceeded as
  declared (the recipient's unzip believes them too);
* entries whose data overlap one another or the directory (the "better
  zip bomb" that reuses one compressed kernel for every file) or lie outside
  the file: ``Heuristics.Zip.OverlappingFiles`` / ``Heuristics.Broken.Zip``.

Members are then inflated in chunks of :data:`CHUNK` bytes and every chunk
is charged (bytes, ratio of what came out to what went in, time), so a
member that lies about its size is stopped just the same; a nested archive
goes to a spooled temporary file (memory up to 1 MiB, then disk) and is read
one level deeper.  Both names of a member are reported when the local header
disagrees with the central directory, and the Info-ZIP Unicode path too:
extractors differ in which one they show.  Encrypted members and unknown
compression methods keep their names checked; their content is noted as not
scanned (as clamd does without ``AlertEncrypted``).
"""

from __future__ import annotations

import bz2
import dataclasses
import struct
import tempfile
import zlib
from typing import IO, Any, Optional, Protocol

from dcrouter.email.scanning.limits import Budget, Unscannable

#: Bytes read and inflated per step.
CHUNK = 64 * 1024

#: Where a ZIP may be recognised by its first bytes.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")

_EOCD = struct.Struct("<4sHHHHIIH")          # 22 bytes
_ZIP64_LOCATOR = struct.Struct("<4sIQI")     # 20 bytes
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")      # 30 bytes
_MAX_COMMENT = 65535
#: The most a central directory entry is expected to take on average (name, extra, comment).
_MAX_ENTRY_BYTES = 1100


class Findings(Protocol):
    """Where the archive reader reports names and content (see analysis.Findings)."""

    def add_name(self, display: str, name: str, archived: bool) -> None:
        """A file name seen at ``display`` (the path shown in reports)."""

    def note(self, text: str) -> None:
        """Something not scanned (encrypted, unknown method)."""

    def content(self, where: str) -> Any:
        """A sink for one member's bytes: ``feed(chunk)``, ``close()``."""


@dataclasses.dataclass
class Entry:
    """One central directory entry."""

    name: str
    flags: int
    method: int
    compressed: int
    size: int
    offset: int
    crc: int = 0
    unicode_name: str = ""


def is_zip_magic(head: bytes) -> bool:
    """Do these first bytes start a ZIP file?"""
    return head[:4] in ZIP_MAGIC


def _broken(where: str, why: str) -> Unscannable:
    return Unscannable("Heuristics.Broken.Zip", f"{where}: {why}")


def _read_at(f: IO[bytes], offset: int, count: int) -> bytes:
    f.seek(offset)
    return f.read(count)


def _decode_name(raw: bytes, flags: int) -> str:
    if flags & 0x800:
        return raw.decode("utf-8", "replace")
    return raw.decode("cp437")


def _extra_fields(extra: bytes) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        fields.setdefault(tag, extra[pos + 4:pos + 4 + length])
        pos += 4 + length
    return fields


def _end_record(f: IO[bytes], size: int, where: str) -> tuple[int, int, int, int]:
    """(entries, directory size, directory offset as recorded, position of the record)."""
    tail_start = max(0, size - _EOCD.size - _MAX_COMMENT)
    tail = _read_at(f, tail_start, size - tail_start)
    pos = tail.rfind(b"PK\x05\x06")
    while pos >= 0 and len(tail) - pos < _EOCD.size:
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
    if pos < 0:
        raise _broken(where, "no end of central directory record")
    _sig, _disk, _cd_disk, _here, entries, cd_size, cd_offset, _clen = \
        _EOCD.unpack_from(tail, pos)
    record = tail_start + pos
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        if record < _ZIP64_LOCATOR.size:
            raise _broken(where, "ZIP64 sizes without a ZIP64 locator")
        locator = _read_at(f, record - _ZIP64_LOCATOR.size, _ZIP64_LOCATOR.size)
        sig, _d, z64_offset, _n = _ZIP64_LOCATOR.unpack(locator)
        if sig != b"PK\x06\x07":
            raise _broken(where, "ZIP64 sizes without a ZIP64 locator")
        # the ZIP64 record sits just before the locator (prepended data shifts both)
        z64_pos = record - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
        data = _read_at(f, z64_pos, _ZIP64_EOCD.size) if z64_pos >= 0 else b""
        if len(data) != _ZIP64_EOCD.size or data[:4] != b"PK\x06\x06":
            raise _broken(where, f"no ZIP64 end record (recorded at {z64_offset})")
        (_s, _rs, _vm, _vn, _dk, _cdk, _here64, entries, cd_size,
         cd_offset) = _ZIP64_EOCD.unpack(data)
        record = z64_pos
    return entries, cd_size, cd_offset, record


def read_directory(f: IO[bytes], size: int, where: str, budget: Budget) -> tuple[list[Entry],
                                                                                  int, int]:
    """The entries, the offset of prepended data and where the directory starts."""
    entries, cd_size, cd_offset, record = _end_record(f, size, where)
    left = budget.files_left()
    if entries > left or cd_size > max(left, 1) * _MAX_ENTRY_BYTES:
        raise budget.exceeded("max_files", f"{where}: {entries} entries in "
                               f"{cd_size} bytes of directory")
    cd_start = record - cd_size
    base = cd_start - cd_offset   # bytes prepended to the archive (self-extractors)
    if cd_start < 0 or base < 0:
        raise _broken(where, "central directory outside the file")
    directory = _read_at(f, cd_start, cd_size)
    if len(directory) != cd_size:
        raise _broken(where, "central directory truncated")
    out: list[Entry] = []
    pos = 0
    while pos < cd_size:
        if pos + _CENTRAL.size > cd_size:
            raise _broken(where, "central directory entry truncated")
        (sig, _made, _need, flags, method, _t, _d, crc, csize, usize, nlen, xlen, clen,
         _disk, _ia, _ea, offset) = _CENTRAL.unpack_from(directory, pos)
        if sig != b"PK\x01\x02":
            raise _broken(where, "bad central directory entry")
        pos += _CENTRAL.size
        raw_name = directory[pos:pos + nlen]
        extra = _extra_fields(directory[pos + nlen:pos + nlen + xlen])
        pos += nlen + xlen + clen
        if pos > cd_size:
            raise _broken(where, "central directory entry truncated")
        z64 = extra.get(0x0001, b"")
        k = 0
        for field in ("size", "csize", "offset"):
            value = {"size": usize, "csize": csize, "offset": offset}[field]
            if value == 0xFFFFFFFF:
                if k + 8 > len(z64):
                    raise _broken(where, "ZIP64 extra field missing")
                value = struct.unpack_from("<Q", z64, k)[0]
                k += 8
                if field == "size":
                    usize = value
                elif field == "csize":
                    csize = value
                else:
                    offset = value
        entry = Entry(_decode_name(raw_name, flags), flags, method, csize, usize, offset, crc)
        upath = extra.get(0x7075, b"")
        if len(upath) > 5 and upath[0] == 1:
            entry.unicode_name = upath[5:].decode("utf-8", "replace")
        out.append(entry)
        if len(out) > left:
            raise budget.exceeded("max_files", f"{where}: more entries than {left}")
    return out, base, cd_start


def _local_name_and_data(f: IO[bytes], entry: Entry, base: int, where: str) -> tuple[str, int]:
    header = _read_at(f, base + entry.offset, _LOCAL.size)
    if len(header) != _LOCAL.size or header[:4] != b"PK\x03\x04":
        raise _broken(where, f"no local header for {entry.name!r}")
    (_sig, _need, flags, _method, _t, _d, _crc, _cs, _us, nlen, xlen) = _LOCAL.unpack(header)
    raw = _read_at(f, base + entry.offset + _LOCAL.size, nlen)
    return _decode_name(raw, flags), base + entry.offset + _LOCAL.size + nlen + xlen


class _Inflater:
    """Streaming decompression of one method, at most ``CHUNK`` bytes out per call."""

    def __init__(self, method: int) -> None:
        self.method = method
        self._z: Any = None
        if method == 8:
            self._z = zlib.decompressobj(-15)
        elif method == 12:
            self._z = bz2.BZ2Decompressor()
        self.pending = b""

    def feed(self, data: bytes) -> bytes:
        """Decompress ``data`` (plus what was left over) up to CHUNK bytes out."""
        data = self.pending + data
        self.pending = b""
        if self.method == 0:
            out, self.pending = data[:CHUNK], data[CHUNK:]
            return out
        if self.method == 8:
            out = self._z.decompress(data, CHUNK)
            self.pending = self._z.unconsumed_tail
            return bytes(out)
        if self._z.eof:
            return b""
        out = self._z.decompress(data, CHUNK)
        return bytes(out)

    def has_more(self) -> bool:
        """More output may come without more input."""
        if self.method in (0, 8):
            return bool(self.pending)
        return not self._z.eof and not self._z.needs_input

    @property
    def finished(self) -> bool:
        """The stream ended (for deflate and bzip2)."""
        if self.method == 8:
            return bool(self._z.eof)
        if self.method == 12:
            return bool(self._z.eof)
        return not self.pending


def _stream(f: IO[bytes], entry: Entry, data_start: int, where: str, budget: Budget,
            sink: Any, spool: Optional[IO[bytes]], head_only: bool) -> bytes:
    """Unpack one member into ``sink`` (and ``spool``), charging the budget as it goes.

    Returns the first bytes (for magic). ``head_only`` stops after them."""
    inflater = _Inflater(entry.method)
    left = entry.compressed
    consumed = 0
    unpacked = 0
    crc = 0
    head = b""
    f.seek(data_start)
    try:
        while True:
            if inflater.has_more():
                out = inflater.feed(b"")
            elif left > 0:
                piece = f.read(min(CHUNK, left))
                if not piece:
                    raise _broken(where, "member data truncated")
                left -= len(piece)
                consumed += len(piece)
                out = inflater.feed(piece)
            else:
                break
            if not out:
                if left <= 0 and not inflater.has_more():
                    break
                continue
            unpacked += len(out)
            if len(head) < 8:
                head += out[:8 - len(head)]
            budget.charge_bytes(len(out), where)
            budget.check_file_size(unpacked, where)
            budget.check_ratio(unpacked, consumed - len(inflater.pending), where)
            crc = zlib.crc32(out, crc)
            if sink is not None:
                sink.feed(out)
            if spool is not None:
                spool.write(out)
            if head_only and len(head) >= 4:
                return head
    except (zlib.error, OSError, EOFError, ValueError) as e:
        raise _broken(where, f"cannot unpack: {e}") from None
    if not inflater.finished:
        raise _broken(where, "compressed data ends early")
    if crc != entry.crc:
        raise _broken(where, "CRC mismatch")
    return head


def inspect_zip(f: IO[bytes], size: int, where: str, depth: int, budget: Budget,
                findings: Findings, want_content: bool, tmp_dir: Optional[str] = None) -> None:
    """Check every member of the ZIP in ``f`` (``size`` bytes) found at ``where``."""
    budget.enter(depth, where)
    entries, base, cd_start = read_directory(f, size, where, budget)
    spans: list[tuple[int, int, str]] = []
    declared = 0
    locals_: list[tuple[str, int]] = []
    for entry in entries:
        path = f"{where}/{entry.name}"
        budget.charge_file(path)
        local_name, data_start = _local_name_and_data(f, entry, base, path)
        locals_.append((local_name, data_start))
        spans.append((base + entry.offset, data_start + entry.compressed, entry.name))
        if not entry.name.endswith("/"):
            budget.check_file_size(entry.size, path + " (declared)")
            budget.check_ratio(entry.size, entry.compressed, path + " (declared)")
            declared += entry.size
        budget.check_time()
    limit = budget.limits.max_scan_size
    if limit and declared > limit:
        raise budget.exceeded("max_scan_size", f"{where}: members declare {declared} bytes")
    spans.sort()
    for (start, end, name), (next_start, _e, next_name) in zip(spans, spans[1:]):
        if next_start < end:
            raise Unscannable("Heuristics.Zip.OverlappingFiles",
                              f"{where}: {name!r} and {next_name!r} share data")
    if spans and spans[-1][1] > cd_start:
        raise Unscannable("Heuristics.Zip.OverlappingFiles",
                          f"{where}: {spans[-1][2]!r} runs into the central directory")
    for entry, (local_name, data_start) in zip(entries, locals_):
        path = f"{where}/{entry.name}"
        for name in dict.fromkeys((entry.name, local_name, entry.unicode_name)):
            if name:
                findings.add_name(f"{where}/{name}", name, True)
        if entry.name.endswith("/") or entry.size == 0 and entry.compressed == 0:
            continue
        if entry.flags & 0x41:
            findings.note(f"{path}: encrypted, content not scanned")
            continue
        if entry.method not in (0, 8, 12):
            findings.note(f"{path}: compression method {entry.method}, content not scanned")
            continue
        if entry.method == 0 and entry.compressed != entry.size:
            raise _broken(path, "stored member whose sizes differ")
        nested_by_name = entry.name.lower().endswith(".zip")
        if not want_content and not nested_by_name:
            head = _stream(f, entry, data_start, path, budget, None, None, head_only=True)
            if not is_zip_magic(head):
                continue
        with tempfile.SpooledTemporaryFile(max_size=1 << 20, dir=tmp_dir) as spool:
            sink = findings.content(path) if want_content else None
            head = _stream(f, entry, data_start, path, budget, sink, spool, head_only=False)
            if sink is not None:
                sink.close()
            if is_zip_magic(head) or (nested_by_name and spool.tell()):
                nested_size = spool.tell()
                inspect_zip(spool, nested_size, path, depth + 1, budget, findings,  # type: ignore[arg-type]
                            want_content, tmp_dir)


__all__ = ["CHUNK", "Entry", "Findings", "ZIP_MAGIC", "inspect_zip", "is_zip_magic",
           "read_directory"]
