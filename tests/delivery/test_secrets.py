"""A forward target's password: used inside TLS, stored nowhere, shown nowhere.

A whole router (SMTP in, API, disk or Redis queue) relays to a raw-socket next hop
that takes AUTH over STARTTLS and then defers the message.  Afterwards the
password is searched for in every file of the disk queue, every Redis value, every
API answer and every log event of the run: it must be in none of them, and a rule
read from the API and written back keeps it.
"""

from __future__ import annotations

import base64
import os
import smtplib

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from tests.api.support import Client, router_config
from tests.delivery.harness import wait_for
from tests.delivery.peers import CertAuthority
from tests.delivery.rawpeer import RawNextHop
from tests.queue.helpers import redis_server
from tests.support.router import options_from, port_of, start_router, stop_router

SECRET = "Tr0ub4dor&3-forward-pass"
NEEDLES = (SECRET.encode(), base64.b64encode(b"relay\0relay\0" + SECRET.encode()),
           base64.b64encode(SECRET.encode())[:16])


def _found(data: bytes) -> list[bytes]:
    return [n for n in NEEDLES if n in data]


class LogCapture:
    """Every log event of the test, flattened to text (format and every field)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __call__(self, event: dict) -> None:
        self.events.append(repr(sorted((k, v) for k, v in event.items()
                                       if k not in ("log_logger", "log_source"))))

    def text(self) -> bytes:
        return "\n".join(self.events).encode("utf-8", "replace")


async def _redis_values(router) -> bytes:
    store = router.email.queue.store
    out = []
    for key in await store.redis.keys(f"{store.prefix}:*"):
        kind = await store.redis.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "hash":
            values = (await store.redis.hgetall(key)).values()
        elif kind == "string":
            values = [await store.redis.get(key)]
        else:
            values = []
        out += [v if isinstance(v, bytes) else str(v).encode() for v in values]
    return b"\n".join(out)


def _files(root: str) -> bytes:
    out = []
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                out.append(f.read())
    return b"\n".join(out)


@pytest.mark.parametrize("storage", ["disk", "redis"])
@pytest_twisted.ensureDeferred
async def test_the_password_is_used_over_tls_and_stored_or_shown_nowhere(tmp_path, storage):
    state = str(tmp_path / "state")
    ca = CertAuthority(str(tmp_path))
    peer = RawNextHop(tls=ca.server_context(), tls_ehlo=("AUTH PLAIN", "8BITMIME"),
                      rcpt_replies={"a@fwd.test": "451 4.3.0 come back later"}).start()
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    redis = redis_server() if storage == "redis" else None
    url = redis.__enter__() if redis is not None else ""
    data, _ = router_config(state)
    email = data["email"]
    email["domain_rules"] = [{"pattern": "*@fwd.test", "mode": "forward", "target": {
        "server": peer.host, "port": peer.port,
        "authentication": {"user": "relay", "pass": SECRET}}}]
    email["queue"].update(base_retry_delay=300, max_retry_delay=600, check_interval=0.1)
    if redis is not None:
        email["queue"].update(storage_type="redis", redis_url=url, redis_prefix="secrets")
    router = start_router(options_from(data, state))
    client = Client(router.by_name["api"].listeners.port_for("api.port"))
    try:
        await router.email.queue.when_ready()

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port_of(router, "email"), timeout=10) as smtp:
                smtp.sendmail("sender@localhost", ["a@fwd.test"],
                              "Subject: s\r\n\r\nsecret test\r\n")
        await deferToThread(send)
        # AUTH went out inside TLS, then the next hop deferred the message
        await wait_for(lambda: "RCPT" in peer.commands, 20)
        assert peer.commands.index("STARTTLS") < peer.commands.index("AUTH")
        queue_store = router.email.queue.store
        await wait_for(lambda: queue_store.count() and router.email.delivery.counters["deferred"])
        answers = []
        queue = await client.get("/api/queue")
        answers.append(queue.text)
        [item] = queue.json()["items"]
        assert item["status"] == "deferred" and item["via"] == {"kind": "rule"}
        answers.append((await client.get(f"/api/queue/{item['id']}")).text)
        rules = await client.get("/api/email/rules")
        answers.append(rules.text)
        shown = rules.json()["rules"][0]
        assert shown["target"]["authentication"] == {"user": "relay", "pass": "********"}
        one = await client.get("/api/email/rules/%2A%40fwd.test")
        answers.append(one.text)
        for path in ("/api/stats", "/api/status", "/api/openapi.json"):
            answers.append((await client.get(path)).text)
        # written back as read (placeholder and all), with a new port: the password stays
        shown["target"]["server"] = "localhost"
        replaced = await client.put("/api/email/rules/%2A%40fwd.test", body=shown)
        assert replaced.status == 200, replaced.text
        answers.append(replaced.text)
        rule = router.options.email.domain_rules[0]
        assert rule.target.authentication.password == SECRET
        # a new rule cannot borrow a secret it does not have
        refused = await client.post("/api/email/rules", body={
            "pattern": "*@other.test", "mode": "forward", "target": {
                "server": "127.0.0.1", "port": 25,
                "authentication": {"user": "x", "pass": "********"}}})
        assert refused.status == 422 and "rule.target.authentication.pass" in refused.text
        # nothing kept or shown holds the password
        for answer in answers:
            assert SECRET not in answer
        stored = await _redis_values(router) if redis is not None else \
            _files(os.path.join(state, "queue"))
        assert b"fwd.test" in stored, "the search looked at the queue's records"
        assert _found(stored) == []
        assert len(capture.events) > 20, "the capture saw the run's log events"
        assert _found(capture.text()) == [], "a log event carries the password"
    finally:
        globalLogPublisher.removeObserver(capture)
        await stop_router(router)
        peer.stop()
        if redis is not None:
            redis.__exit__(None, None, None)
