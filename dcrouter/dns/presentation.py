"""Zone-file presentation text: tokenising values, TXT strings, quoting (RFC 1035 5.1)."""

from __future__ import annotations

import struct

from dcrouter.errors import ConfigError


def tokenize(value: str, path: str) -> list[bytes]:
    """Split presentation text into fields; quoted strings keep spaces; \\X and \\DDD escapes."""
    out: list[bytes] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c.isspace() or c in "()":
            i += 1
            continue
        buf = bytearray()
        quoted = c == '"'
        if quoted:
            i += 1
        while i < n:
            c = value[i]
            if quoted and c == '"':
                i += 1
                break
            if not quoted and (c.isspace() or c in "()"):
                break
            if c == "\\" and i + 1 < n:
                nxt = value[i + 1:i + 4]
                if len(nxt) == 3 and nxt.isascii() and nxt.isdigit() and int(nxt) < 256:
                    buf.append(int(nxt))
                    i += 4
                    continue
                buf.extend(value[i + 1].encode("utf-8"))
                i += 2
                continue
            buf.extend(c.encode("utf-8"))
            i += 1
        else:
            if quoted:
                raise ConfigError(path, "unterminated quoted string")
        out.append(bytes(buf))
    return out


def split_txt(data: bytes) -> list[bytes]:
    """One TXT string as 255-byte character-strings (an empty string stays one empty chunk)."""
    if not data:
        return [b""]
    return [data[i:i + 255] for i in range(0, len(data), 255)]


def quote(data: bytes) -> str:
    """``data`` as one quoted character-string (``"`` and ``\\`` escaped, others as \\DDD)."""
    out = []
    for b in data:
        if b in (0x22, 0x5C):
            out.append("\\" + chr(b))
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def caa_rdata_text(data: bytes) -> str:
    """Presentation text of CAA rdata (for tests and logs)."""
    flags, tag_len = struct.unpack("!BB", data[:2])
    tag = data[2:2 + tag_len].decode("ascii", "replace")
    return f"{flags} {tag} {quote(data[2 + tag_len:])}"
