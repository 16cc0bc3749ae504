"""HTTP on plain proxy ports: request heads, routing helpers and small replies.

:func:`parse_head` and :func:`render_head` read and write one request head (up
to :data:`MAX_HEAD` bytes); :func:`normalize_request_target` checks the
request target and ``Host`` (RFC 9112 3.2: an absolute-form target is routed
by its authority and sent on in origin-form).  The connection itself is handled request by
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
import re
from typing import Optional

MAX_HEAD = 32 * 1024
ACME_PREFIX = "/.well-known/acme-challenge/"

_TOKENS = set(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclasses.dataclass
class RequestHead:
    """One request head: request line and headers as received.

    ``raw`` is the head as received (without the blank line) when the framer
    has it; :func:`render_head` then sends it on as it is, with only the
    forwarded headers appended, unless the target was rewritten (absolute
    form) or the client sent ``X-Forwarded-*`` headers of its own.
    """

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    raw: bytes = b""
    forwarded: bool = True          # X-Forwarded-* among the headers (True: unknown)
    rewritten: bool = False         # target or Host changed by normalize_request_target
    keep_alive: Optional[bool] = None   # the connection may go on after it (None: unknown)
    upgrade: Optional[bool] = None      # it has an Upgrade header (None: unknown)

    def header(self, name: str) -> Optional[str]:
        """The first value of header ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def host(self) -> Optional[str]:
        """``Host`` without port, lower case (None when absent or empty).

        After :func:`normalize_request_target` an absolute-form target's
        authority is the ``Host``.
        """
        value = self.header("host")
        if not value:
            return None
        return split_authority(value)[0] or None

    @property
    def path(self) -> str:
        """The path (with query) of the request target (origin-form after
        :func:`normalize_request_target`)."""
        return self.target


_AUTHORITY = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)"
                        r"(?::([0-9]{0,5}))?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


_AUTHORITIES: dict[str, tuple[str, Optional[int]]] = {}
_AUTHORITIES_MAX = 4096


def split_authority(value: str) -> tuple[str, Optional[int]]:
    """``host[:port]`` (RFC 3986 authority without userinfo) -> (lower-case host without
    brackets, port or None); ValueError when it is not one.

    Valid results are remembered (a few thousand names), so the ``Host`` of
    every request of a busy site is not matched against the pattern again.
    """
    known = _AUTHORITIES.get(value)
    if known is not None:
        return known
    result = _split_authority(value)
    if len(_AUTHORITIES) >= _AUTHORITIES_MAX:
        _AUTHORITIES.clear()
    _AUTHORITIES[value] = result
    return result


def _split_authority(value: str) -> tuple[str, Optional[int]]:
    m = _AUTHORITY.match(value.strip())
    if m is None:
        raise ValueError(f"invalid authority {value[:100]!r}")
    host, port = m.group(1).lower(), m.group(2)
    if host.startswith("["):
        host = host[1:-1]
    if port:
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError(f"invalid port in {value[:100]!r}")
        return host, number
    return host, None


def _same_authority(a: str, b: str, scheme: str) -> bool:
    """Whether two authorities name the same host and port (default port of ``scheme``)."""
    default = _DEFAULT_PORTS.get(scheme)
    host_a, port_a = split_authority(a)
    host_b, port_b = split_authority(b)
    return host_a == host_b and (port_a or default) == (port_b or default)


def _set_host(head: "RequestHead", authority: str) -> None:
    """Replace the ``Host`` value in place (or add it first)."""
    for i, (key, _value) in enumerate(head.headers):
        if key.lower() == "host":
            head.headers[i] = (key, authority)
            return
    head.headers.insert(0, ("Host", authority))


def normalize_request_target(head: "RequestHead") -> None:
    """Check the request target and ``Host`` (RFC 9112 3.2); ValueError means 400.

    * origin-form (``/path?query``) is kept; ``*`` only for ``OPTIONS``;
      authority-form (``host:port``) only, and always, for ``CONNECT``;
    * absolute-form (``http://host/path``, ``https://``): the target's
      authority decides - a ``Host`` naming another host or port is refused
      (as HAProxy does), the ``Host`` is set to the authority and the target
      becomes origin-form, so the route is chosen by the name the backend
      will see and the backend never gets the absolute form;
    * userinfo (``user@host``), an invalid ``Host``, more than one ``Host``,
      and an HTTP/1.1 request without one are refused.
    """
    hosts = [value for key, value in head.headers if key.lower() == "host"]
    if len(hosts) > 1:
        raise ValueError("more than one Host")
    if hosts:
        split_authority(hosts[0])
    target = head.target
    if head.method == "CONNECT":
        host, port = split_authority(target)
        if not host or port is None or "/" in target:
            raise ValueError("CONNECT needs an authority-form target (host:port)")
        if hosts and not _same_authority(hosts[0], target, ""):
            raise ValueError("Host does not match the CONNECT target")
        _set_host(head, target)
        head.rewritten = True
    elif target.startswith("/"):
        pass
    elif target == "*":
        if head.method != "OPTIONS":
            raise ValueError("asterisk-form target outside OPTIONS")
    elif "://" in target:
        target_scheme, _, rest = target.partition("://")
        target_scheme = target_scheme.lower()
        if target_scheme not in _DEFAULT_PORTS:
            raise ValueError(f"absolute-form target with scheme {target_scheme[:20]!r}")
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, path = rest[:cut], rest[cut:]
        if "@" in authority:
            raise ValueError("userinfo in the request target")
        host, _port = split_authority(authority)
        if not host:
            raise ValueError("absolute-form target without a host")
        if hosts and not _same_authority(hosts[0], authority, target_scheme):
            raise ValueError("Host does not match the absolute-form target's authority")
        _set_host(head, authority)
        head.target = path if path.startswith("/") else "/" + path
        head.rewritten = True
    else:
        raise ValueError("request target is not origin-form (/path) or absolute-form")
    if head.version != "HTTP/1.0" and head.header("host") is None:
        raise ValueError("HTTP/1.1 request without Host")


def parse_head(raw: bytes) -> RequestHead:
    """Parse a request head (up to and excluding the blank line) and normalize its target
    (:func:`normalize_request_target`); ValueError if malformed."""
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise ValueError("undecodable head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0] \
            or not set(parts[0].encode()) <= _TOKENS or not parts[1]:
        raise ValueError("bad request line")
    head = RequestHead(parts[0], parts[1], parts[2], parse_headers(lines[1:]))
    normalize_request_target(head)
    return head


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
    """The head as bytes; with ``client_ip``/``proto``, X-Forwarded-For/-Proto added.

    A head the framer kept as received (``raw``, not rewritten) goes out as
    it came, the forwarded headers appended when the client sent none of its
    own; else it is rendered from its parts.
    """
    if head.raw and not head.rewritten:
        if client_ip is None:
            return head.raw + b"\r\n\r\n"
        if not head.forwarded:
            tail = f"\r\nX-Forwarded-For: {client_ip}\r\nX-Forwarded-Proto: {proto}\r\n\r\n" \
                if proto else f"\r\nX-Forwarded-For: {client_ip}\r\n\r\n"
            return head.raw + tail.encode("latin-1")
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
