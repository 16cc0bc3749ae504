"""Where the shared Redis server is: one parser for ``email.queue.redis_url`` and one way to
connect to it (txredisapi), for the queue store, the rate limits and the API's failure limit.

Accepted: ``redis://[:password@]host[:port][/db]`` and ``unix:///path/to/socket[?db=N]``.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any, Optional


def _db(text: str, url: str) -> int:
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"the database in '{url}' must be a number, got '{text}'")
    return int(text)


@dataclasses.dataclass(frozen=True)
class RedisAddress:
    """A Redis server: TCP host and port, or a unix socket path; database and password."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: Optional[str] = None
    unix_path: str = ""

    @classmethod
    def parse(cls, url: str) -> "RedisAddress":
        """The address in ``url``; ValueError with a readable reason when it is not one."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError(f"'{url}' names no socket path")
            query = urllib.parse.parse_qs(parts.query)
            return cls(db=_db(query.get("db", [""])[0], url), unix_path=parts.path,
                       password=parts.password)
        if parts.scheme != "redis":
            raise ValueError(f"must be a redis:// or unix:// URL, got '{url}'")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"the port in '{url}' must be 1..65535") from None
        return cls(host=parts.hostname or "127.0.0.1", port=port,
                   db=_db(parts.path.strip("/"), url), password=parts.password)

    @property
    def label(self) -> str:
        """For logs and stats (never the password)."""
        return f"{self.unix_path or f'{self.host}:{self.port}'}/{self.db}"

    def connect(self, *, reconnect: bool, timeout: Optional[float] = None,
                raw: bool = False) -> Any:
        """A txredisapi connection Deferred; ``raw``: bytes in, bytes out (no charset, no
        number conversion), as the queue store wants."""
        import txredisapi
        options: dict[str, Any] = {"dbid": self.db, "reconnect": reconnect,
                                   "password": self.password}
        if timeout is not None:
            options.update(connectTimeout=timeout, replyTimeout=timeout)
        if raw:
            options.update(charset=None, convertNumbers=False)
        if self.unix_path:
            return txredisapi.UnixConnection(self.unix_path, **options)
        return txredisapi.Connection(self.host, self.port, **options)


__all__ = ["RedisAddress"]
