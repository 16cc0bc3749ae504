"""The timer wheel: late by less than a bucket, never early; one callLater for many timers."""

from __future__ import annotations

from twisted.internet import task

from dcrouter.timerwheel import IdleTimeout, TimerWheel, wheel_for


def test_timers_fire_in_their_bucket_never_early() -> None:
    clock = task.Clock()
    wheel = TimerWheel(clock, resolution=0.25)
    fired: list[tuple[str, float]] = []
    wheel.call_later(1.0, lambda: fired.append(("a", clock.seconds())))
    wheel.call_later(0.3, lambda: fired.append(("b", clock.seconds())))
    wheel.call_later(10.0, lambda: fired.append(("c", clock.seconds())))
    for _ in range(60):
        clock.advance(0.05)
    assert [name for name, _ in fired] == ["b", "a"]
    assert 0.3 <= fired[0][1] < 0.3 + 0.25 + 0.05
    assert 1.0 <= fired[1][1] < 1.0 + 0.25 + 0.05
    clock.advance(8.0)
    assert [name for name, _ in fired] == ["b", "a", "c"]
    assert fired[2][1] >= 10.0


def test_many_timers_share_one_delayed_call_and_cancel_is_cheap() -> None:
    clock = task.Clock()
    wheel = TimerWheel(clock, resolution=0.5)
    fired: list[int] = []
    timers = [wheel.call_later(5.0 + (i % 7), lambda i=i: fired.append(i)) for i in range(1000)]
    assert len(clock.getDelayedCalls()) == 1
    for timer in timers[:500]:
        timer.cancel()
        timer.cancel()                      # idempotent
    assert len(wheel) == 500
    clock.advance(20.0)
    clock.advance(20.0)
    assert sorted(fired) == list(range(500, 1000))
    assert len(wheel) == 0
    assert clock.getDelayedCalls() == []


def test_cancelling_every_timer_removes_the_delayed_call() -> None:
    clock = task.Clock()
    wheel = TimerWheel(clock)
    timer = wheel.call_later(3.0, lambda: None)
    assert len(clock.getDelayedCalls()) == 1
    timer.cancel()
    assert clock.getDelayedCalls() == []


def test_a_timer_armed_from_a_callback_fires_later() -> None:
    clock = task.Clock()
    wheel = TimerWheel(clock, resolution=0.25)
    fired: list[float] = []

    def again() -> None:
        fired.append(clock.seconds())
        if len(fired) < 3:
            wheel.call_later(1.0, again)
    wheel.call_later(1.0, again)
    for _ in range(100):
        clock.advance(0.05)
    assert len(fired) == 3
    assert fired[1] - fired[0] >= 1.0 and fired[2] - fired[1] >= 1.0


def test_idle_timeout_fires_only_after_a_whole_silent_period() -> None:
    clock = task.Clock()
    wheel = TimerWheel(clock, resolution=0.25)
    idle: list[float] = []
    watch = IdleTimeout(wheel, 2.0, lambda: idle.append(clock.seconds()))
    for _ in range(10):                     # activity every 0.5 s for 5 s: never idle
        clock.advance(0.5)
        watch.touch()
    assert idle == []
    assert len(clock.getDelayedCalls()) == 1
    for _ in range(60):
        clock.advance(0.05)
    assert len(idle) == 1
    assert 7.0 <= idle[0] < 7.0 + 0.25 + 0.05
    watch.cancel()
    assert clock.getDelayedCalls() == []


def test_wheel_for_gives_one_wheel_per_clock() -> None:
    a, b = task.Clock(), task.Clock()
    assert wheel_for(a) is wheel_for(a)
    assert wheel_for(a) is not wheel_for(b)
