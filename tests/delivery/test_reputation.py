"""Per-domain sliding-window counters of the sender reputation monitor."""

from __future__ import annotations

from dcrouter.delivery.reputation import SenderReputation


def test_window_slides():
    now = [1_000_000.0]
    rep = SenderReputation(window=600, clock=lambda: now[0])
    rep.record("Example.org", "sent", 8)
    rep.record("example.org", "bounced", 2)
    rep.record("example.org", "deferred")
    rep.record("", "sent")
    rep.record("example.org", "nonsense")
    stats = rep.get_stats()
    assert stats == {"example.org": {"sent": 8, "deferred": 1, "bounced": 2, "bounce_rate": 0.2}}
    now[0] += 300
    rep.record("example.org", "sent")
    assert rep.domain_stats("example.org")["sent"] == 9
    now[0] += 400  # the first minute fell out of the window
    assert rep.domain_stats("example.org") == {"sent": 1, "deferred": 0, "bounced": 0,
                                               "bounce_rate": 0.0}
    now[0] += 1000
    assert rep.get_stats() == {}
