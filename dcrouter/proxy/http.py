"""HTTP on plain proxy ports: request heads, routing helpers and small replies.

:func:`parse_head` and :func:`render_head` read and write one request head (up
to :data:`MAX_HEAD` bytes).  The connection itself is handled request by
request by :mod:`dcrouter.proxy.httprelay` with the framing of
:mod:`dcrouter.proxy.httpstream` (HAProxy's keep-alive mode): every request
head of a kept-alive connection is routed by ``Host`` and path on its own and
gets its own ``X-Forwarded-For``/``X-Forwarded-Proto`` when its route asks;
only a ``101 Switching Protocols`` answer (WebSocket) turns the rest of the
connection into a plain byte tunnel.

``/.well-known/acme-challenge/`` is answered from the ACME responder before
any route is consulted; ``redirect_to_https`` routes answer ``301``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

MAX_HEAD = 32 * 1024
ACME_PREFIX = "/.well-known/acme-challenge/"

_TOKENS = set(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclasses.dataclass
class RequestHead:
    """The first request of a connection: request line and headers as received."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> Optional[str]:
        """The first value of header ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def host(self) -> Optional[str]:
        """``Host`` without port, lower case (or the host of an absolute-form target)."""
        value = self.header("host")
        if value is None and "://" in self.target:
            value = self.target.split("://", 1)[1].split("/", 1)[0]
        if not value:
            return None
        value = value.strip().lower()
        if value.startswith("["):
            return value[1:value.find("]")] if "]" in value else None
        return value.rsplit(":", 1)[0] if ":" in value else value

    @property
    def path(self) -> str:
        """The path (with query) of the request target."""
        target = self.target
        if "://" in target:
            rest = target.split("://", 1)[1]
            target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        return target


def parse_head(raw: bytes) -> RequestHead:
    """Parse a request head (up to and excluding the blank line); ValueError if malformed."""
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise ValueError("undecodable head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0] \
            or not set(parts[0].encode()) <= _TOKENS or not parts[1]:
        raise ValueError("bad request line")
    return RequestHead(parts[0], parts[1], parts[2], parse_headers(lines[1:]))


def parse_headers(lines: list[str]) -> list[tuple[str, str]]:
    """Header lines as (name, value) pairs; ValueError on folding or a malformed line."""
    headers: list[tuple[str, str]] = []
    for line in lines:
        if not line:
            continue
        if line[0] in " \t":
            raise ValueError("obsolete header folding")
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name.encode()) <= _TOKENS:
            raise ValueError("bad header line")
        headers.append((name, value.strip()))
    return headers


def render_head(head: RequestHead, client_ip: Optional[str] = None,
                proto: Optional[str] = None) -> bytes:
    """The head as bytes; with ``client_ip``/``proto``, X-Forwarded-For/-Proto added."""
    headers = list(head.headers)
    if client_ip is not None:
        forwarded = [v for k, v in headers if k.lower() == "x-forwarded-for"]
        headers = [(k, v) for k, v in headers if k.lower() not in ("x-forwarded-for",
                                                                   "x-forwarded-proto")]
        headers.append(("X-Forwarded-For", ", ".join(forwarded + [client_ip])))
        if proto:
            headers.append(("X-Forwarded-Proto", proto))
    lines = [f"{head.method} {head.target} {head.version}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response(status: int, reason: str, body: bytes = b"", content_type: str = "text/plain",
             extra: Optional[list[tuple[str, str]]] = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines.extend(f"{k}: {v}" for k, v in (extra or []))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def redirect_to_https(head: RequestHead) -> bytes:
    """``301`` to ``https://host/path`` (host without its port)."""
    host = head.host or ""
    if ":" in host:
        host = f"[{host}]"
    location = f"https://{host}{head.path}"
    return response(301, "Moved Permanently", f"Moved to {location}\n".encode("latin-1"),
                    extra=[("Location", location)])


def acme_token(path: str) -> Optional[str]:
    """The token of an http-01 challenge path, else None."""
    if not path.startswith(ACME_PREFIX):
        return None
    token = path[len(ACME_PREFIX):].split("?", 1)[0]
    return token if token and "/" not in token else None
