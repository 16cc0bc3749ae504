"""Hostile ZIP files for the scanner tests and bench/scan_bomb.py, built byte by byte.

* :func:`zip_of` - an ordinary archive (zipfile).
* :func:`raw_zip` - entries whose local and central headers say what the test
  wants: lying sizes, shared data, a different name in the local header.
* :func:`ratio_bomb` - one member of zeros (deflate packs them ~1000:1).
* :func:`nested_bomb` - the 42.zip shape: ``width`` copies of an archive of
  ``width`` copies ... ``depth`` levels down to a small member of zeros.
* :func:`overlap_bomb` - the "better zip bomb" shape: many central entries
  whose data is one shared compressed kernel.
* :func:`deep_zip` - one member nested ``depth`` archives deep.
* :func:`mime_attachment` - a message with the archive attached in base64.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import struct
import zipfile
import zlib
from typing import Optional


def zip_of(*members: tuple[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """An ordinary ZIP of ``(name, data)`` members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def _flushed_zeros(size: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return z.compress(b"\0" * size) + z.flush(zlib.Z_FULL_FLUSH)


@functools.lru_cache(maxsize=16)
def deflate_zeros(size: int) -> bytes:
    """Raw deflate of ``size`` zero bytes, cheaply: a 1 MiB block compressed once and
    repeated (after a full flush a block does not depend on what came before)."""
    mib = 1 << 20
    whole, rest = divmod(size, mib)
    out = _flushed_zeros(mib) * whole
    if rest:
        out += _flushed_zeros(rest)
    return out + b"\x03\x00"   # an empty final block


@functools.lru_cache(maxsize=16)
def crc_zeros(size: int) -> int:
    """CRC-32 of ``size`` zero bytes."""
    crc = 0
    chunk = b"\0" * (1 << 20)
    left = size
    while left > 0:
        crc = zlib.crc32(chunk[:min(left, len(chunk))], crc)
        left -= min(left, len(chunk))
    return crc


@dataclasses.dataclass
class RawEntry:
    """One member as it is written: ``data`` already compressed by ``method``."""

    name: str
    data: bytes
    size: int
    crc: int = 0
    method: int = 8
    flags: int = 0
    local_name: Optional[str] = None     # a different name in the local header
    declared_size: Optional[int] = None  # a lie in both headers
    offset_of: Optional[int] = None      # share the local header of entry N


def raw_zip(entries: list[RawEntry]) -> bytes:
    """A ZIP written header by header (ZIP64 extra fields when a size needs them)."""
    out = bytearray()
    offsets: list[int] = []
    for e in entries:
        if e.offset_of is not None:
            offsets.append(offsets[e.offset_of])
            continue
        offsets.append(len(out))
        name = (e.local_name if e.local_name is not None else e.name).encode()
        size = e.declared_size if e.declared_size is not None else e.size
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, e.flags, e.method, 0, 0x21,
                           e.crc, min(len(e.data), 0xFFFFFFFF), min(size, 0xFFFFFFFF),
                           len(name), 0)
        out += name + e.data
    cd_start = len(out)
    for e, offset in zip(entries, offsets):
        name = e.name.encode()
        size = e.declared_size if e.declared_size is not None else e.size
        extra = b""
        fields = b""
        if size >= 0xFFFFFFFF:
            fields += struct.pack("<Q", size)
        if len(e.data) >= 0xFFFFFFFF:
            fields += struct.pack("<Q", len(e.data))
        if fields:
            extra = struct.pack("<HH", 1, len(fields)) + fields
        out += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 20, e.flags, e.method, 0,
                           0x21, e.crc, min(len(e.data), 0xFFFFFFFF),
                           0xFFFFFFFF if size >= 0xFFFFFFFF else size, len(name), len(extra),
                           0, 0, 0, 0, offset)
        out += name + extra
    cd_size = len(out) - cd_start
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), cd_size,
                       cd_start, 0)
    return bytes(out)


def ratio_bomb(size: int, name: str = "zeros.bin", with_crc: bool = True) -> bytes:
    """One deflated member of ``size`` zeros, sizes declared truthfully (the CRC too,
    unless ``with_crc`` is false: for bombs no scan is meant to finish)."""
    return raw_zip([RawEntry(name, deflate_zeros(size), size,
                             crc_zeros(size) if with_crc else 0)])


def nested_bomb(width: int, depth: int, leaf_size: int) -> bytes:
    """42.zip's shape: ``width`` archives per level, ``depth`` levels, a leaf of zeros."""
    level = raw_zip([RawEntry(f"{i}.bin", deflate_zeros(leaf_size), leaf_size,
                              crc_zeros(leaf_size)) for i in range(width)])
    for d in range(depth - 1):
        level = zip_of(*[(f"lib{d}_{i}.zip", level) for i in range(width)])
    return level


def overlap_bomb(files: int, kernel_size: int, name_length: int = 0) -> bytes:
    """``files`` central entries (at most 65535), every one pointing at the same compressed
    kernel; names padded to ``name_length`` to make the directory as large as wanted."""
    kernel = deflate_zeros(kernel_size)
    first = RawEntry("0.bin", kernel, kernel_size, crc_zeros(kernel_size))
    return raw_zip([first] + [dataclasses.replace(first, name=f"{i}.bin".rjust(name_length, "x"),
                                                  offset_of=0) for i in range(1, files)])


def deep_zip(depth: int, name: str, data: bytes) -> bytes:
    """``name`` inside ``depth`` nested archives (depth 1: a plain archive)."""
    blob = zip_of((name, data))
    for d in range(depth - 1):
        blob = zip_of((f"level{depth - 1 - d}.zip", blob))
    return blob


def mime_attachment(blob: bytes, filename: str = "archive.zip",
                    content_type: str = "application/zip", subject: str = "Files") -> bytes:
    """A multipart message with a text part and ``blob`` attached (base64)."""
    body = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    return (f"From: alice@sender.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Date: Wed, 25 Nov 2026 09:00:00 +0000\r\nMessage-ID: <z@sender.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"ZB\"\r\n\r\n"
            f"--ZB\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            f"--ZB\r\nContent-Type: {content_type}\r\n"
            f"Content-Disposition: attachment; filename=\"{filename}\"\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n").encode() + body + b"--ZB--\r\n"
