"""The proxy's access log: one line per client connection, HAProxy's ``tcplog`` format.

Off unless ``proxy.access_log`` names a file.  Each line is written when a
client connection closes::

    127.0.0.1:51324 [04/Dec/2026:10:15:02.331] :443 web/10.0.0.5:8443 0/1/2014 5120 -- 3/1/1/1/0 0/0

that is ``client:port [accept date] frontend route/target Tw/Tc/Tt bytes_read
termination_state actconn/feconn/beconn/srv_conn/retries srv_queue/backend_queue``
as HAProxy writes them (halog and the usual parsers read it): the frontend is
``:<port>``; ``Tc`` is the milliseconds to connect the target (-1: never
connected), ``Tt`` the connection's lifetime; ``bytes_read`` what the targets
sent to the client; the termination state's first letter says who ended it
(``-`` normally, ``P`` the proxy refused - blocked, a limit, no route -,
``S`` no target could be reached, ``C`` the client broke the TLS handshake,
``c``/``s`` a client or target timeout) and the second in which phase (``R``
before a route was chosen, ``C`` while connecting, ``D`` relaying, ``-``).
``<NOSRV>`` stands for no target.  With ``access_log_format = "json"`` the same
facts are one JSON object a line (plus ``requests`` and ``bytes_in``).

Lines are buffered and flushed every second (and at stop), so the reactor never
waits on the disk per connection.  The file is reopened on every reload, so
logrotate's ``postrotate`` sends SIGHUP as for ``router.log_file``.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any, Optional

from twisted.internet.task import LoopingCall

from dcrouter.errors import ConfigError
from dcrouter.logsetup import get_logger

log = get_logger("proxy")

#: Seconds between flushes of the buffered lines.
FLUSH_INTERVAL = 1.0
#: Error kinds (RouteStats.error) that say a timeout ended the connection.
_CLIENT_TIMEOUTS = {"handshake_timeout", "idle_timeout", "timeout"}
_CONNECT_ERRORS = {"connect"}


class ConnectionCounters:
    """A connection's share of its route's figures: updates both (stands in for RouteStats)."""

    def __init__(self, route_stats: Any) -> None:
        object.__setattr__(self, "_route", route_stats)
        object.__setattr__(self, "own", {"bytes_in": 0, "bytes_out": 0, "requests": 0})
        object.__setattr__(self, "errors_seen", [])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._route, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.own:
            self.own[name] += value - getattr(self._route, name)
        setattr(self._route, name, value)

    def error(self, kind: str) -> None:
        """Count on the route, remember for the termination state."""
        self.errors_seen.append(kind)
        self._route.error(kind)


class _Front:
    """What the log knows about one client connection."""

    __slots__ = ("accepted", "connections", "refused", "refused_route", "connect_ms",
                 "_connect_started")

    def __init__(self, accepted: float) -> None:
        self.accepted = accepted
        self.connections: list[Any] = []
        self.refused = ""
        self.refused_route = ""
        self.connect_ms = -1
        self._connect_started = 0.0


class NullAccessLog:
    """The access log when ``proxy.access_log`` is empty."""

    enabled = False

    def opened(self, front: Any) -> None:
        """A client connected."""

    def admitted(self, front: Any, connection: Any) -> None:
        """The client was given a route."""

    def refused(self, front: Any, kind: str, route: Any = None) -> None:
        """The client was refused."""

    def closed(self, front: Any) -> None:
        """The client is gone."""


class AccessLog(NullAccessLog):
    """Writes one line per closed client connection to ``path``."""

    enabled = True

    def __init__(self, path: str, fmt: str, reactor: Any, core: Any) -> None:
        self.path = path
        self.format = fmt
        self.reactor = reactor
        self.core = core
        self._file: Optional[IO[str]] = None
        self._fronts: dict[int, _Front] = {}
        self._loop: Optional[LoopingCall] = None
        self.lines = 0
        self.reopen(path, fmt)

    def reopen(self, path: str, fmt: str) -> None:
        """Open ``path`` (again: after logrotate moved it); OSError leaves the old file."""
        new = open(path, "a", encoding="utf-8")
        old, self._file = self._file, new
        self.path, self.format = path, fmt
        if old is not None:
            old.close()
        if self._loop is None:
            self._loop = LoopingCall(self.flush)
            self._loop.clock = self.reactor
            self._loop.start(FLUSH_INTERVAL, now=False)

    def flush(self) -> None:
        """Write the buffered lines out."""
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as e:
                log.error("proxy access log {path}: {error}", path=self.path,
                          error=e.strerror or str(e))

    def close(self) -> None:
        """Flush and close (at stop)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None

    # -- the connection's life ---------------------------------------------------------
    def opened(self, front: Any) -> None:
        """A client connected."""
        self._fronts[id(front)] = _Front(time.time())

    def admitted(self, front: Any, connection: Any) -> None:
        """Count this connection's bytes and note when its target answers."""
        record = self._fronts.get(id(front))
        if record is None:
            return
        connection.stats = ConnectionCounters(connection.stats)
        record.connections.append(connection)
        use_target = connection.use_target
        record._connect_started = time.monotonic()

        def connected(target: Any) -> None:
            if record.connect_ms < 0:
                record.connect_ms = int((time.monotonic() - record._connect_started) * 1000)
            use_target(target)
        connection.use_target = connected

    def refused(self, front: Any, kind: str, route: Any = None) -> None:
        """The client gets no route (blocked, a limit, no route...)."""
        record = self._fronts.get(id(front))
        if record is not None:
            record.refused = kind
            record.refused_route = getattr(route, "key", "") or ""

    def closed(self, front: Any) -> None:
        """Write the connection's line."""
        record = self._fronts.pop(id(front), None)
        if record is None or self._file is None:
            return
        facts = self._facts(front, record)
        if self.format == "json":
            line = json.dumps(facts, separators=(",", ":"))
        else:
            line = ("{client_ip}:{client_port} [{accept_date}] {frontend} {route}/{target} "
                    "0/{tc}/{tt} {bytes_read} {termination_state} "
                    "{actconn}/{feconn}/{beconn}/{srv_conn}/0 0/0").format(**facts)
        try:
            self._file.write(line + "\n")
            self.lines += 1
        except OSError as e:
            log.error("proxy access log {path}: {error}", path=self.path,
                      error=e.strerror or str(e))

    def _facts(self, front: Any, record: _Front) -> dict[str, Any]:
        last = record.connections[-1] if record.connections else None
        target = getattr(last, "target", None)
        route = getattr(getattr(last, "route", None), "key", None) or record.refused_route or "-"
        errors = [k for c in record.connections for k in c.stats.errors_seen]
        accepted = time.localtime(record.accepted)
        millis = int((record.accepted % 1) * 1000)
        port = front.port
        return {
            "client_ip": front.client_addr[0], "client_port": front.client_addr[1],
            "accept_date": time.strftime("%d/%b/%Y:%H:%M:%S", accepted) + f".{millis:03d}",
            "frontend": f":{port}", "route": route,
            "target": getattr(target, "label", None) or "<NOSRV>",
            "tc": record.connect_ms,
            "tt": int((time.time() - record.accepted) * 1000),
            "bytes_read": sum(c.stats.own["bytes_out"] for c in record.connections),
            "bytes_in": sum(c.stats.own["bytes_in"] for c in record.connections),
            "requests": sum(c.stats.own["requests"] for c in record.connections),
            "termination_state": _termination(record, errors, target),
            "actconn": len(getattr(self.core, "connections", ())),
            "feconn": sum(1 for f in getattr(self.core, "connections", ())
                          if getattr(f, "port", None) == port),
            "beconn": getattr(last.stats, "active", 0) if last is not None else 0,
            "srv_conn": getattr(target, "active", 0) if target is not None else 0,
        }


def _termination(record: _Front, errors: list[str], target: Any) -> str:
    """HAProxy's two-letter termination state from what this connection went through."""
    if record.refused:
        return "PR"
    if any(e == "tls_handshake" for e in errors):
        return "CR"
    if any(e in _CLIENT_TIMEOUTS for e in errors):
        return "cD" if target is not None else "cR"
    if any(e in _CONNECT_ERRORS for e in errors):
        return "SC"
    if any(e in ("backend_closed", "bad_response", "backend_tls") for e in errors):
        return "SD"
    if not record.connections:
        return "CR"  # the client left before a route was chosen
    return "--"


_NULL = NullAccessLog()


def access_log_of(core: Any) -> NullAccessLog:
    """The access log of a proxy core (the Null one for cores without)."""
    return getattr(core, "access_log", None) or _NULL


def open_access_log(options: Any, reactor: Any, core: Any) -> NullAccessLog:
    """The log ``[proxy]`` asks for (a Null one when ``access_log`` is empty)."""
    if not options.access_log:
        return NullAccessLog()
    try:
        return AccessLog(options.access_log, options.access_log_format, reactor, core)
    except OSError as e:
        raise ConfigError("proxy.access_log", f"cannot open {options.access_log}: "
                          f"{e.strerror or e}") from None


def reopen_access_log(current: NullAccessLog, options: Any, reactor: Any,
                      core: Any) -> NullAccessLog:
    """On reload: reopen the same file (logrotate), switch files, or turn the log on or off.

    A new file that cannot be opened keeps the current log (and is logged)."""
    try:
        if isinstance(current, AccessLog) and options.access_log:
            current.reopen(options.access_log, options.access_log_format)
            return current
        new = open_access_log(options, reactor, core)
    except (OSError, ConfigError) as e:
        log.error("proxy.access_log: cannot open {path}: {error}", path=options.access_log,
                  error=getattr(e, "strerror", None) or str(e))
        return current
    close_access_log(current)
    return new


def close_access_log(current: NullAccessLog) -> None:
    """Flush and close (a Null log: nothing)."""
    if isinstance(current, AccessLog):
        current.close()
