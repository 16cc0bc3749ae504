"""HTTP health checks of proxy targets (HAProxy's ``option httpchk`` + ``http-check expect``).

With ``health_check_path`` set on a route, each check sends
``GET <path> HTTP/1.1`` (``Host`` = the target, ``Connection: close``) and
reads the status line: 2xx and 3xx are healthy, anything else - a 503 from a
dcrouter whose ``/readyz`` says "not ready", a reset, no status line within
the timeout, more than :data:`MAX_STATUS_LINE` bytes before it - is a failed
check.  Only the status line is read; the body is never buffered.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol

from dcrouter.errors import DcRouterError

#: Bytes read before the status line must have ended.
MAX_STATUS_LINE = 1024


class HealthCheckFailed(DcRouterError):
    """A target answered the health check with a bad or no status."""


def request_bytes(path: str, host: str, port: int) -> bytes:
    """The probe's request."""
    authority = f"[{host}]" if ":" in host else host
    if port not in (80, 443):
        authority += f":{port}"
    return (f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: dcrouter-health-check\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n").encode("ascii")


class _HttpProbe(Protocol):
    """Sends the request, waits for the status line, hangs up."""

    def __init__(self, request: bytes, done: defer.Deferred) -> None:
        self.request = request
        self.done = done
        self.buffer = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.buffer += data
        if b"\n" not in self.buffer:
            if len(self.buffer) > MAX_STATUS_LINE:
                self._finish(HealthCheckFailed("no HTTP status line"))
            return
        line = self.buffer.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            self._finish(HealthCheckFailed(f"not an HTTP answer: {line[:60]!r}"))
            return
        status = int(parts[1])
        if 200 <= status < 400:
            self._finish(status)
        else:
            self._finish(HealthCheckFailed(f"HTTP status {status}"))

    def _finish(self, result: Any) -> None:
        if isinstance(result, Exception):
            self.done.errback(result)
        else:
            self.done.callback(result)
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(HealthCheckFailed("connection closed before the status line"))


class _ProbeFactory(Factory):
    noisy = False

    def __init__(self, request: bytes, done: defer.Deferred) -> None:
        self.request = request
        self.done = done
        self.probe: Optional[_HttpProbe] = None

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        self.probe = _HttpProbe(self.request, self.done)
        return self.probe


def http_check(reactor: Any, endpoint: Any, path: str, host: str, port: int,
               timeout: float) -> defer.Deferred:
    """Connect with ``endpoint`` and check ``path``; fires with the status or fails."""
    done: defer.Deferred = defer.Deferred()
    factory = _ProbeFactory(request_bytes(path, host, port), done)
    connecting = endpoint.connect(factory)
    connecting.addErrback(lambda f: done.errback(f) if not done.called else None)

    def expire() -> None:
        if done.called:
            return
        done.errback(HealthCheckFailed(f"no HTTP status within {timeout:g}s"))
        if not connecting.called:
            connecting.cancel()
        elif factory.probe is not None and factory.probe.transport is not None:
            factory.probe.transport.abortConnection()  # type: ignore[attr-defined]
    timer = reactor.callLater(timeout, expire)
    done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
    return done
