"""The queue holds destinations, delivery resolves them (Postfix's qmgr + transport(5)).

Over real sockets: mail queued for a rule follows the rule's new target after a
reload; the credentials used are the ones configured at delivery time; a rule
that disappears defers its mail with the reason, then bounces like any other
exhausted item; a DSN is an ordinary item, routed when it is delivered.
"""

from __future__ import annotations

import base64

import pytest_twisted

from dcrouter.delivery.transport import (
    Credentials, Transport, TransportResolver, transport_for_rule,
)
from dcrouter.message import BY_ADDRESS, RULE_DESTINATION, Destination, Route
from tests.delivery.harness import Stack, email_options, wait_for
from tests.delivery.peers import Sink
from tests.delivery.rawpeer import RawNextHop
from tests.support.net import free_port


def forward_rule(pattern: str, host: str, port: int, **target) -> dict:
    return {"pattern": pattern, "mode": "forward",
            "target": dict({"server": host, "port": port}, **target)}


def waiting(stack: Stack, item_id: str):
    item = stack.queue.store.items.get(item_id)
    return item if item is not None and item.status == "deferred" else None


def finished(stack: Stack, item_id: str, status: str):
    entry = stack.queue.finished.get(item_id)
    return entry[1] if entry and entry[1].status == status else None


@pytest_twisted.ensureDeferred
async def test_a_reload_reaches_queued_mail(tmp_path):
    """Queued for a dead target; the rule is pointed at a live one; the item follows it."""
    sink = Sink().start()
    dead = free_port()
    stack = Stack(str(tmp_path), queue={"base_retry_delay": 0.3, "max_retry_delay": 0.3},
                  rules=[forward_rule("*@fwd.test", "127.0.0.1", dead)])
    try:
        ids = await stack.send("*@fwd.test", ["a@fwd.test"])
        item = await wait_for(lambda: waiting(stack, ids[0]))
        assert f"127.0.0.1]:{dead}" in item.last_error
        stack.reload([forward_rule("*@fwd.test", sink.host, sink.port)])
        await wait_for(lambda: finished(stack, ids[0], "delivered"))
        assert sink.messages[0].rcpt_tos == ["a@fwd.test"]
    finally:
        await stack.stop()
        sink.stop()


@pytest_twisted.ensureDeferred
async def test_credentials_are_looked_up_when_delivering(tmp_path):
    """A wrong password is corrected by a reload; the queued item never held either."""
    from tests.delivery.peers import CertAuthority
    ca = CertAuthority(str(tmp_path))
    sink = Sink(tls=ca, require_tls=True, users={"relay": "right-pass"}).start()

    def rule(password: str) -> dict:
        return forward_rule("*@fwd.test", sink.host, sink.port, use_tls=True, ca_path=ca.ca_path,
                            authentication={"user": "relay", "pass": password})
    stack = Stack(str(tmp_path), queue={"base_retry_delay": 0.3, "max_retry_delay": 0.3},
                  rules=[rule("wrong-pass")])
    try:
        ids = await stack.send("*@fwd.test", ["a@fwd.test"])
        item = await wait_for(lambda: waiting(stack, ids[0]))
        assert "535" in item.last_error or "auth" in item.last_error.lower()
        assert b"pass" not in item.to_json().replace(b"bypass", b"")
        stack.reload([rule("right-pass")])
        await wait_for(lambda: finished(stack, ids[0], "delivered"))
        assert sink.messages[0].auth_user == "relay"
    finally:
        await stack.stop()
        sink.stop()


@pytest_twisted.ensureDeferred
async def test_a_deleted_rule_defers_with_the_reason_then_bounces(tmp_path):
    """Like Postfix's "mail transport unavailable": deferred, named, bounced at the end."""
    sender_side = Sink().start()
    dead = free_port()
    rules = [forward_rule("*@fwd.test", "127.0.0.1", dead),
             forward_rule("*@example.org", sender_side.host, sender_side.port)]
    stack = Stack(str(tmp_path), queue={"max_retries": 2, "base_retry_delay": 0.2,
                                        "max_retry_delay": 0.2}, rules=rules)
    try:
        ids = await stack.send("*@fwd.test", ["a@fwd.test"])
        await wait_for(lambda: waiting(stack, ids[0]))
        stack.reload(rules[1:])                       # the rule goes away
        item = await wait_for(lambda: finished(stack, ids[0], "failed"), 20)
        reason = item.recipients[0].message
        assert "domain rule '*@fwd.test' no longer exists" in reason and "4.3.5" in reason
        assert item.attempts == 3
        # the DSN (an ordinary item) went out by the sender's rule, with the reason
        await wait_for(lambda: sender_side.messages)
        dsn = sender_side.messages[0]
        assert dsn.rcpt_tos == ["sender@example.org"] and dsn.mail_from in ("", "<>")
        assert b"no longer exists" in dsn.content
    finally:
        await stack.stop()
        sender_side.stop()


@pytest_twisted.ensureDeferred
async def test_a_dsn_is_routed_when_it_is_delivered(tmp_path):
    """The DSN is queued with a destination, not a route: a reload re-routes it too."""
    first, second = Sink().start(), Sink().start()
    first.handler.rcpt_replies["sender@example.org"] = "451 4.3.0 not now"
    rejecting = Sink().start()
    rejecting.handler.rcpt_replies["gone@fwd.test"] = "550 5.1.1 no such user"
    rules = [forward_rule("*@fwd.test", rejecting.host, rejecting.port),
             forward_rule("*@example.org", first.host, first.port)]
    stack = Stack(str(tmp_path), queue={"base_retry_delay": 0.3, "max_retry_delay": 0.3},
                  rules=rules)
    try:
        ids = await stack.send("*@fwd.test", ["gone@fwd.test"])
        await wait_for(lambda: finished(stack, ids[0], "failed"))
        dsn = await wait_for(lambda: next((i for i in stack.queue.store.items.values()
                                           if i.is_bounce and i.status == "deferred"), None))
        assert dsn.via.kind == BY_ADDRESS and dsn.mail_from == ""
        assert dsn.destination == f"{first.host}:{first.port}"
        stack.reload([rules[0], forward_rule("*@example.org", second.host, second.port)])
        await wait_for(lambda: second.messages)
        assert second.messages[0].rcpt_tos == ["sender@example.org"]
    finally:
        await stack.stop()
        for s in (first, second, rejecting):
            s.stop()


@pytest_twisted.ensureDeferred
async def test_auth_is_never_sent_without_tls(tmp_path):
    """smtp_sasl_security_options = noplaintext: no STARTTLS offered, no AUTH sent, deferred."""
    peer = RawNextHop(ehlo=("AUTH PLAIN LOGIN", "8BITMIME")).start()
    stack = Stack(str(tmp_path), queue={"base_retry_delay": 30, "max_retry_delay": 60},
                  rules=[forward_rule("*@fwd.test", peer.host, peer.port,
                                      authentication={"user": "relay", "pass": "never-in-clear"})])
    try:
        ids = await stack.send("*@fwd.test", ["a@fwd.test"])
        item = await wait_for(lambda: waiting(stack, ids[0]))
        assert "refusing to send AUTH credentials" in item.last_error
        assert "without TLS" in item.last_error and item.last_error.startswith("451")
        assert "AUTH" not in peer.commands and "MAIL" not in peer.commands
        assert not any(b"never-in-clear" in line or b"bmV2ZXIt" in line for line in peer.lines)
    finally:
        await stack.stop()
        peer.stop()


@pytest_twisted.ensureDeferred
async def test_auth_goes_inside_tls_only(tmp_path):
    from tests.delivery.peers import CertAuthority
    ca = CertAuthority(str(tmp_path))
    peer = RawNextHop(tls=ca.server_context(), ehlo=("8BITMIME",),
                      tls_ehlo=("AUTH PLAIN", "8BITMIME")).start()
    stack = Stack(str(tmp_path), rules=[forward_rule(
        "*@fwd.test", peer.host, peer.port, authentication={"user": "relay", "pass": "pw1"})])
    try:
        ids = await stack.send("*@fwd.test", ["a@fwd.test"])
        await wait_for(lambda: finished(stack, ids[0], "delivered"))
        assert peer.commands[:5] == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL"]
        auth = [line for line in peer.lines if line.upper().startswith(b"AUTH")][0]
        assert base64.b64decode(auth.split()[2]).endswith(b"\0relay\0pw1")
    finally:
        await stack.stop()
        peer.stop()


def test_resolution_by_kind(tmp_path):
    """What each destination resolves to, with the rules in force."""
    from dcrouter.email.routing import DomainRouter
    options = email_options(rules=[
        forward_rule("*@fwd.test", "10.0.0.1", 2525, use_tls=True,
                     authentication={"user": "u", "pass": "p"}),
        {"pattern": "*@local.test", "mode": "mta", "mta_options": {"allow_local_delivery": True}},
        {"pattern": "*@mx.test", "mode": "mta"}])
    resolver = TransportResolver(options, DomainRouter.from_options(options), str(tmp_path))

    class Item:
        def __init__(self, via, rule=""):
            self.via, self.rule_pattern = via, rule
    fwd = resolver.resolve(Item(RULE_DESTINATION, "*@fwd.test"), ["a@fwd.test", "b@fwd.test"])
    assert len(fwd) == 1 and fwd[0].recipients == ["a@fwd.test", "b@fwd.test"]
    assert fwd[0].transport == Transport("forward", "10.0.0.1", 2525, require_tls=True,
                                         credentials=Credentials("u", "p"))
    assert "'p'" not in repr(fwd[0].transport) and "AUTH as u" in fwd[0].transport.describe()
    # the default route, per domain; by address; a literal next hop
    default = resolver.resolve(Item(RULE_DESTINATION), ["x@one.test", "y@two.test"])
    assert [(g.transport.kind, g.transport.server) for g in default] == [
        ("mx", "one.test"), ("mx", "two.test")]
    mixed = resolver.resolve(Item(Destination(BY_ADDRESS)), ["a@local.test", "b@fwd.test"])
    assert [g.transport.kind for g in mixed] == ["local", "forward"]
    hop = resolver.resolve(Item(Destination.to(Route("forward", "10.9.9.9", 26))), ["z@q.test"])
    assert hop[0].transport.destination == "10.9.9.9:26" and hop[0].transport.credentials is None
    gone = resolver.resolve(Item(RULE_DESTINATION, "*@gone.test"), ["a@gone.test"])
    assert gone[0].transport is None and "no longer exists" in gone[0].error
    # the default mode follows the options in force
    resolver.update_options(email_options(default_mode="forward", default_server="10.2.2.2"))
    assert resolver.resolve(Item(RULE_DESTINATION), ["x@one.test"])[0].transport.destination == \
        "10.2.2.2:25"
    assert transport_for_rule(None, options, "").kind == "mx"
