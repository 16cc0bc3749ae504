"""DSN between dcrouter and a real Postfix, on both sides of it.

* Postfix as the **sending MTA**: ``sendmail -N success,failure -R hdrs -V ENVID``
  into a private Postfix whose ``relayhost`` is dcrouter, STARTTLS required
  (``smtp_tls_security_level = encrypt``).  Postfix passes NOTIFY, ORCPT, RET
  and ENVID; dcrouter delivers into a Maildir and reports back to the sender.
* Postfix as the **next hop that offers DSN**: raw SMTP with DSN parameters into
  dcrouter, forwarded to a private Postfix that discards one domain and fails
  another.  Postfix gets the parameters (its own reports carry ENVID, ORCPT and
  RET=HDRS; NOTIFY=NEVER gets none) and dcrouter adds no report of its own.
"""

from __future__ import annotations

import os
from typing import Any

import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from tests.delivery.peers import Sink
from tests.delivery.reports import parse_report
from tests.email.certs import make_ca_and_server
from tests.email.gateway import gateway, settle, wait_for  # noqa: F401 - the fixture
from tests.email.test_bdat import Client
from tests.email.test_server import received_header
from tests.support.privatepostfix import PrivatePostfix


@defer.inlineCallbacks
def _wait(postfix: PrivatePostfix, condition: Any, timeout: float = 40) -> Any:
    """wait_for, with Postfix's log in the error when the condition never holds."""
    try:
        yield wait_for(condition, timeout)
    except AssertionError:
        raise AssertionError("condition not met in time; Postfix log:\n" + postfix.log[-4000:])


@pytest_twisted.inlineCallbacks
def test_postfix_relays_dsn_parameters_into_dcrouter_over_starttls(gateway: Any,  # noqa: F811
                                                                   tmp_path: Any) -> None:
    os.makedirs(tmp_path / "certs")
    certs = make_ca_and_server(str(tmp_path / "certs"))
    gw = gateway(tls={"cert_path": certs["server.pem"], "key_path": certs["server.key"]})
    gw.sink.handler.rcpt_replies["gone@fwd.test"] = "550 5.1.1 no such user"
    postfix = PrivatePostfix(main={"relayhost": f"[127.0.0.1]:{gw.port}",
                                   "default_transport": "smtp",
                                   "smtp_tls_security_level": "encrypt",
                                   "smtp_tls_loglevel": "1"})
    try:
        yield deferToThread(postfix.start)
        message = (b"From: author@sender.test\r\nTo: box@local.test\r\n"
                   b"Subject: from postfix\r\nMessage-ID: <pf-in-1@sender.test>\r\n\r\nhello\r\n")
        yield deferToThread(postfix.sendmail, [
            "-f", "author@sender.test", "-N", "success,failure", "-R", "hdrs",
            "-V", "pf-envid-1", "box@local.test", "gone@fwd.test"], message)
        yield _wait(postfix, lambda: len(gw.bounces.messages) >= 2 and gw.mailbox("box"))
        yield settle(1.0)
        log = postfix.log
        assert "TLS connection established to 127.0.0.1" in log, log[-2000:]
        assert log.count("status=sent") == 2, log[-2000:]
        # the message came in over STARTTLS from an MTA that said EHLO: ESMTPS
        stored = gw.mailbox("box")[0]
        start = stored.index(b"Received: from postfix.test")
        assert " with ESMTPS id " in received_header(stored[start:])
        reports = {}
        for sent in gw.bounces.messages:
            assert sent.mail_from in ("", "<>") and sent.rcpt_tos == ["author@sender.test"]
            report = parse_report(sent.content)
            assert report.per_message["Original-Envelope-Id"] == "pf-envid-1"
            assert "message/rfc822" not in report.parts, "RET=HDRS from Postfix"
            reports.update(report.recipients)
        assert len(gw.bounces.messages) == 2
        assert reports["box@local.test"]["Action"] == "delivered"
        assert reports["gone@fwd.test"]["Action"] == "failed"
        # Postfix sends ORCPT=rfc822;<address as given>: it is the Original-Recipient
        assert reports["box@local.test"]["Original-Recipient"] == "rfc822; box@local.test"
    finally:
        yield deferToThread(postfix.stop)


@pytest_twisted.inlineCallbacks
def test_postfix_as_the_next_hop_gets_notify_orcpt_ret_envid(gateway: Any) -> None:  # noqa: F811
    postfix_reports = Sink().start()
    # Postfix accepts fail.test, then its own next hop refuses it: Postfix bounces it
    refusing = Sink().start()
    refusing.handler.rcpt_replies.update({"b@fail.test": "550 5.1.1 no such user here",
                                          "c@fail.test": "550 5.1.1 no such user here"})
    postfix = PrivatePostfix(transports={
        "ok.test": "discard:", "fail.test": f"smtp:[127.0.0.1]:{refusing.port}",
        "sender.test": f"smtp:[127.0.0.1]:{postfix_reports.port}"})
    try:
        yield deferToThread(postfix.start)
        hop = {"server": "127.0.0.1", "port": postfix.port}
        gw = gateway(rules=lambda sink, bounces, mail: [
            {"pattern": "*@ok.test", "mode": "forward", "target": hop},
            {"pattern": "*@fail.test", "mode": "forward", "target": hop},
            {"pattern": "*@sender.test", "mode": "forward",
             "target": {"server": "127.0.0.1", "port": bounces.port}},
        ])

        def client() -> list[str]:
            c = Client(gw.port)
            c.hello()
            out = [c.cmd("MAIL FROM:<author@sender.test> RET=HDRS ENVID=pf+2Dnext+2D1"),
                   c.cmd("RCPT TO:<a@ok.test> NOTIFY=SUCCESS ORCPT=rfc822;orig-a@old.test"),
                   c.cmd("RCPT TO:<b@fail.test> NOTIFY=FAILURE,DELAY"),
                   c.cmd("RCPT TO:<c@fail.test> NOTIFY=NEVER"), c.cmd("DATA")]
            c.send(b"From: author@sender.test\r\nSubject: to postfix\r\n"
                   b"Message-ID: <pf-next-1@sender.test>\r\n\r\nhello\r\n.\r\n")
            out.append(c.reply())
            c.close()
            return out

        replies = yield deferToThread(client)
        assert [r[:3] for r in replies] == ["250"] * 4 + ["354", "250"]
        yield _wait(postfix, lambda: len(postfix_reports.messages) >= 2)
        yield settle(1.5)
        log = postfix.log
        assert "sender delivery status notification" in log      # NOTIFY=SUCCESS for a
        assert "sender non-delivery notification" in log         # b (c: NEVER, not in it)
        assert len(postfix_reports.messages) == 2, log[-3000:]
        seen = {}
        for sent in postfix_reports.messages:
            assert sent.rcpt_tos == ["author@sender.test"]
            report = parse_report(sent.content)
            assert report.per_message["Original-Envelope-Id"] == "pf-next-1"
            seen.update(report.recipients)
            if "b@fail.test" in report.recipients:      # RET=HDRS reached Postfix
                assert "text/rfc822-headers" in report.parts
                assert "message/rfc822" not in report.parts
        assert set(seen) == {"a@ok.test", "b@fail.test"}
        # Postfix writes "rfc822;address" (no space after the semicolon)
        assert seen["a@ok.test"]["Original-Recipient"] == "rfc822;orig-a@old.test"
        assert seen["b@fail.test"]["Action"] == "failed"
        # Postfix offers DSN: it got NOTIFY=SUCCESS and reported; dcrouter sent no "relayed"
        assert gw.bounces.messages == []
    finally:
        yield deferToThread(postfix.stop)
        postfix_reports.stop()
        refusing.stop()
