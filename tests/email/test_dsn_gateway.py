"""DSN through a whole router: raw SMTP in, Maildir and aiosmtpd next hops out.

One transaction with RET, ENVID and a different NOTIFY per recipient goes
through the server, the processor, the disk queue and delivery; the sender's
side (an aiosmtpd sink reached by the rule for its domain) gets exactly the
reports asked for.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.delivery.reports import parse_report
from tests.email.gateway import gateway, settle, wait_for  # noqa: F401 - the fixture
from tests.email.test_bdat import Client


@pytest_twisted.inlineCallbacks
def test_one_transaction_each_notify_gets_its_reports(gateway: Any) -> None:  # noqa: F811
    gw = gateway()
    gw.sink.handler.rcpt_replies.update({"gone@fwd.test": "550 5.1.1 no such user",
                                         "never@fwd.test": "550 5.1.1 no such user"})

    def client() -> list[str]:
        c = Client(gw.port)
        c.hello()
        out = [c.cmd("MAIL FROM:<author@sender.test> RET=HDRS ENVID=gw+2D1"),
               c.cmd("RCPT TO:<box@local.test> NOTIFY=SUCCESS ORCPT=rfc822;alias@old.test"),
               c.cmd("RCPT TO:<gone@fwd.test> NOTIFY=FAILURE"),
               c.cmd("RCPT TO:<far@fwd.test> NOTIFY=SUCCESS"),
               c.cmd("RCPT TO:<never@fwd.test> NOTIFY=NEVER"),
               c.cmd("RCPT TO:<plain@fwd.test>"), c.cmd("DATA")]
        c.send(b"From: author@sender.test\r\nSubject: dsn e2e\r\nMessage-ID: <gw1@sender.test>"
               b"\r\n\r\nhello\r\n.\r\n")
        out.append(c.reply())
        c.cmd("QUIT")
        c.close()
        return out

    replies = yield deferToThread(client)
    assert [r[:3] for r in replies] == ["250"] * 6 + ["354", "250"]
    yield wait_for(lambda: len(gw.bounces.messages) >= 3 and gw.mailbox("box"))
    yield settle(1.0)
    assert len(gw.bounces.messages) == 3
    assert sorted(gw.sink.messages[0].rcpt_tos) == ["far@fwd.test", "plain@fwd.test"]
    reports = [parse_report(m.content) for m in gw.bounces.messages]
    for m in gw.bounces.messages:
        assert m.mail_from in ("", "<>") and m.rcpt_tos == ["author@sender.test"]
    actions = {}
    for report in reports:
        assert report.per_message["Original-Envelope-Id"] == "gw-1"
        assert report.per_message["Reporting-MTA"] == "dns; mx.gw.test"
        assert b"Message-ID: <gw1@sender.test>" in report.parts["text/rfc822-headers"]
        assert "message/rfc822" not in report.parts          # RET=HDRS, and no success copy
        for address, fields in report.recipients.items():
            actions[address] = (fields["Action"], fields["Original-Recipient"], report.subject)
    assert actions == {
        "box@local.test": ("delivered", "rfc822; alias@old.test",
                           "Successful Mail Delivery Report"),
        "far@fwd.test": ("relayed", "rfc822; far@fwd.test", "Successful Mail Delivery Report"),
        "gone@fwd.test": ("failed", "rfc822; gone@fwd.test",
                          "Undelivered Mail Returned to Sender"),
    }
