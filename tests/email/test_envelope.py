"""The SMTP envelope as an attacker writes it, through real sockets.

Envelope grammar (501/553 and canonical forms), sender-specified routing
refused for strangers, recipients decided at RCPT (no backscatter), and the
RFC duties: postmaster, Return-Path, Delivered-To (loops), UTF-8 mailboxes.
Clients are raw sockets from loopback, outside ``relay_networks``; what leaves
goes to aiosmtpd sinks and Maildirs of a whole router (:mod:`tests.email.gateway`).
"""

from __future__ import annotations

import email
import email.policy
import os
import unicodedata
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from dcrouter.errors import ConfigError
from dcrouter.interfaces import IRecipientCheck
from tests.email.gateway import gateway, settle, wait_for  # noqa: F401 - the fixture
from tests.email.test_bdat import Client
from tests.email.test_server import received_header

BODY = b"From: a@sender.test\r\nSubject: hi\r\nMessage-ID: <e1@sender.test>\r\n\r\nhello\r\n"


def transaction(port: int, mail: str, rcpts: list[str], body: bytes = BODY,
                ehlo_params: str = "", data: bool = True) -> dict[str, Any]:
    """MAIL, each RCPT, and DATA when one was accepted; every reply (blocking)."""
    c = Client(port)
    c.hello()
    out: dict[str, Any] = {"mail": c.send_line(f"MAIL FROM:{mail}{ehlo_params}")}
    out["rcpt"] = [c.send_line(f"RCPT TO:{r}") for r in rcpts] if out["mail"][:3] == "250" \
        else []
    if data and any(r[:3] == "250" for r in out["rcpt"]):
        c.cmd("DATA")
        c.send(body + b".\r\n")
        out["data"] = c.reply()
    c.cmd("QUIT")
    c.close()
    return out


def _send_line(self: Client, line: str) -> str:
    self.send(line.encode("utf-8") + b"\r\n")
    return self.reply()


Client.send_line = _send_line  # type: ignore[attr-defined]


# -- item 4: the grammar ------------------------------------------------------------------------

REFUSED = [
    ('MAIL FROM:<"x";dkim=pass header.d=paypal.com;x="y@out.test>',
     "501 5.1.7 Bad sender address syntax"),
    ('MAIL FROM:<"a\rb"@sender.test>', "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<a@sender..test>", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<a@[999.0.0.1]>", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<a b@sender.test>", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<.a@sender.test>", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<a@sender.test.>", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<@:a@sender.test>", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<" + "a" * 330 + "@sender.test>",
     "501 5.1.7 Bad sender address syntax: path too long"),
    ("MAIL FROM:<jörg@sender.test>", "553 5.6.7 Must declare SMTPUTF8 to send unicode address"),
    ("MAIL FROM:<a@sender.test>junk", "501 5.1.7 Bad sender address syntax"),
    ("MAIL FROM:<a@sender.test", "501 5.1.7 Bad sender address syntax"),
    ("MAIL TO:<a@sender.test>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    ("MAIL FROM:<a@sender.test> SIZE", "501 5.5.4 Bad SIZE parameter"),
    ("MAIL FROM:<a@sender.test> X=", "501 5.5.4 Bad parameter syntax"),
]
REFUSED_RCPT = [
    ("RCPT TO:<>", "501 5.1.3 Bad recipient address syntax"),
    ("RCPT TO:<a@b@local.test>", "501 5.1.3 Bad recipient address syntax"),
    ('RCPT TO:<"a\tb"@local.test>', "501 5.1.3 Bad recipient address syntax"),
    ("RCPT TO:<a@local.test\r>", "501 5.1.3 Bad recipient address syntax"),
    ("RCPT TO:<zoë@local.test>", "553 5.6.7 Must declare SMTPUTF8 to send unicode address"),
    ("RCPT TO:<b@local.test> XFOO=NEVER", "555 5.5.4 Unsupported option: XFOO"),
    ("RCPT TO:postmaster@", "501 5.1.3 Bad recipient address syntax"),
]


@pytest_twisted.inlineCallbacks
def test_malformed_paths_are_refused_with_postfix_codes(start_server: Any) -> None:
    run = start_server(max_errors=100)

    def client() -> tuple[list[str], list[str]]:
        c = Client(run.ports["smtp"])
        c.hello()
        mail = [c.send_line(line) for line, _ in REFUSED]
        assert c.send_line("MAIL FROM:<a@sender.test>").startswith("250")
        rcpt = [c.send_line(line) for line, _ in REFUSED_RCPT]
        c.close()
        return mail, rcpt

    mail, rcpt = yield deferToThread(client)
    assert mail == [reply for _, reply in REFUSED]
    assert rcpt == [reply for _, reply in REFUSED_RCPT]
    assert run.handler.messages == []
    assert run.server.get_stats()["rejected_by_reason"]["address_syntax"] >= 15


@pytest_twisted.inlineCallbacks
def test_valid_forms_are_carried_canonical(start_server: Any) -> None:
    """Quoted local parts that are Dot-strings lose their quotes, others are quoted
    minimally; source routes are dropped; the Received header quotes what it shows."""
    run = start_server(relay_networks=["192.0.2.0/24"])

    def client() -> list[dict[str, Any]]:
        return [
            transaction(run.ports["smtp"], '<"john"@sender.test>',
                        ['<"a b;c>"@local.test>', "<@relay.test,@x.test:box@local.test>",
                         '<"\\w\\\\x\\"y"@local.test>', "<u@[IPv6:2001:db8::1]>",
                         "b@local.test"]),
            transaction(run.ports["smtp"], "<>", ['<"only"@local.test>']),
        ]

    first, second = yield deferToThread(client)
    assert first["mail"] == "250 2.1.0 Ok" and first["data"].startswith("250 2.0.0 Ok")
    # (u@[IPv6:...]: a literal no local rule takes: the handler refuses it as relaying)
    assert [r[:3] for r in first["rcpt"]] == ["250", "250", "250", "554", "250"]
    message = run.handler.messages[0]["message"]
    assert message.mail_from == "john@sender.test"
    assert message.recipients == ['"a b;c>"@local.test', "box@local.test", '"w\\\\x\\"y"@local.test',
                                  "b@local.test"]
    second_message = run.handler.messages[1]["message"]
    assert second_message.mail_from == "" and second_message.recipients == ["only@local.test"]
    assert "for <only@local.test>;" in received_header(run.handler.messages[1]["data"])


# -- item 4 end to end: the outbound envelope and the DSN -----------------------------------------

@pytest_twisted.inlineCallbacks
def test_quoted_addresses_reach_the_next_hop_and_the_dsn_quoted(gateway: Any) -> None:
    gw = gateway()
    gw.sink.handler.rcpt_replies['"gone away"@fwd.test'] = "550 5.1.1 no such user"

    def client() -> dict[str, Any]:
        return transaction(gw.port, '<"odd sender"@sender.test>',
                           ['<"a b"@fwd.test>', '<"gone away"@fwd.test>'])

    out = yield deferToThread(client)
    assert out["rcpt"] == ["250 2.1.5 Ok", "250 2.1.5 Ok"] and out["data"].startswith("250")
    yield wait_for(lambda: gw.sink.messages and gw.bounces.messages)
    delivered = gw.sink.messages[0]
    assert delivered.mail_from == '"odd sender"@sender.test'
    assert delivered.rcpt_tos == ['"a b"@fwd.test']
    dsn = gw.bounces.messages[0]
    assert dsn.rcpt_tos == ['"odd sender"@sender.test'] and dsn.mail_from in ("", "<>")
    report = email.message_from_bytes(dsn.content, policy=email.policy.default)
    assert report["To"].addresses[0].addr_spec == '"odd sender"@sender.test'
    assert b'Final-Recipient: rfc822; "gone away"@fwd.test\r\n' in dsn.content
    assert b"Status: 5.1.1" in dsn.content


# -- item 6: sender-specified routing -----------------------------------------------------------

ROUTING = ["<user%other.test@fwd.test>", "<user!other.test@fwd.test>",
           '<"user@other.test"@fwd.test>', "<a%b@local.test>", "<@fwd.test:user@other.test>"]


@pytest_twisted.inlineCallbacks
def test_sender_specified_routing_is_relaying_for_strangers(gateway: Any) -> None:
    gw = gateway()

    def client() -> dict[str, Any]:
        return transaction(gw.port, "<a@sender.test>", ROUTING + ["<plain@fwd.test>"])

    out = yield deferToThread(client)
    assert out["rcpt"][:3] == [f"554 5.7.1 {r}: Relay access denied" for r in ROUTING[:3]]
    assert out["rcpt"][3] == "554 5.7.1 <a%b@local.test>: Relay access denied"
    assert out["rcpt"][4] == "554 5.7.1 Relay access denied"  # other.test: no rule
    assert out["rcpt"][5] == "250 2.1.5 Ok" and out["data"].startswith("250")
    yield wait_for(lambda: gw.sink.messages)
    yield settle()
    assert [m.rcpt_tos for m in gw.sink.messages] == [["plain@fwd.test"]]
    assert gw.processor.get_stats()["rejections"]["relay"] == 5


@pytest_twisted.inlineCallbacks
def test_sender_specified_routing_allowed_for_relay_clients(gateway: Any) -> None:
    gw = gateway(relay_networks=["127.0.0.0/8"])

    def client() -> dict[str, Any]:
        return transaction(gw.port, "<a@sender.test>", ROUTING[:3])

    out = yield deferToThread(client)
    assert out["rcpt"] == ["250 2.1.5 Ok"] * 3
    yield wait_for(lambda: gw.sink.messages)
    assert sorted(gw.sink.messages[0].rcpt_tos) == sorted(r[1:-1] for r in ROUTING[:3])


# -- item 7: recipients decided at RCPT ---------------------------------------------------------

@implementer(IRecipientCheck)
class Directory:
    """A recipient check answering later, as a directory lookup would."""

    known = {"known@check.test"}

    def recipient_exists(self, address: str, rule_pattern: str, session: Any) -> Any:
        if address.startswith("broken@"):
            return defer.fail(ConnectionError("directory down"))
        assert rule_pattern == "*@check.test" and session.client_ip == "127.0.0.1"
        return task.deferLater(reactor, 0.01, lambda: address in self.known)


@pytest_twisted.inlineCallbacks
def test_undeliverable_local_parts_refused_at_rcpt_no_backscatter(gateway: Any) -> None:
    gw = gateway()

    def client() -> dict[str, Any]:
        return transaction(gw.port, "<forged@sender.test>",
                           ["<no/such@local.test>", '<"a b"@local.test>', "<x@local.test>",
                            "<" + "l" * 65 + "@local.test>"])

    out = yield deferToThread(client)
    assert out["rcpt"][0] == ("550 5.1.1 <no/such@local.test>: Recipient address rejected: "
                              "User unknown in local recipient table")
    assert out["rcpt"][1].startswith('550 5.1.1 <"a b"@local.test>: Recipient address rejected')
    assert out["rcpt"][2] == "250 2.1.5 Ok" and out["rcpt"][3].startswith("550 5.1.1 ")
    yield wait_for(lambda: gw.mailbox("x"))
    yield settle(1.0)
    assert gw.bounces.messages == []  # nothing bounced to the (forged) sender
    assert gw.processor.get_stats()["rejections"]["unknown_recipient"] == 3


@pytest_twisted.inlineCallbacks
def test_rule_recipient_lists_and_the_pluggable_check(gateway: Any, tmp_path: Any) -> None:
    listed = tmp_path / "recipients.txt"
    listed.write_text("# from the directory\ncarol\n\nDave@List.Test\n", encoding="utf-8")
    rules = [{"pattern": "*@list.test", "mode": "forward", "recipients": ["alice", "bob@list.test"],
              "recipients_file": str(listed), "target": {"server": "127.0.0.1", "port": 1}},
             {"pattern": "*@check.test", "mode": "forward",
              "recipient_check": "tests.email.test_envelope:Directory",
              "target": {"server": "127.0.0.1", "port": 1}}]
    gw = gateway(rules=rules)

    def client() -> dict[str, Any]:
        return transaction(gw.port, "<a@sender.test>",
                           ["<alice@list.test>", "<BOB@list.test>", "<carol@list.test>",
                            "<dave@list.test>", "<eve@list.test>", "<postmaster@list.test>",
                            "<known@check.test>", "<unknown@check.test>",
                            "<broken@check.test>"], data=False)

    out = yield deferToThread(client)
    assert out["rcpt"][:4] == ["250 2.1.5 Ok"] * 4
    assert out["rcpt"][4] == ("550 5.1.1 <eve@list.test>: Recipient address rejected: "
                              "User unknown in relay recipient table")
    assert out["rcpt"][5] == "250 2.1.5 Ok"  # postmaster always exists
    assert out["rcpt"][6] == "250 2.1.5 Ok"
    assert out["rcpt"][7].startswith("550 5.1.1 <unknown@check.test>: ")
    assert out["rcpt"][8] == "451 4.3.0 <broken@check.test>: Temporary lookup failure"


def test_recipient_check_configuration_errors(tmp_path: Any) -> None:
    from tests.email.support import make_processor
    base = {"pattern": "*@x.test", "mode": "mta"}
    with pytest.raises(ConfigError, match=r"domain_rules\[0\]\.recipient_check"):
        make_processor(str(tmp_path), {"domain_rules": [dict(base, recipient_check="nocolon")]})
    with pytest.raises(ConfigError, match=r"domain_rules\[0\]\.recipient_check: cannot import"):
        make_processor(str(tmp_path), {"domain_rules": [dict(base,
                                                             recipient_check="no.such:Thing")]})
    with pytest.raises(ConfigError, match=r"domain_rules\[0\]\.recipients_file: cannot read"):
        make_processor(str(tmp_path), {"domain_rules": [dict(
            base, recipients_file=str(tmp_path / "absent"))]})
    with pytest.raises(ConfigError, match=r"domain_rules\[0\]\.recipients\[1\]"):
        make_processor(str(tmp_path), {"domain_rules": [dict(base, recipients=["a", "b c"])]})


# -- item 8: the RFC duties ---------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_postmaster_in_any_case_with_or_without_our_domain(gateway: Any) -> None:
    gw = gateway()

    def client() -> dict[str, Any]:
        return transaction(gw.port, "<a@sender.test>",
                           ["<postmaster>", "<POSTMASTER>", "<PostMaster@mx.gw.test>",
                            "<postmaster@MX.GW.TEST>", "<postmaster@other.test>"])

    out = yield deferToThread(client)
    assert out["rcpt"] == ["250 2.1.5 Ok"] * 4 + ["554 5.7.1 Relay access denied"]
    state = gw.router.context.state_dir
    box = os.path.join(state, "mail", "postmaster", "new")
    yield wait_for(lambda: os.path.isdir(box) and len(os.listdir(box)) >= 3)
    with open(os.path.join(box, sorted(os.listdir(box))[0]), "rb") as f:
        stored = f.read()
    assert stored.startswith(b"Return-Path: <a@sender.test>\r\nDelivered-To: postmaster@")


@pytest_twisted.inlineCallbacks
def test_final_delivery_adds_return_path_and_delivered_to_and_detects_loops(gateway: Any) -> None:
    gw = gateway()
    looping = b"Delivered-To: Box@local.test\r\n" + BODY

    def client() -> list[dict[str, Any]]:
        return [transaction(gw.port, "<a@sender.test>", ["<Box@local.test>"]),
                transaction(gw.port, "<>", ["<box@local.test>"]),
                transaction(gw.port, "<a@sender.test>", ["<box@local.test>"], looping)]

    results = yield deferToThread(client)
    assert all(r["data"].startswith("250") for r in results)
    yield wait_for(lambda: len(gw.mailbox("box")) == 2 and gw.bounces.messages)
    first, second = gw.mailbox("box")
    assert first.startswith(b"Return-Path: <a@sender.test>\r\nDelivered-To: Box@local.test\r\n"
                            b"Received: from client.test ([127.0.0.1])")
    assert first.endswith(BODY)
    assert second.startswith(b"Return-Path: <>\r\nDelivered-To: box@local.test\r\nReceived: ")
    dsn = gw.bounces.messages[0]
    assert dsn.rcpt_tos == ["a@sender.test"]
    assert b"Status: 5.4.6" in dsn.content and b"mail forwarding loop for <box@local.test>" in \
        dsn.content
    yield settle()
    assert len(gw.mailbox("box")) == 2


@pytest_twisted.inlineCallbacks
def test_utf8_local_parts_get_nfc_maildirs_or_553_at_rcpt(gateway: Any) -> None:
    gw = gateway()
    decomposed = unicodedata.normalize("NFD", "Zoë")

    def client() -> dict[str, Any]:
        return transaction(gw.port, "<jörg@sender.test>",
                           [f"<{decomposed}@local.test>", "<☃@local.test>", "<用户@local.test>"],
                           ehlo_params=" SMTPUTF8 BODY=8BITMIME")

    out = yield deferToThread(client)
    assert out["mail"] == "250 2.1.0 Ok"
    assert out["rcpt"][0] == "250 2.1.5 Ok" and out["rcpt"][2] == "250 2.1.5 Ok"
    assert out["rcpt"][1].startswith("553 5.6.7 <☃@local.test>: Recipient address rejected")
    assert out["data"].startswith("250")
    yield wait_for(lambda: gw.mailbox("zoë") and gw.mailbox("用户"))
    assert unicodedata.normalize("NFC", "zoë") in os.listdir(gw.mail)
    assert decomposed.lower() not in os.listdir(gw.mail)
    stored = gw.mailbox("zoë")[0]
    assert stored.startswith(f"Return-Path: <jörg@sender.test>\r\nDelivered-To: {decomposed}"
                             "@local.test\r\n".encode())
    yield settle()
    assert gw.bounces.messages == []
