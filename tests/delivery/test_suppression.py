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
    # the file keeps a dated tombstone (so other workers' files do not revive the entry)
    yield wait_for(lambda: "removed" in json.load(open(path)).get("gone@example.com", {}))
    third = SuppressionList(path, ttl=3600)
    yield third.load()
    assert not third.is_suppressed("gone@example.com") and third.list() == []


def test_ttl_zero_disables(tmp_path):
    lst = SuppressionList("", ttl=0)
    lst.add("a@example.com", "550")
    assert not lst.is_suppressed("a@example.com")


@pytest_twisted.inlineCallbacks
def test_worker_files_share_additions_and_removals(tmp_path):
    """Two worker processes: each writes its own file and merges the other's."""
    one = SuppressionList(str(tmp_path / "suppression-worker-0.json"), ttl=3600)
    two = SuppressionList(str(tmp_path / "suppression-worker-1.json"), ttl=3600)
    old = tmp_path / "suppression.json"   # written by a single process before
    old.write_text(json.dumps({"legacy@example.com": {"reason": "550", "added": time.time(),
                                                      "expires": time.time() + 60}}))
    yield one.load()
    yield two.load()
    assert one.is_suppressed("legacy@example.com") and two.is_suppressed("legacy@example.com")
    one.add("a@example.com", "550 from worker 0")
    two.add("b@example.com", "550 from worker 1")    # at the same time: neither is lost
    yield wait_for(lambda: all(os.path.exists(tmp_path / f"suppression-worker-{i}.json")
                               for i in (0, 1)))
    yield wait_for(lambda: "b@example.com" in open(tmp_path / "suppression-worker-1.json").read())
    yield wait_for(lambda: "a@example.com" in open(tmp_path / "suppression-worker-0.json").read())
    yield one.sync()
    yield two.sync()
    for lst in (one, two):
        assert lst.is_suppressed("a@example.com") and lst.is_suppressed("b@example.com")
    # lifted in worker 0 (where the API runs): worker 1 follows, and does not bring it back
    assert one.remove("b@example.com")
    yield wait_for(lambda: "removed" in json.load(
        open(tmp_path / "suppression-worker-0.json")).get("b@example.com", {}))
    yield two.sync()
    assert not two.is_suppressed("b@example.com")
    yield one.sync()
    assert not one.is_suppressed("b@example.com")
    # a new bounce after the removal wins again
    two.add("b@example.com", "550 again")
    yield wait_for(lambda: "550 again" in open(tmp_path / "suppression-worker-1.json").read())
    yield one.sync()
    assert one.is_suppressed("b@example.com")
