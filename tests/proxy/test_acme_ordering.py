"""The ACME status says which name is being ordered right now (the console's "ordering")."""

from __future__ import annotations

import threading

import pytest_twisted
from twisted.internet import reactor, task

from dcrouter.config.proxy import AcmeOptions
from dcrouter.proxy import acme


@pytest_twisted.inlineCallbacks
def test_the_name_being_ordered_is_marked_until_the_order_ends(tmp_path, monkeypatch):
    started, release = threading.Event(), threading.Event()

    def slow_issue(self, name):
        started.set()
        release.wait(20)
        raise RuntimeError("the ACME server said no")
    monkeypatch.setattr(acme.AcmeIssuer, "issue", slow_issue)
    options = AcmeOptions(enabled=True, directory_url="https://127.0.0.1:9/dir",
                          retry_backoff=120.0)
    manager = acme.AcmeManager(reactor, options, str(tmp_path), {}, lambda name: None)
    manager.update(options, ["a.test", "b.test"])
    done = manager.check()
    while not started.is_set():
        yield task.deferLater(reactor, 0.05, lambda: None)
    status = manager.status()
    assert status["a.test"]["ordering"] and not status["b.test"]["ordering"]
    release.set()
    yield done
    status = manager.status()
    assert not any(entry["ordering"] for entry in status.values())
    assert status["a.test"]["failures"] == 1 and "said no" in status["a.test"]["last_error"]
