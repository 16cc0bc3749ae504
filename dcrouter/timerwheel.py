"""One coarse timer for many timeouts: a hashed timer wheel on the reactor's clock.

Idle and setup timeouts of network connections are armed on every
connection and almost never fire.  A ``reactor.callLater`` per connection
costs a heap push and a cancel each time; thousands of them also make every
reactor iteration look at a large heap.  :class:`TimerWheel` keeps timers in
buckets of ``resolution`` seconds (keyed by absolute bucket number, so any
delay fits) and runs **one** ``callLater`` for the earliest non-empty bucket.

* :meth:`TimerWheel.call_later` arms a timer; :meth:`WheelTimer.cancel` is a
  set removal.  Timers fire late by less than ``resolution``, never early.
* Idle timeouts should not re-arm on every byte: keep a "last activity" time,
  arm once for the whole timeout, and when the timer fires re-arm for what is
  left (the pattern :class:`IdleTimeout` implements).

:func:`wheel_for` returns the one wheel of a clock (the reactor, or a
``task.Clock`` in tests), so every service of a process shares it.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Optional

#: Default bucket width in seconds.
RESOLUTION = 0.25


class WheelTimer:
    """One armed timer; :meth:`cancel` it or let it fire once."""

    __slots__ = ("wheel", "bucket", "when", "func", "active")

    def __init__(self, wheel: "TimerWheel", bucket: int, when: float,
                 func: Callable[[], Any]) -> None:
        self.wheel = wheel
        self.bucket = bucket
        self.when = when
        self.func = func
        self.active = True

    def cancel(self) -> None:
        """Disarm (idempotent)."""
        if self.active:
            self.active = False
            self.wheel._remove(self)


class TimerWheel:
    """Timers in ``resolution``-second buckets driven by one ``callLater`` of ``clock``."""

    def __init__(self, clock: Any, resolution: float = RESOLUTION) -> None:
        self.clock = clock
        self.resolution = resolution
        self.buckets: dict[int, dict[WheelTimer, None]] = {}
        self._call: Any = None
        self._call_bucket: Optional[int] = None
        self._running = False

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets.values())

    def call_later(self, delay: float, func: Callable[[], Any]) -> WheelTimer:
        """Call ``func()`` once, ``delay`` seconds from now (rounded up to the bucket)."""
        when = self.clock.seconds() + max(0.0, delay)
        bucket = math.ceil(when / self.resolution)
        timer = WheelTimer(self, bucket, when, func)
        slot = self.buckets.get(bucket)
        if slot is None:
            slot = self.buckets[bucket] = {}
            if self._call_bucket is None or bucket < self._call_bucket:
                self._schedule(bucket)
        slot[timer] = None
        return timer

    def _remove(self, timer: WheelTimer) -> None:
        slot = self.buckets.get(timer.bucket)
        if slot is not None:
            slot.pop(timer, None)
            if not slot:
                del self.buckets[timer.bucket]
        if not self.buckets and self._call is not None and not self._running:
            if self._call.active():
                self._call.cancel()
            self._call = None
            self._call_bucket = None

    def _schedule(self, bucket: int) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        delay = max(0.0, bucket * self.resolution - self.clock.seconds())
        self._call = self.clock.callLater(delay, self._tick)
        self._call_bucket = bucket

    def _tick(self) -> None:
        self._call = None
        self._call_bucket = None
        now = self.clock.seconds()
        self._running = True
        try:
            # float error may leave ``now`` a hair under the bucket's start; allow for it
            due = sorted(b for b in self.buckets if b * self.resolution <= now + 1e-9)
            for bucket in due:
                slot = self.buckets.pop(bucket, None)
                for timer in list(slot or ()):
                    if timer.active:
                        timer.active = False
                        timer.func()
        finally:
            self._running = False
        if self.buckets:
            self._schedule(min(self.buckets))


_WHEELS: "weakref.WeakKeyDictionary[Any, TimerWheel]" = weakref.WeakKeyDictionary()


_last: list[Any] = [None, None]         # (clock, wheel) of the last look-up


def wheel_for(clock: Any) -> TimerWheel:
    """The shared wheel of ``clock`` (made on first use)."""
    if _last[0] is clock:
        return _last[1]
    wheel = _WHEELS.get(clock)
    if wheel is None:
        wheel = _WHEELS[clock] = TimerWheel(clock)
    _last[0], _last[1] = clock, wheel
    return wheel


class IdleTimeout:
    """Calls ``on_idle()`` once nothing called :meth:`touch` for ``timeout`` seconds.

    :meth:`touch` only records the time; the wheel timer is armed once per
    period and, when it fires early because of activity, re-armed for the rest.
    """

    __slots__ = ("wheel", "timeout", "on_idle", "last", "timer")

    def __init__(self, wheel: TimerWheel, timeout: float, on_idle: Callable[[], Any]) -> None:
        self.wheel = wheel
        self.timeout = timeout
        self.on_idle = on_idle
        self.last = wheel.clock.seconds()
        self.timer: Optional[WheelTimer] = wheel.call_later(timeout, self._check)

    def touch(self) -> None:
        """There was activity now."""
        self.last = self.wheel.clock.seconds()

    def _check(self) -> None:
        self.timer = None
        idle = self.wheel.clock.seconds() - self.last
        if idle >= self.timeout - 1e-9:
            self.on_idle()
            return
        self.timer = self.wheel.call_later(self.timeout - idle, self._check)

    def cancel(self) -> None:
        """Stop watching (idempotent)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
