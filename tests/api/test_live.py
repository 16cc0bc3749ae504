"""The API against the real email path: SMTP in, the real queue and delivery, rules by API.

A forward rule points at an aiosmtpd sink that is not yet running, so messages wait in the
queue as ``deferred``; the API's retry, delete and pause are then observable at the sink.
"""

from __future__ import annotations

import os
import smtplib
import time

import pytest_twisted
from twisted.internet import reactor, task, threads

from tests.api.support import Client, assert_error, start_api_router
from tests.delivery.peers import Sink
from tests.support.net import free_port
from tests.support.router import port_of, stop_router


def _send(port: int, recipient: str, subject: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("client.test")
        smtp.sendmail("sender@localhost", [recipient],
                      f"Subject: {subject}\r\nFrom: sender@localhost\r\n\r\nbody\r\n".encode())
    return subject


async def _until(check, timeout: float = 20.0, interval: float = 0.1):
    """Poll the async ``check()`` until it returns something true."""
    waited = 0.0
    while True:
        result = await check()
        if result:
            return result
        if waited > timeout:
            raise AssertionError("condition not met in time")
        await task.deferLater(reactor, interval, lambda: None)
        waited += interval


async def _deferred_items(client: Client) -> list:
    return (await client.get("/api/queue?status=deferred")).json()["items"]


@pytest_twisted.ensureDeferred
async def test_rule_crud_routes_the_next_smtp_message(tmp_path):
    state_dir = str(tmp_path / "var")
    router, port = start_api_router(state_dir)
    client = Client(port)
    smtp_port = port_of(router, "email")
    sink = await threads.deferToThread(lambda: Sink().start())
    try:
        # no rule for api.test: mta mode would look up MX hosts; add a forward rule first
        rule = {"pattern": "*@api.test", "mode": "forward",
                "target": {"server": "127.0.0.1", "port": sink.port}}
        assert (await client.post("/api/email/rules", body=rule)).status == 201
        await threads.deferToThread(_send, smtp_port, "bob@api.test", "first")

        async def arrived():
            return [m for m in sink.messages if b"Subject: first" in m.content]
        await _until(arrived)
        assert sink.messages[0].rcpt_tos == ["bob@api.test"]

        # replace the rule: local delivery into Maildirs; the next message goes there
        maildir = os.path.join(state_dir, "api-mail")
        local = {"mode": "mta", "mta_options": {"allow_local_delivery": True,
                                                "local_delivery_path": maildir}}
        assert (await client.put("/api/email/rules/%2A%40api.test", body=local)).status == 200
        await threads.deferToThread(_send, smtp_port, "bob@api.test", "second")

        async def in_maildir():
            new = os.path.join(maildir, "bob", "new")
            return os.path.isdir(new) and os.listdir(new)
        files = await _until(in_maildir)
        with open(os.path.join(maildir, "bob", "new", files[0]), "rb") as f:
            assert b"Subject: second" in f.read()
        assert len(sink.messages) == 1
    finally:
        await threads.deferToThread(sink.stop)
        await stop_router(router)


@pytest_twisted.ensureDeferred
async def test_queue_retry_delete_and_pause_are_observable(tmp_path):
    router, port = start_api_router(str(tmp_path / "var"))
    client = Client(port)
    smtp_port = port_of(router, "email")
    sink_port = free_port()
    try:
        # one destination per item: each waits alone for its own unreachable target
        for pattern, target in (("*@later.test", sink_port), ("*@gone.test", free_port())):
            rule = {"pattern": pattern, "mode": "forward",
                    "target": {"server": "127.0.0.1", "port": target}}
            assert (await client.post("/api/email/rules", body=rule)).status == 201
        await threads.deferToThread(_send, smtp_port, "keep@later.test", "keep")
        await threads.deferToThread(_send, smtp_port, "drop@gone.test", "drop")

        async def both_deferred():
            items = await _deferred_items(client)
            return items if len(items) == 2 else None
        items = await _until(both_deferred)
        by_rcpt = {i["recipients"][0]["address"]: i for i in items}
        keep, drop = by_rcpt["keep@later.test"], by_rcpt["drop@gone.test"]
        assert keep["attempts"] == 1 and keep["last_error"]
        stats = (await client.get("/api/stats")).json()
        assert stats["summary"]["queue_depth"] == 2

        # delete: gone from the queue, never delivered
        assert (await client.delete(f"/api/queue/{drop['id']}")).status == 200
        assert_error(await client.delete(f"/api/queue/{drop['id']}"), 404, "not_found")

        # pause, then retry: nothing is attempted while paused
        sink = await threads.deferToThread(lambda: Sink(port=sink_port).start())
        try:
            assert (await client.post("/api/queue/pause")).json() == {"paused": True}
            assert (await client.post(f"/api/queue/{keep['id']}/retry")).status == 200
            await task.deferLater(reactor, 1.5, lambda: None)
            assert sink.messages == []
            item = (await client.get(f"/api/queue/{keep['id']}")).json()["item"]
            assert item["attempts"] == 1 and item["status"] == "deferred"
            assert item["next_attempt"] <= time.time()  # due now, held back by the pause
            assert (await client.get("/api/stats")).json()["email"]["queue"]["paused"] is True

            # resume: the retried item is delivered
            assert (await client.post("/api/queue/resume")).json() == {"paused": False}

            async def delivered():
                return sink.messages
            messages = await _until(delivered)
            assert [m.rcpt_tos for m in messages] == [["keep@later.test"]]

            async def finished():
                item = (await client.get(f"/api/queue/{keep['id']}")).json()["item"]
                return item if item["status"] == "delivered" else None
            await _until(finished)
        finally:
            await threads.deferToThread(sink.stop)
        metrics = (await client.get("/metrics")).text
        assert 'dcrouter_delivery_attempts_total{mode="forward",outcome="success"} 1.0' in metrics
        assert 'dcrouter_delivery_attempts_total{mode="forward",outcome="transient"} 2.0' \
            in metrics
        assert 'dcrouter_messages_total{mode="forward",outcome="accepted"} 2.0' in metrics
    finally:
        await stop_router(router)


EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")


def _send_two(port: int) -> str:
    """A clean message, then the EICAR test file; returns how the second was answered."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.ehlo("client.test")
        smtp.sendmail("sender@localhost", ["a@scan.test"], b"Subject: clean\r\n\r\nhello\r\n")
        try:
            smtp.sendmail("sender@localhost", ["b@scan.test"],
                          b"Subject: infected\r\n\r\n" + EICAR + b"\r\n")
        except smtplib.SMTPDataError as e:
            return f"{e.smtp_code}"
    return "accepted"


@pytest_twisted.ensureDeferred
async def test_scan_verdicts_and_rejections_reach_the_metrics(tmp_path):
    router, port = start_api_router(str(tmp_path / "var"))
    client = Client(port)
    sink = await threads.deferToThread(lambda: Sink().start())
    try:
        rule = {"pattern": "*@scan.test", "mode": "process", "content_scanning": True,
                "scanners": [{"type": "virus", "action": "reject"}],
                "target": {"server": "127.0.0.1", "port": sink.port}}
        created = await client.post("/api/email/rules", body=rule)
        assert created.status == 201, created.text
        answer = await threads.deferToThread(_send_two, port_of(router, "email"))
        assert answer.startswith("5")
        text = (await client.get("/metrics")).text
        assert 'dcrouter_scan_verdicts_total{scanner="virus",verdict="clean"} 1.0' in text
        assert 'dcrouter_scan_verdicts_total{scanner="virus",verdict="virus"} 1.0' in text
        assert 'dcrouter_messages_total{mode="process",outcome="accepted"} 1.0' in text
        rejections = [line for line in text.splitlines()
                      if line.startswith("dcrouter_smtp_rejections_total{")]
        assert len(rejections) == 1 and 'reply_class="5xx"' in rejections[0]

        async def delivered():
            return sink.messages
        messages = await _until(delivered)
        assert [m.rcpt_tos for m in messages] == [["a@scan.test"]]
    finally:
        await threads.deferToThread(sink.stop)
        await stop_router(router)


def _txt(port: int, name: str) -> list[str]:
    import dns.message
    import dns.query
    import dns.rdatatype
    reply = dns.query.udp(dns.message.make_query(name, "TXT"), "127.0.0.1", port=port,
                          timeout=10)
    return [b"".join(r.strings).decode() for rrset in reply.answer for r in rrset
            if rrset.rdtype == dns.rdatatype.TXT]


@pytest_twisted.ensureDeferred
async def test_dkim_rotation_step_publish_a_new_selector_with_reload(tmp_path):
    """docs/operations.md: create the new selector's key, reload, DNS serves its record."""
    from dcrouter.dkimkeys import DkimKeyStore
    from tests.api.support import router_config
    from tests.support.configs import write_config
    from tests.support.router import options_from, start_router
    state_dir = str(tmp_path / "var")
    data, _ports = router_config(state_dir)
    path = write_config(str(tmp_path / "dcrouter.toml"), data)
    router = start_router(options_from(data, state_dir), config_path=path)
    client = Client(router.by_name["api"].listeners.port_for("api.port"))
    dns_port = port_of(router, "dns", protocol="udp")
    try:
        name = "2026b._domainkey.localhost."
        assert await threads.deferToThread(_txt, dns_port, name) == []
        # step 1, as an operator does it: another process writes the key into state_dir/dkim
        key = await threads.deferToThread(
            lambda: DkimKeyStore(state_dir).get("localhost", "2026b", create=True))
        assert os.path.exists(os.path.join(state_dir, "dkim", "localhost", "2026b.key"))
        # step 2: reload, and the DNS publishes it
        assert (await client.post("/api/reload")).status == 200
        assert await threads.deferToThread(_txt, dns_port, name) == [key.public_record()]
    finally:
        await stop_router(router)
