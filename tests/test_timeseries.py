"""The figures history: sampling on an injected clock, buckets, counters, gauges, bounds."""

from __future__ import annotations

from typing import Any

from twisted.internet import task

from dcrouter.timeseries import MAX_SAMPLES, StatsHistory, extract


def figures(accepted: int = 0, depth: int = 0, routes: Any = None, rcodes: Any = None) -> dict:
    """A router ``get_stats()`` of the shape the services give."""
    return {
        "email": {"server": {"messages_accepted": accepted, "connections_total": accepted},
                  "delivery": {"counters": {"delivered": accepted // 2}},
                  "queue": {"size": depth, "by_status": {"deferred": depth}}},
        "proxy": {"active_connections": 1, "routes": routes if routes is not None else {
            "web": {"total_connections": 3, "bytes_in": 10, "bytes_out": 20, "requests": 0,
                    "errors": {"connect": 2}}}},
        "dns": {"queries_by_rcode": rcodes if rcodes is not None else {"NOERROR": 5}},
    }


class Source:
    """Figures that a test changes between samples."""

    def __init__(self) -> None:
        self.current = figures()
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        return self.current


def test_extract_reads_every_series_and_sums_routes():
    values = extract(figures(accepted=7, depth=3, rcodes={"NOERROR": 5, "NXDOMAIN": 2},
                             routes={"a": {"total_connections": 2, "bytes_in": 1,
                                           "errors": {"x": 1, "y": 2}},
                                     "b": {"total_connections": 5, "bytes_in": 4}}))
    assert values["email.accepted"] == 7 and values["email.delivered"] == 3
    assert values["queue.depth"] == 3 and values["queue.deferred"] == 3
    assert values["proxy.connections"] == 7 and values["proxy.bytes_in"] == 5
    assert values["proxy.errors"] == 3
    assert values["dns.queries.NOERROR"] == 5 and values["dns.queries.NXDOMAIN"] == 2
    assert "email.deferred" not in values  # absent figures are left out, not zero


def test_extract_survives_figures_of_unexpected_shapes():
    values = extract({"email": "broken", "proxy": {"routes": ["not", "a", "dict"]},
                      "dns": {"queries_by_rcode": {"NOERROR": "many", "X" * 100: 1}}})
    assert values == {"dns.queries." + "X" * 16: 1.0}
    assert extract({}) == {}


def test_counters_become_growth_per_bucket_and_gauges_their_last_value():
    clock = task.Clock()
    clock.advance(6000)          # bucket boundaries at whole minutes
    source = Source()
    history = StatsHistory(source, clock, interval=10, window=3600)
    history.startService()
    for minute in range(3):
        for tick in range(6):
            source.current = figures(accepted=minute * 60 + tick * 10, depth=minute)
            clock.advance(10)
    result = history.query(seconds=300, step=60)
    assert result["step"] == 60 and len(result["times"]) == 5
    assert result["end"] == 6000 + 240 and result["start"] == result["end"] - 300
    accepted = result["series"]["email.accepted"]
    assert accepted["kind"] == "counter" and accepted["label"] == "messages accepted"
    # samples at 6000 (0), 6010..6050 (0..40), 6060..6110 (50..100), ... 6180 (170)
    assert accepted["points"] == [None, 40.0, 60.0, 60.0, 10.0]
    depth = result["series"]["queue.depth"]["points"]
    assert depth[0] is None and depth[1:] == [0.0, 1.0, 2.0, 2.0]
    assert sum(p or 0 for p in accepted["points"]) == 170
    history.stopService()


def test_a_counter_that_goes_down_adds_nothing():
    clock = task.Clock()
    source = Source()
    history = StatsHistory(source, clock, interval=1, window=60)
    history.startService()
    for total in (10, 12, 3, 5):
        source.current = figures(routes={"r": {"total_connections": total}})
        clock.advance(1)
    points = history.query(seconds=60, step=60)["series"]["proxy.connections"]["points"]
    assert points[-1] == 7 + 2 + 0 + 2  # 3 -> 10 -> 12 -> 3 (a route removed) -> 5
    history.stopService()


def test_the_ring_keeps_only_the_window_and_is_bounded():
    clock = task.Clock()
    source = Source()
    history = StatsHistory(source, clock, interval=1, window=30)
    history.startService()
    clock.pump([1] * 100)
    assert len(history.samples) == 31 and source.calls == 101
    history.configure(interval=1, window=10 ** 9)
    assert history.samples.maxlen == MAX_SAMPLES
    history.stopService()
    clock.advance(10)
    assert source.calls == 102  # one sample when reconfigured, none once stopped


def test_reconfigure_changes_the_interval_and_keeps_samples():
    clock = task.Clock()
    source = Source()
    history = StatsHistory(source, clock, interval=10, window=3600)
    history.startService()
    clock.pump([10] * 3)
    assert source.calls == 4
    history.configure(interval=2, window=60)
    kept = len(history.samples)
    clock.pump([2] * 5)
    assert len(history.samples) == kept + 5  # every 2 s after the sample taken at once
    history.stopService()


def test_a_failing_source_is_skipped_and_logged_once():
    clock = task.Clock()
    calls = []

    def broken() -> dict:
        calls.append(1)
        raise RuntimeError("figures broke")

    history = StatsHistory(broken, clock, interval=1, window=60)
    history.startService()
    clock.pump([1] * 5)
    assert history.failures == 6 and not history.samples
    assert history._loop is not None and history._loop.running   # keeps trying
    history.stopService()
