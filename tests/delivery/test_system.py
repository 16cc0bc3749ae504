"""MultiModeDeliverySystem over real sockets: aiosmtpd downstreams and a twisted.names DNS server."""

from __future__ import annotations

import email
import email.policy
import os

import dkim
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.names import dns

from dcrouter.message import DkimSigning, Route
from tests.delivery.harness import Stack, wait_for
from tests.delivery.peers import Sink, CertAuthority, port_free_on, start_dns


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


class Recorder:
    """An observer that records calls (and one that raises, to prove it is harmless)."""

    def __init__(self, explode: bool = False) -> None:
        self.calls = []
        self.explode = explode

    def on_delivery_start(self, item):
        self.calls.append(("start", item.id))
        if self.explode:
            raise RuntimeError("observer bug")

    def on_delivery_success(self, item, result):
        self.calls.append(("success", item.id))

    def on_delivery_failed(self, item, error, permanent):
        self.calls.append(("failed", item.id, permanent))


def forward(sink: Sink, **kw) -> Route:
    return Route(kind="forward", server=sink.host, port=sink.port, **kw)


async def finished(stack: Stack, item_id: str, status: str, timeout: float = 15.0):
    async def check():
        return None
    item = None

    def probe():
        entry = stack.queue.finished.get(item_id)
        return entry[1] if entry and entry[1].status == status else None
    item = await wait_for(probe, timeout)
    return item


@pytest_twisted.ensureDeferred
async def test_forward_plain_with_observers(tmp_path, sink):
    rec, bad = Recorder(), Recorder(explode=True)
    stack = Stack(str(tmp_path), observers=[bad, rec])
    try:
        ids = await stack.send(forward(sink), ["alice@example.com", "bob@example.com"])
        item = await finished(stack, ids[0], "delivered")
        assert [r.status for r in item.recipients] == ["delivered", "delivered"]
        assert len(sink.messages) == 1
        msg = sink.messages[0]
        assert msg.mail_from == "sender@example.org"
        assert msg.rcpt_tos == ["alice@example.com", "bob@example.com"]
        assert msg.helo == "dcrouter.test" and not msg.tls
        assert b"Hello." in msg.content
        assert ("success", ids[0]) in rec.calls and ("start", ids[0]) in rec.calls
        assert stack.delivery.reputation.get_stats()["example.org"]["sent"] == 2
        assert stack.delivery.get_stats()["reputation"]["example.org"]["sent"] == 2
        assert stack.delivery.counters["pipelined_transactions"] == 0, "not offered: not used"
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_connection_reuse_for_many_messages(tmp_path, sink):
    stack = Stack(str(tmp_path), delivery={"per_destination_concurrency": 1})
    try:
        for n in range(6):
            await stack.send(forward(sink), [f"u{n}@example.com"])
        await wait_for(lambda: len(sink.messages) == 6)
        assert sink.handler.sessions < 6, "messages to one destination share connections"
    finally:
        await stack.stop()


def forward_rule(pattern: str, sink: Sink, **target) -> dict:
    """A forward rule to ``sink`` (``target`` keys as in [email.domain_rules.target])."""
    return {"pattern": pattern, "mode": "forward",
            "target": dict({"server": sink.host, "port": sink.port}, **target)}


@pytest_twisted.ensureDeferred
async def test_forward_starttls_required_with_auth(tmp_path):
    ca = CertAuthority(str(tmp_path))
    sink = Sink(tls=ca, require_tls=True, users={"relay": "s3cret"}).start()
    good = forward_rule("*@good.test", sink, use_tls=True, ca_path=ca.ca_path,
                        authentication={"user": "relay", "pass": "s3cret"})
    bad = forward_rule("*@bad.test", sink, use_tls=True, ca_path=ca.ca_path,
                       authentication={"user": "relay", "pass": "wrong"})
    stack = Stack(str(tmp_path), rules=[good, bad])
    try:
        ids = await stack.send("*@good.test", ["alice@good.test"])
        await finished(stack, ids[0], "delivered")
        assert sink.messages[0].tls and sink.messages[0].auth_user == "relay"
        # a wrong password: deferred, never delivered
        ids = await stack.send("*@bad.test", ["bob@bad.test"])
        item = await wait_for(lambda: stack.queue.store.items.get(ids[0]) and
                              stack.queue.store.items[ids[0]].status == "deferred"
                              and stack.queue.store.items[ids[0]])
        assert "auth" in item.last_error.lower() or "535" in item.last_error
        assert len(sink.messages) == 1
    finally:
        await stack.stop()
        sink.stop()


@pytest_twisted.ensureDeferred
async def test_opportunistic_starttls_and_required_tls_verification(tmp_path):
    ca = CertAuthority(str(tmp_path))
    other_ca = CertAuthority(str(tmp_path / "x")) if os.makedirs(tmp_path / "x") is None else None
    sink = Sink(tls=ca).start()
    plain = Sink().start()
    stack = Stack(str(tmp_path))
    try:
        ids = await stack.send(forward(sink), ["a@example.com"])
        await finished(stack, ids[0], "delivered")
        assert sink.messages[0].tls, "STARTTLS used when offered"
        # required TLS against a certificate from an unknown CA: deferred
        ids = await stack.send(forward(sink, require_tls=True, ca_path=other_ca.ca_path),
                               ["b@example.com"])
        item = await wait_for(lambda: (stack.queue.store.items.get(ids[0]) or None) and
                              stack.queue.store.items[ids[0]].status == "deferred" and
                              stack.queue.store.items[ids[0]])
        assert "certificate verify failed" in item.last_error
        # required TLS to a server without STARTTLS: deferred
        ids = await stack.send(forward(plain, require_tls=True, ca_path=ca.ca_path),
                               ["c@example.com"])
        item = await wait_for(lambda: (stack.queue.store.items.get(ids[0]) or None) and
                              stack.queue.store.items[ids[0]].status == "deferred" and
                              stack.queue.store.items[ids[0]])
        assert "TLS" in item.last_error
        assert len(sink.messages) == 1 and not plain.messages
    finally:
        await stack.stop()
        sink.stop()
        plain.stop()


@pytest_twisted.ensureDeferred
async def test_451_then_250_is_retried(tmp_path, sink):
    sink.handler.data_replies = ["451 4.3.0 try again later", "250 ok"]
    rec = Recorder()
    stack = Stack(str(tmp_path), observers=[rec])
    try:
        ids = await stack.send(forward(sink), ["alice@example.com"])
        item = await finished(stack, ids[0], "delivered")
        assert item.attempts == 2
        assert ("failed", ids[0], False) in rec.calls
        assert len(sink.messages) == 1
        assert stack.delivery.reputation.get_stats()["example.org"]["deferred"] == 1
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_retries_exhausted_fail_and_bounce(tmp_path, sink):
    bounces = Sink().start()
    sink.handler.data_replies = ["451 4.3.0 later"] * 10
    # the DSN is routed like mail to the sender's address: by the rule for example.org
    stack = Stack(str(tmp_path), queue={"max_retries": 1},
                  rules=[forward_rule("*@example.org", bounces)])
    try:
        ids = await stack.send(forward(sink), ["alice@example.com"])
        item = await finished(stack, ids[0], "failed")
        assert item.attempts == 2
        await wait_for(lambda: bounces.messages)
        assert bounces.messages[0].mail_from in ("", "<>") and \
            bounces.messages[0].rcpt_tos == ["sender@example.org"]
        assert not stack.delivery.suppression.is_suppressed("alice@example.com"), \
            "a transient failure is not a hard bounce"
    finally:
        await stack.stop()
        bounces.stop()


@pytest_twisted.ensureDeferred
async def test_timeout_defers(tmp_path, sink):
    sink.handler.delay = 2.0
    stack = Stack(str(tmp_path), delivery={"command_timeout": 0.5},
                  queue={"base_retry_delay": 30, "max_retry_delay": 60})
    try:
        ids = await stack.send(forward(sink), ["alice@example.com"])
        item = await wait_for(lambda: (stack.queue.store.items.get(ids[0]) or None) and
                              stack.queue.store.items[ids[0]].status == "deferred" and
                              stack.queue.store.items[ids[0]])
        assert "timeout" in item.last_error.lower()
        assert item.recipients[0].status == "pending"
        assert item.next_attempt - item.updated_at > 20
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_connection_refused_defers(tmp_path):
    from tests.support.net import free_port
    stack = Stack(str(tmp_path))
    try:
        ids = await stack.send(Route(kind="forward", server="127.0.0.1", port=free_port()),
                               ["a@example.com"])
        item = await wait_for(lambda: (stack.queue.store.items.get(ids[0]) or None) and
                              stack.queue.store.items[ids[0]].status == "deferred" and
                              stack.queue.store.items[ids[0]])
        assert "ConnectionRefused" in item.last_error or "refused" in item.last_error.lower()
    finally:
        await stack.stop()


def _mx_records(port_hosts):
    return port_hosts


@pytest_twisted.ensureDeferred
async def test_mx_delivery_550_dsn_and_suppression(tmp_path):
    """MX lookup through a real DNS server; a 550 bounces to the sender's own MX."""
    sink = Sink(pipelining=True).start()
    port = sink.port
    assert port_free_on("127.0.0.3", port)
    sender_mx = Sink(host="127.0.0.3", port=port).start()
    records = {
        "example.test": [dns.Record_MX(10, b"dead.example.test"),
                         dns.Record_MX(20, b"mx.example.test")],
        "dead.example.test": [dns.Record_A("127.0.0.2")],
        "mx.example.test": [dns.Record_A("127.0.0.1")],
        "sender.test": [dns.Record_MX(10, b"mx.sender.test")],
        "mx.sender.test": [dns.Record_A("127.0.0.3")],
        "nullmx.test": [dns.Record_MX(0, b"")],
    }
    dns_port, dns_number = start_dns(reactor, records)
    stack = Stack(str(tmp_path), delivery={"nameservers": (f"127.0.0.1:{dns_number}",),
                                           "mx_port": port})
    sink.handler.rcpt_replies["gone@example.test"] = "550 5.1.1 <gone@example.test>: user unknown"
    try:
        ids = await stack.send(Route(kind="mx"), ["ok@example.test", "gone@example.test"],
                               mail_from="author@sender.test")
        item = await finished(stack, ids[0], "failed")
        states = {r.address: r.status for r in item.recipients}
        assert states == {"ok@example.test": "delivered", "gone@example.test": "failed"}
        assert sink.messages[0].rcpt_tos == ["ok@example.test"]
        assert stack.delivery.counters["pipelined_transactions"] == 1, "MAIL/RCPT pipelined"
        # the DSN went to the sender domain's MX, from the null sender
        await wait_for(lambda: sender_mx.messages)
        dsn = sender_mx.messages[0]
        assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == ["author@sender.test"]
        parsed = email.message_from_bytes(dsn.content, policy=email.policy.default)
        assert parsed.get_content_type() == "multipart/report"
        assert parsed.get_param("report-type") == "delivery-status"
        status_part = [p for p in parsed.walk() if p.get_content_type() ==
                       "message/delivery-status"][0]
        text = status_part.as_string()
        assert "Final-Recipient: rfc822; gone@example.test" in text
        assert "Status: 5.1.1" in text and "Action: failed" in text
        assert stack.delivery.suppression.is_suppressed("GONE@example.test")
        assert not stack.delivery.suppression.is_suppressed("ok@example.test")
        assert stack.delivery.reputation.get_stats()["sender.test"]["bounced"] == 1
        # null MX: immediate failure, no connection, DSN to the sender
        ids = await stack.send(Route(kind="mx"), ["x@nullmx.test"], mail_from="author@sender.test")
        item = await finished(stack, ids[0], "failed")
        assert item.attempts == 1 and "null MX" in item.recipients[0].message
        await wait_for(lambda: len(sender_mx.messages) == 2)
        assert b"5.1.10" in sender_mx.messages[1].content
    finally:
        await stack.stop()
        await dns_port.stopListening()
        sink.stop()
        sender_mx.stop()


@pytest_twisted.ensureDeferred
async def test_no_bounce_for_null_sender_or_bounces(tmp_path, sink):
    bounces = Sink().start()
    sink.handler.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    stack = Stack(str(tmp_path), rules=[forward_rule("*@example.org", bounces)])
    try:
        ids = await stack.send(forward(sink), ["gone@example.com"], mail_from="")
        await finished(stack, ids[0], "failed")
        assert stack.delivery.counters["bounces"] == 0
        await wait_for(lambda: stack.queue.get_stats()["size"] == 0)
        assert not bounces.messages
    finally:
        await stack.stop()
        bounces.stop()


@pytest_twisted.ensureDeferred
async def test_size_limit_of_remote_is_respected(tmp_path):
    sink = Sink(size_limit=1000).start()
    stack = Stack(str(tmp_path))
    try:
        ids = await stack.send(forward(sink), ["a@example.com"], mail_from="",
                               body=b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n")
        item = await finished(stack, ids[0], "failed")
        assert item.recipients[0].code == 552 and "5.3.4" in item.recipients[0].message
        assert not sink.messages
    finally:
        await stack.stop()
        sink.stop()


@pytest_twisted.ensureDeferred
async def test_maildir_delivery(tmp_path):
    root = tmp_path / "mail"
    stack = Stack(str(tmp_path))
    try:
        ids = await stack.send(Route(kind="local", local_path=str(root)),
                               ["Alice@local.test", "bob@local.test"])
        await finished(stack, ids[0], "delivered")
        for user in ("alice", "bob"):
            new = os.listdir(root / user / "new")
            assert len(new) == 1 and os.listdir(root / user / "tmp") == []
            assert (root / user / "cur").is_dir()
            with open(root / user / "new" / new[0], "rb") as f:
                assert b"Hello." in f.read()
        ids = await stack.send(Route(kind="local", local_path=str(root)), ["../evil@local.test"],
                               mail_from="")
        item = await finished(stack, ids[0], "failed")
        assert "bad local part" in item.recipients[0].message
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_dkim_signature_verifies(tmp_path, sink):
    stack = Stack(str(tmp_path))
    try:
        key = stack.dkim_keys.get("example.org", "sel1", create=True)
        ids = await stack.send(forward(sink), ["alice@example.com"],
                               dkim=DkimSigning("example.org", "sel1"))
        await finished(stack, ids[0], "delivered")
        record = key.public_record().encode()
        content = sink.messages[0].content
        assert content.startswith(b"DKIM-Signature:")

        def dnsfunc(name, timeout=5):
            assert name == b"sel1._domainkey.example.org."
            return record
        ok = await threads.deferToThread(dkim.verify, content, dnsfunc=dnsfunc)
        assert ok
        tampered = content.replace(b"Hello.", b"Hullo.")
        assert not await threads.deferToThread(dkim.verify, tampered, dnsfunc=dnsfunc)
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_utf8_addresses_need_smtputf8(tmp_path, sink):
    utf8 = Sink(smtputf8=True).start()
    stack = Stack(str(tmp_path))
    try:
        body = "Subject: grüße\r\n\r\nhällo\r\n".encode("utf-8")
        ids = await stack.send(forward(utf8), ["jörg@example.com"], body=body)
        await finished(stack, ids[0], "delivered")
        assert utf8.messages[0].rcpt_tos == ["jörg@example.com"]
        assert "hällo".encode("utf-8") in utf8.messages[0].content
        ids = await stack.send(forward(sink), ["jörg@example.com"], mail_from="", body=body)
        item = await finished(stack, ids[0], "failed")
        assert "5.6.7" in item.recipients[0].message and not sink.messages
    finally:
        await stack.stop()
        utf8.stop()


@pytest_twisted.ensureDeferred
async def test_several_items_to_an_unreachable_target_all_defer(tmp_path):
    """Two or more items for one dead destination open several connections; all must defer."""
    from tests.support.net import free_port
    stack = Stack(str(tmp_path))
    try:
        route = Route(kind="forward", server="127.0.0.1", port=free_port())
        ids = []
        for n in range(4):
            ids += await stack.send(route, [f"r{n}@example.com"])

        def all_deferred():
            items = [stack.queue.store.items.get(i) for i in ids]
            return all(i is not None and i.status == "deferred" for i in items) or None
        await wait_for(all_deferred, 15)
        workers = stack.delivery.workers
        assert not workers or all(w.connections == 0 for w in workers.values())
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_mx_starttls_verified_against_configured_ca(tmp_path):
    """verify_certificates: the MX's chain and name are checked; a failure defers, never clear."""
    for sub in ("good", "other", "a", "b"):
        (tmp_path / sub).mkdir()
    ca = CertAuthority(str(tmp_path / "good"))
    stranger = CertAuthority(str(tmp_path / "other"))
    sink = Sink(tls=ca).start()
    records = {
        "example.test": [dns.Record_MX(10, b"mx.example.test")],
        "mx.example.test": [dns.Record_A("127.0.0.1")],
        "misnamed.test": [dns.Record_MX(10, b"mx.misnamed.test")],   # not in the certificate
        "mx.misnamed.test": [dns.Record_A("127.0.0.1")],
    }
    dns_port, dns_number = start_dns(reactor, records)
    common = {"nameservers": (f"127.0.0.1:{dns_number}",), "mx_port": sink.port,
              "verify_certificates": True}
    good = Stack(str(tmp_path / "a"), delivery=dict(common, ca_path=ca.ca_path))
    wrong_ca = Stack(str(tmp_path / "b"), delivery=dict(common, ca_path=stranger.ca_path))

    def deferred(stack, item_id):
        item = stack.queue.store.items.get(item_id)
        return item if item is not None and item.status == "deferred" else None
    try:
        ids = await good.send(Route(kind="mx"), ["ok@example.test"])
        await finished(good, ids[0], "delivered")
        assert sink.messages[-1].tls and sink.messages[-1].rcpt_tos == ["ok@example.test"]
        ids = await good.send(Route(kind="mx"), ["x@misnamed.test"])
        item = await wait_for(lambda: deferred(good, ids[0]))
        assert item.last_error.startswith("451 4.4.1") and "Mismatch" in item.last_error
        ids = await wrong_ca.send(Route(kind="mx"), ["y@example.test"])
        item = await wait_for(lambda: deferred(wrong_ca, ids[0]))
        assert "certificate verify failed" in item.last_error
        assert [m.rcpt_tos for m in sink.messages] == [["ok@example.test"]], \
            "nothing went out unverified or in clear"
    finally:
        await good.stop()
        await wrong_ca.stop()
        sink.stop()
        dns_port.stopListening()
