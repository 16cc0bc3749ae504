"""Bearer-token authentication of the management API, with a per-IP failure limit.

The token (``api.token``) is compared in constant time
(:func:`hmac.compare_digest`).  Every failed attempt is logged with the
client address; an address that presented ``api.max_auth_failures_per_minute``
wrong tokens in the last 60 seconds is answered 429 (with ``Retry-After``)
without its token being checked, until the oldest failure ages out.
An empty token means the API is open (allowed only on loopback addresses,
see :class:`dcrouter.config.api.ApiOptions`).
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import math
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from twisted.internet import defer

from dcrouter.api.errors import forbidden, too_many_requests, unauthorized
from dcrouter.logsetup import get_logger

log = get_logger("api.auth")

WINDOW = 60.0


class FailureLimiter:
    """Counts failures per key in a sliding window of :data:`WINDOW` seconds."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10000) -> None:
        self.limit = limit
        self.clock = clock
        self.max_keys = max_keys
        self._failures: dict[str, collections.deque[float]] = {}

    def _recent(self, key: str, now: float) -> Optional[collections.deque[float]]:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - WINDOW:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def blocked_for(self, key: str) -> int:
        """Seconds until ``key`` may try again (0: not blocked)."""
        now = self.clock()
        times = self._recent(key, now)
        if times is None or len(times) < self.limit:
            return 0
        return max(1, math.ceil(times[0] + WINDOW - now))

    def block_key(self, key: str) -> Optional[float]:
        """Identifies the current block of ``key`` (the time of its oldest counted failure)."""
        times = self._failures.get(key)
        return times[0] if times else None

    def record(self, key: str) -> int:
        """Count a failure; returns the failures of ``key`` in the window."""
        now = self.clock()
        if key not in self._failures and len(self._failures) >= self.max_keys:
            self._prune(now)
        times = self._recent(key, now)
        if times is None:
            times = self._failures[key] = collections.deque()
        times.append(now)
        return len(times)

    def _prune(self, now: float) -> None:
        for key in list(self._failures):
            self._recent(key, now)
        while len(self._failures) >= self.max_keys:  # still full: forget the oldest keys
            del self._failures[next(iter(self._failures))]


class TokenAuthenticator:
    """Checks ``Authorization: Bearer <token>`` headers; raises ApiError 401/429.

    With a ``shared`` limiter (:class:`~dcrouter.api.authshare.SharedFailureLimiter`,
    Redis) :meth:`verify` counts failures across every node as well; the
    in-process count always applies too, so a Redis outage still limits guesses.
    """

    def __init__(self, token: str, max_failures_per_minute: int,
                 clock: Callable[[], float] = time.monotonic, shared: Any = None) -> None:
        self.token = token
        self.limiter = FailureLimiter(max_failures_per_minute, clock)
        self.shared = shared
        self.failures = 0
        self.rate_limited = 0
        self._announced: dict[str, Any] = {}

    def update(self, token: str, max_failures_per_minute: int) -> None:
        """Apply a reloaded ``[api]`` section."""
        self.token = token
        self.limiter.limit = max_failures_per_minute
        if self.shared is not None:
            self.shared.limit = max_failures_per_minute

    @property
    def enabled(self) -> bool:
        """False when no token is configured (loopback-only open API)."""
        return bool(self.token)

    def check(self, authorization: Optional[bytes], client_ip: str, path: str) -> None:
        """Accept the request or raise :class:`~dcrouter.api.errors.ApiError` (401 or 429),
        counting failures in this process only."""
        if not self.enabled:
            return
        self._refuse_if_blocked(self.limiter.blocked_for(client_ip),
                                self.limiter.block_key(client_ip), client_ip, path)
        if self._accepts(authorization, client_ip, path):
            return
        self._refuse_wrong(client_ip, path, self.limiter.record(client_ip))

    def verify(self, authorization: Optional[bytes], client_ip: str,
               path: str) -> defer.Deferred:
        """As :meth:`check`, as a Deferred, consulting the shared limit when there is one."""
        if self.shared is None or not self.enabled:
            return defer.maybeDeferred(self.check, authorization, client_ip, path)
        return defer.ensureDeferred(self._verify_shared(authorization, client_ip, path))

    async def _verify_shared(self, authorization: Optional[bytes], client_ip: str,
                             path: str) -> None:
        shared_wait = await self.shared.blocked_for(client_ip)
        local_wait = self.limiter.blocked_for(client_ip)
        if local_wait >= shared_wait:
            self._refuse_if_blocked(local_wait, self.limiter.block_key(client_ip), client_ip,
                                    path)
        else:  # one block announces once: mark it by when it ends
            self._refuse_if_blocked(shared_wait, ("shared", round(time.time() + shared_wait)),
                                    client_ip, path)
        if self._accepts(authorization, client_ip, path):
            return
        local = self.limiter.record(client_ip)
        shared = await self.shared.record(client_ip)
        self._refuse_wrong(client_ip, path, shared if shared is not None else local)

    def _refuse_if_blocked(self, wait: int, block: Any, client_ip: str, path: str) -> None:
        if not wait:
            return
        self.rate_limited += 1
        if self._announced.get(client_ip) != block:
            self._announced[client_ip] = block
            log.warn("API requests from {client_ip} refused for {retry_after}s: too many "
                     "failed authentications", client_ip=client_ip, path=path,
                     retry_after=wait)
        raise too_many_requests(wait)

    def _accepts(self, authorization: Optional[bytes], client_ip: str, path: str) -> bool:
        """True for the right token; raises 401 without a token; False for a wrong one."""
        presented = _bearer(authorization)
        if presented is not None and hmac.compare_digest(presented.encode("utf-8"),
                                                         self.token.encode("utf-8")):
            return True
        self.failures += 1
        if presented is None:  # no guess was made: refuse, but do not count towards the limit
            log.info("API request from {client_ip} without a bearer token", client_ip=client_ip,
                     path=path)
            raise unauthorized()
        return False

    @staticmethod
    def _refuse_wrong(client_ip: str, path: str, count: int) -> None:
        log.warn("API authentication failed from {client_ip} (wrong token)", client_ip=client_ip,
                 path=path, failures_last_minute=count)
        raise unauthorized()


def _bearer(header: Optional[bytes]) -> Optional[str]:
    """The token of an ``Authorization: Bearer`` header, or None."""
    if not header:
        return None
    try:
        text = header.decode("latin-1").strip()
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    scheme, _, value = text.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def check_browser_safety(host: Optional[bytes], origin: Optional[bytes], open_api: bool) -> None:
    """Refuse what a hostile web page could make a browser send to the API (403).

    * A request with an ``Origin`` other than the API's own (``http://<Host>``)
      comes from another site's script: refused, so a page cannot drive the API
      with "simple" cross-origin POSTs that need no CORS preflight.
    * Without a token (loopback only), ``Host`` must be an IP literal or
      ``localhost``: a DNS-rebinding page addresses the API by its own name.
    """
    host_text = (host or b"").decode("latin-1").strip().lower()
    if origin is not None:
        origin_text = origin.decode("latin-1").strip().lower()
        parts = urlsplit(origin_text)
        if origin_text == "null" or parts.netloc != host_text:
            raise forbidden(f"cross-origin request from {origin_text or 'an unknown origin'} "
                            "refused")
    if open_api and host_text:
        name = urlsplit(f"//{host_text}").hostname or ""
        if name != "localhost":
            try:
                ipaddress.ip_address(name)
            except ValueError:
                raise forbidden(f"Host '{host_text}' refused: without api.token the API answers "
                                "only to IP addresses and localhost") from None
