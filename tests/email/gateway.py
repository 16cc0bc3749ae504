"""A whole dcrouter (make_router, in the test reactor) between raw clients and aiosmtpd sinks.

The ``gateway`` fixture starts one with three rules - ``*@fwd.test`` forwarded
to one sink, ``*@sender.test`` forwarded to another (where bounces to the test
senders land), ``*@local.test`` delivered into Maildirs under ``tmp/mail`` -
and a ``relay_networks`` that leaves loopback out, so the test clients speak as
strangers on the internet do.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from tests.delivery.peers import Sink
from tests.support.net import free_port
from tests.support.router import options_from, port_of, start_router, stop_router


class Gateway:
    """A running router, its SMTP port, its sinks and its Maildir root."""

    def __init__(self, router: Any, sink: Sink, bounces: Sink, mail: str) -> None:
        self.router = router
        self.port = port_of(router, "email")
        self.sink = sink
        self.bounces = bounces
        self.mail = mail

    @property
    def processor(self) -> Any:
        return self.router.by_name["email"].processor

    def mailbox(self, name: str) -> list[bytes]:
        """The messages in ``mail/<name>/new``, oldest first."""
        box = os.path.join(self.mail, name, "new")
        if not os.path.isdir(box):
            return []
        out = []
        for entry in sorted(os.listdir(box), key=lambda n: os.stat(os.path.join(box, n))
                            .st_mtime_ns):
            with open(os.path.join(box, entry), "rb") as f:
                out.append(f.read())
        return out


@defer.inlineCallbacks
def wait_for(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll ``condition`` in the reactor until it is true (the machine may be loaded)."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("condition not met in time")


def settle(seconds: float = 0.5) -> defer.Deferred:
    """Let the queue run a few rounds (to see that nothing more is delivered)."""
    return task.deferLater(reactor, seconds, lambda: None)


@pytest.fixture
def gateway(tmp_path: Any) -> Any:
    """``gateway(**email_overrides)`` -> Gateway; stopped (with its sinks) after the test."""
    started: list[tuple[Any, Sink, Sink]] = []

    def start(rules: Any = None, **email: Any) -> Gateway:
        """``rules``: the domain rules, or a function of (sink, bounces, mail) giving them."""
        sink, bounces = Sink().start(), Sink().start()
        state = str(tmp_path / f"var{len(started)}")
        mail = str(tmp_path / f"mail{len(started)}")
        if callable(rules):
            rules = rules(sink, bounces, mail)
        section: dict[str, Any] = {
            "hostname": "mx.gw.test", "listen": "127.0.0.1", "ports": [free_port()],
            "submission_ports": [], "implicit_tls_ports": [],
            "relay_networks": ["192.0.2.0/24"],
            "domain_rules": rules if rules is not None else [
                {"pattern": "*@fwd.test", "mode": "forward",
                 "target": {"server": "127.0.0.1", "port": sink.port}},
                {"pattern": "*@sender.test", "mode": "forward",
                 "target": {"server": "127.0.0.1", "port": bounces.port}},
                {"pattern": "*@local.test", "mode": "mta",
                 "mta_options": {"allow_local_delivery": True, "local_delivery_path": mail}},
            ],
            "queue": {"check_interval": 0.1, "base_retry_delay": 0.2, "max_retry_delay": 1.0,
                      "persistent_path": os.path.join(state, "queue")},
        }
        section.update(email)
        router = start_router(options_from({"email": section}, state))
        started.append((router, sink, bounces))
        return Gateway(router, sink, bounces, mail)

    yield start
    for router, sink, bounces in started:
        try:
            pytest_twisted.blockon(stop_router(router))
        finally:
            sink.stop()
            bounces.stop()
