"""A target's health record: since when it is up or down, and its last error."""

from __future__ import annotations

from dcrouter.proxy.balancer import Balancer, Target


def test_since_changes_only_when_the_health_flips_and_the_last_error_is_kept():
    target = Target("127.0.0.1", 9)
    born = target.since
    target.mark(True)
    assert target.since == born and target.last_error == ""
    target.since = 100.0
    target.mark(False, "health check: refused")
    down_since = target.since
    assert down_since > 100.0 and not target.healthy
    target.mark(False, "health check: timeout")
    assert target.since == down_since and target.last_error == "health check: timeout"
    target.mark(True)
    assert target.healthy and target.since >= down_since
    assert target.last_error == "health check: timeout"     # still shown once it is back up
    health = Balancer([("127.0.0.1", 9)]).health()["127.0.0.1:9"]
    assert set(health) == {"healthy", "active", "failures", "since", "last_error"}
