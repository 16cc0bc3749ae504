"""The suppression list: expiry, persistence in state_dir, removal."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest_twisted

from dcrouter.delivery.suppression import SuppressionList
from tests.delivery.harness import wait_for


@pytest_twisted.inlineCallbacks
def test_add_expire_persist_remove(tmp_path):
    path = str(tmp_path / "suppression.json")
    lst = SuppressionList(path, ttl=3600)
    lst.add("<Gone@Example.COM>", "550 5.1.1 user unknown")
    lst.add("brief@example.com", "550 5.1.1", ttl=0.2)
    assert lst.is_suppressed("gone@example.com")
    assert lst.is_suppressed("brief@example.com")
    assert [e["address"] for e in lst.list()] == ["brief@example.com", "gone@example.com"]
    yield wait_for(lambda: os.path.exists(path) and "gone@example.com" in open(path).read())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    time.sleep(0.25)
    assert not lst.is_suppressed("brief@example.com")
    again = SuppressionList(path, ttl=3600)
    yield again.load()
    assert again.is_suppressed("GONE@example.com")
    assert again.remove("gone@example.com")
    assert not again.is_suppressed("gone@example.com")
    assert not again.remove("gone@example.com")
    yield wait_for(lambda: "gone@example.com" not in json.load(open(path)))


def test_ttl_zero_disables(tmp_path):
    lst = SuppressionList("", ttl=0)
    lst.add("a@example.com", "550")
    assert not lst.is_suppressed("a@example.com")
