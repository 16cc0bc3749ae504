"""Logging for dcrouter: structured ``twisted.logger`` events, text or JSON output.

Code logs through :func:`get_logger` with a subsystem name (``"email.delivery"``),
passing facts as event fields, never pre-formatted strings::

    log = get_logger("email.delivery")
    log.info("delivered {queue_id} to {remote}", queue_id=qid, remote=host,
             correlation_id=cid)

:func:`make_observer` builds the process's observer from ``[router]``:
JSON lines or text, per-subsystem minimum levels, sampling of events
marked ``sampled=True`` (high-volume events such as per-connection logs), and
none of Twisted's per-connection chatter (``Starting factory``, and the UDP
port lines of every DNS query the MX resolver sends).
"""

from __future__ import annotations

import json
import random
import re
import sys
from typing import IO, Any, Callable, Optional

from twisted.logger import (
    FileLogObserver, FilteringLogObserver, ILogFilterPredicate, ILogObserver, LogLevel,
    LogLevelFilterPredicate, Logger, PredicateResult, eventAsJSON, formatEvent,
    formatEventAsClassicLogText, formatTime, timeFormatRFC3339,
)
from zope.interface import implementer

from dcrouter.config.router import RouterOptions

NAMESPACE_ROOT = "dcrouter"

_LEVELS = {
    "debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
    "error": LogLevel.error, "critical": LogLevel.critical,
}


def get_logger(subsystem: str, source: Any = None) -> Logger:
    """A Logger in the namespace ``dcrouter.<subsystem>``."""
    return Logger(namespace=f"{NAMESPACE_ROOT}.{subsystem}", source=source)


@implementer(ILogFilterPredicate)
class SamplingPredicate:
    """Drops a fraction of events marked ``sampled=True``; lets all others through."""

    def __init__(self, rate: float, rng: Callable[[], float] = random.random) -> None:
        self.rate = rate
        self._rng = rng

    def __call__(self, event: dict) -> PredicateResult:
        if event.get("sampled") and self.rate < 1.0 and self._rng() >= self.rate:
            return PredicateResult.no
        return PredicateResult.maybe


#: Twisted's legacy lines that come once per outbound connection or DNS query.
_CHATTER = re.compile(r"(Starting|Stopping) factory |(Starting|Stopping) protocol "
                      r"<twisted\.names\.dns\.DNSDatagramProtocol |DNSDatagramProtocol starting "
                      r"on \d+$|\(UDP Port \d+ Closed\)$")


@implementer(ILogFilterPredicate)
class ChatterPredicate:
    """Drops Twisted's per-connection lines (factories whose ``noisy`` is not off, and the
    UDP port a DNS client query opens and closes)."""

    def __call__(self, event: dict) -> PredicateResult:
        if event.get("log_namespace") == "log_legacy" and \
                _CHATTER.match(formatEvent(event) or ""):
            return PredicateResult.no
        return PredicateResult.maybe


def level_predicate(options: RouterOptions) -> LogLevelFilterPredicate:
    """Minimum levels: the default for all, and one per configured subsystem."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS[options.log_level])
    for subsystem, level in options.log_levels.items():
        predicate.setLogLevelForNamespace(f"{NAMESPACE_ROOT}.{subsystem}", _LEVELS[level])
    return predicate


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes each event as one JSON object on one line.

    The object has ``time``, ``level``, ``namespace``, ``message`` (the
    formatted text) and every plain field of the event.
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict) -> None:
        record: dict[str, Any] = {}
        for key, value in event.items():
            if key.startswith("log_") or key in ("format", "message", "isError", "system",
                                                 "time", "failure", "why", "printed"):
                continue
            record[key] = value if isinstance(value, (str, int, float, bool, type(None))) \
                else str(value)
        text = formatEventAsClassicLogText(event) or ""
        level = event.get("log_level")
        line = {
            "time": event.get("log_time"),
            "level": level.name if level is not None else "info",
            "namespace": event.get("log_namespace", ""),
            "message": text.split(" ", 2)[-1].rstrip("\n") if text else "",
        }
        failure = event.get("log_failure")
        if failure is not None:
            line["failure"] = failure.getErrorMessage()
            line["failure_type"] = failure.type.__name__ if failure.type else ""
        line.update(record)
        try:
            self._out.write(json.dumps(line, default=str) + "\n")
            self._out.flush()
        except ValueError:  # closed stream at shutdown
            pass


class SecondTimeFormatter:
    """Twisted's text-log time stamp (RFC 3339 to the second), computed once a second:
    ``formatTime`` works out the local time zone anew for every event, a quarter of the
    cost of writing an SMTP server's per-message lines."""

    def __init__(self) -> None:
        self._second: Optional[int] = None
        self._text = "-"

    def __call__(self, when: Optional[float]) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second, self._text = second, formatTime(second, timeFormatRFC3339)
        return self._text


def text_observer(stream: IO[str]) -> ILogObserver:
    """Twisted's classic text lines (as ``textFileLogObserver``), time stamps cached."""
    stamp = SecondTimeFormatter()
    return FileLogObserver(stream, lambda event: formatEventAsClassicLogText(event, stamp))


@implementer(ILogObserver)
class RouterLogObserver:
    """The process's observer for ``[router]``: format, file, levels and sampling.

    :meth:`apply` swaps all of them in place (the observer object stays the one
    twistd registered), and reopens ``log_file`` so that a reload after
    logrotate moved the file writes to a new one, as Postfix and HAProxy users
    expect from SIGHUP.
    """

    def __init__(self, options: RouterOptions, out: Optional[IO[str]] = None) -> None:
        self._fixed_stream = out
        # standard output as it is now: once twistd begins logging, sys.stdout is its
        # LoggingFile, and writing log lines there would feed them back into the log
        self._stdout = sys.stdout
        self._opened: Optional[IO[str]] = None
        self._current: ILogObserver = self._build(options)

    def _build(self, options: RouterOptions) -> ILogObserver:
        stream = self._fixed_stream
        if stream is None:
            if options.log_file:
                self._opened = open(options.log_file, "a", encoding="utf-8")
                stream = self._opened
            else:
                stream = self._stdout
        inner: ILogObserver
        if options.log_format == "json":
            inner = JsonLinesObserver(stream)
        else:
            inner = text_observer(stream)
        return FilteringLogObserver(inner, [level_predicate(options),
                                            SamplingPredicate(options.log_sample_rate),
                                            ChatterPredicate()])

    def apply(self, options: RouterOptions) -> None:
        """Use new settings from now on (OSError if the new log file cannot be opened;
        the old settings then stay)."""
        previous = self._opened
        self._opened = None
        try:
            self._current = self._build(options)
        except OSError:
            self._opened = previous
            raise
        if previous is not None:
            previous.close()

    def __call__(self, event: dict) -> None:
        self._current(event)


def make_observer(options: RouterOptions, out: Optional[IO[str]] = None) -> RouterLogObserver:
    """The observer for ``[router]``: format, levels and sampling applied."""
    return RouterLogObserver(options, out)


__all__ = ["ChatterPredicate", "JsonLinesObserver", "RouterLogObserver", "SamplingPredicate", "get_logger", "make_observer", "eventAsJSON"]
