"""The certificates view's rules: ACME order states, renewal dates and warnings."""

from __future__ import annotations

import datetime
import types

from dcrouter.api.certview import acme_orders, warnings_for
from dcrouter.config.proxy import AcmeOptions

NOW = 1_800_000_000.0
DAY = 86400.0


def _iso(days: float) -> str:
    return datetime.datetime.fromtimestamp(NOW + days * DAY, datetime.timezone.utc).isoformat()


class _Proxy:
    def __init__(self, status: dict) -> None:
        self.status = status

    def get_stats(self) -> dict:
        return {"acme": self.status}


def _context(status: dict) -> types.SimpleNamespace:
    options = types.SimpleNamespace(proxy=types.SimpleNamespace(
        acme=AcmeOptions(enabled=True, renew_threshold_days=30)))
    return types.SimpleNamespace(options=options, services={"proxy": _Proxy(status)})


def test_order_states_and_next_renewal():
    base = {"failures": 0, "last_error": "", "retry_at": None, "ordering": False}
    status = {
        "valid.test": dict(base, expires=_iso(60)),
        "due.test": dict(base, expires=_iso(10)),
        "new.test": dict(base, expires=None),
        "busy.test": dict(base, expires=None, ordering=True),
        "failed.test": dict(base, expires=None, failures=2, last_error="refused",
                            retry_at=NOW + 600),
        "*.wild.test": dict(base, expires=None, last_error="wildcard needs dns-01"),
    }
    orders = {o["name"]: o for o in acme_orders(_context(status), NOW)}
    assert {n: o["state"] for n, o in orders.items()} == {
        "valid.test": "valid", "due.test": "due", "new.test": "due", "busy.test": "ordering",
        "failed.test": "failed", "*.wild.test": "skipped"}
    assert orders["valid.test"]["renew_at"] == NOW + 30 * DAY        # expiry - threshold
    assert orders["valid.test"]["days_left"] == 60.0
    assert orders["due.test"]["renew_at"] == NOW                      # overdue: now
    assert orders["failed.test"]["renew_at"] == NOW + 600             # the next try
    assert orders["new.test"]["renew_at"] is None


def test_warnings_for_expiry_failed_orders_and_unpublished_keys():
    cert = {"service": "proxy", "served_for": ["a.test"], "subject": "a.test"}
    certificates = [dict(cert, days_left=40.0), dict(cert, days_left=20.0, subject="b"),
                    dict(cert, days_left=3.0, subject="c"), dict(cert, days_left=-2.0,
                                                                 subject="d")]
    orders = [{"name": "x.test", "state": "failed", "failures": 1, "last_error": "nope"},
              {"name": "y.test", "state": "valid", "failures": 0, "last_error": ""}]
    keys = [{"record_name": "s._domainkey.a.test", "signing": True, "published": False,
             "dns_served": False},
            {"record_name": "s._domainkey.b.test", "signing": True, "published": True,
             "dns_served": True},
            {"record_name": "s._domainkey.c.test", "signing": False, "published": False,
             "dns_served": False}]
    warnings = warnings_for(certificates, orders, keys, 30)
    assert [(w["kind"], w["subject"], w["level"]) for w in warnings] == [
        ("expiry", "b", "warning"), ("expiry", "c", "error"), ("expiry", "d", "error"),
        ("acme", "x.test", "warning"), ("dkim", "s._domainkey.a.test", "info")]
    assert "expired 2 days ago" in warnings[2]["message"]
