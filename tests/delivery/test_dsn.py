"""Delivery status notifications after delivery (RFC 3461/3464), over real sockets.

What each NOTIFY gets (NEVER: nothing; none: failures and delays; SUCCESS: a
``delivered`` report from a Maildir, a ``relayed`` one from a next hop without
DSN, none from a next hop that offers DSN - it got the parameters itself), what
a report returns (RET, ``bounce_size_limit``), ENVID and ORCPT in it, the
delay notice after ``delay_warning_time`` (once), and RFC 6533 reports for
UTF-8 addresses.  Next hops are aiosmtpd sinks and a raw socket peer that
records every command line.
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from dcrouter.dsn import EnvelopeDsn, RecipientDsn
from dcrouter.message import Route
from tests.delivery.harness import Stack, wait_for
from tests.delivery.peers import Sink
from tests.delivery.rawpeer import RawNextHop
from tests.delivery.reports import parse_report
from tests.delivery.test_system import finished, forward, forward_rule

BODY = (b"From: <sender@example.org>\r\nTo: <a@example.com>\r\nSubject: the original\r\n"
        b"Message-ID: <orig-1@example.org>\r\n\r\n" + b"The body line.\r\n" * 20)


@pytest.fixture
def sinks():
    next_hop, bounces = Sink().start(), Sink().start()
    yield next_hop, bounces
    next_hop.stop()
    bounces.stop()


def settle(seconds: float = 0.6):
    return task.deferLater(reactor, seconds, lambda: None)


def local_rule(tmp_path) -> dict:
    return {"pattern": "*@local.test", "mode": "mta",
            "mta_options": {"allow_local_delivery": True,
                            "local_delivery_path": str(tmp_path / "mail")}}


@pytest_twisted.ensureDeferred
async def test_failure_report_follows_notify_with_envid_orcpt_and_hdrs(tmp_path, sinks):
    next_hop, bounces = sinks
    for name in "abcd":
        next_hop.handler.rcpt_replies[f"{name}@example.com"] = "550 5.1.1 no such user"
    stack = Stack(str(tmp_path), rules=[forward_rule("*@example.org", bounces)])
    dsn = EnvelopeDsn("HDRS", "env+42 x", {
        "a@example.com": RecipientDsn("NEVER"),
        "b@example.com": RecipientDsn("SUCCESS"),
        "c@example.com": RecipientDsn("", "rfc822;orig-c@old.test"),
        "d@example.com": RecipientDsn("FAILURE,DELAY")})
    try:
        ids = await stack.send(forward(next_hop), [f"{n}@example.com" for n in "abcd"],
                               body=BODY, dsn=dsn)
        await finished(stack, ids[0], "failed")
        await wait_for(lambda: bounces.messages)
        # NOTIFY=NEVER for every recipient: no report at all
        ids = await stack.send(forward(next_hop), ["a@example.com", "b@example.com"], body=BODY,
                               dsn=EnvelopeDsn("", "", {"a@example.com": RecipientDsn("NEVER"),
                                                        "b@example.com": RecipientDsn("NEVER")}))
        await finished(stack, ids[0], "failed")
        await settle()
        assert len(bounces.messages) == 1 and stack.delivery.counters["bounces"] == 1
        sent = bounces.messages[0]
        assert sent.mail_from in ("", "<>") and sent.rcpt_tos == ["sender@example.org"]
        report = parse_report(sent.content)
        assert report.subject == "Undelivered Mail Returned to Sender"
        assert report.per_message["Original-Envelope-Id"] == "env+42 x"
        assert report.per_message["Reporting-MTA"] == "dns; dcrouter.test"
        assert set(report.recipients) == {"c@example.com", "d@example.com"}
        c = report.recipients["c@example.com"]
        assert c["Original-Recipient"] == "rfc822; orig-c@old.test"
        assert c["Action"] == "failed" and c["Status"] == "5.1.1"
        assert c["Remote-MTA"] == "dns; 127.0.0.1"
        assert c["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
        assert report.recipients["d@example.com"]["Original-Recipient"] == \
            "rfc822; d@example.com"
        # RET=HDRS: the header only
        assert "message/rfc822" not in report.parts
        returned = report.parts["text/rfc822-headers"]
        assert b"Message-ID: <orig-1@example.org>" in returned and b"The body line" not in returned
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_failure_report_returns_the_message_within_bounce_size_limit(tmp_path, sinks):
    next_hop, bounces = sinks
    next_hop.handler.rcpt_replies["gone@example.com"] = "550 5.1.1 no such user"
    stack = Stack(str(tmp_path), delivery={"bounce_size_limit": 2000},
                  rules=[forward_rule("*@example.org", bounces)])
    big = BODY + b"x" * 2000 + b"\r\n"
    try:
        for body, dsn in ((BODY, None), (BODY, EnvelopeDsn(ret="FULL")),
                          (big, EnvelopeDsn(ret="FULL"))):
            ids = await stack.send(forward(next_hop), ["gone@example.com"], body=body, dsn=dsn)
            await finished(stack, ids[0], "failed")
        await wait_for(lambda: len(bounces.messages) == 3)
        reports = sorted((parse_report(m.content) for m in bounces.messages),
                         key=lambda r: b"x" * 100 in r.parts.get("message/rfc822", b"x" * 100))
        for report in reports[:2]:      # no RET, or RET=FULL: the whole message, as Postfix
            whole = report.parts["message/rfc822"]
            assert b"Subject: the original" in whole and whole.count(b"The body line.") == 20
        # over bounce_size_limit: the header only, the MIME structure intact
        assert "message/rfc822" not in reports[2].parts
        assert b"Subject: the original" in reports[2].parts["text/rfc822-headers"]
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_success_reports_delivered_from_maildir_relayed_without_dsn(tmp_path, sinks):
    next_hop, bounces = sinks
    stack = Stack(str(tmp_path), rules=[local_rule(tmp_path),
                                        forward_rule("*@fwd.test", next_hop),
                                        forward_rule("*@example.org", bounces)])
    try:
        ids = await stack.send("*@local.test", ["box@local.test", "quiet@local.test"],
                               body=BODY, mode="mta", dsn=EnvelopeDsn("FULL", "gw-7", {
                                   "box@local.test": RecipientDsn("SUCCESS,FAILURE",
                                                                  "rfc822;alias@old.test")}))
        await finished(stack, ids[0], "delivered")
        ids = await stack.send("*@fwd.test", ["far@fwd.test"], body=BODY,
                               dsn=EnvelopeDsn("", "", {"far@fwd.test": RecipientDsn("SUCCESS")}))
        await finished(stack, ids[0], "delivered")
        ids = await stack.send("*@fwd.test", ["plain@fwd.test"], body=BODY)
        await finished(stack, ids[0], "delivered")
        await wait_for(lambda: len(bounces.messages) == 2)
        await settle()
        assert len(bounces.messages) == 2, "no report without NOTIFY=SUCCESS"
        assert stack.delivery.counters["dsn_successes"] == 2
        by_rcpt = {}
        for sent in bounces.messages:
            assert sent.mail_from in ("", "<>") and sent.rcpt_tos == ["sender@example.org"]
            report = parse_report(sent.content)
            assert report.subject == "Successful Mail Delivery Report"
            # success reports return the header only, whatever RET says (as Postfix)
            assert "message/rfc822" not in report.parts
            assert b"Subject: the original" in report.parts["text/rfc822-headers"]
            by_rcpt.update({a: (report, b) for a, b in report.recipients.items()})
        assert set(by_rcpt) == {"box@local.test", "far@fwd.test"}
        report, box = by_rcpt["box@local.test"]
        assert box["Action"] == "delivered" and box["Status"] == "2.0.0"
        assert box["Original-Recipient"] == "rfc822; alias@old.test" and "Remote-MTA" not in box
        assert report.per_message["Original-Envelope-Id"] == "gw-7"
        _, far = by_rcpt["far@fwd.test"]
        assert far["Action"] == "relayed" and far["Remote-MTA"] == "dns; 127.0.0.1"
        assert os.listdir(tmp_path / "mail" / "box" / "new")
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_next_hop_that_offers_dsn_gets_the_parameters_and_reports_itself(tmp_path, sinks):
    _, bounces = sinks
    with_dsn = RawNextHop(ehlo=("8BITMIME", "DSN")).start()   # RCPT after RCPT (Postfix pipelines)
    without = RawNextHop().start()
    stack = Stack(str(tmp_path), rules=[forward_rule("*@example.org", bounces)])
    dsn = EnvelopeDsn("HDRS", "env+=1", {
        "a@dsn.test": RecipientDsn("SUCCESS,FAILURE", "rfc822;Orig+x@old.test"),
        "b@dsn.test": RecipientDsn("NEVER"),
        "u@dsn.test": RecipientDsn("", "utf-8;j\u00f6rg@old.test")})
    rcpts = ["a@dsn.test", "b@dsn.test", "c@dsn.test", "u@dsn.test"]
    try:
        for hop in (with_dsn, without):
            ids = await stack.send(Route(kind="forward", server=hop.host, port=hop.port), rcpts,
                                   body=BODY, dsn=dsn)
            await finished(stack, ids[0], "delivered")
        await settle()
        envelope = [line.decode() for line in with_dsn.lines if line[:4] in (b"MAIL", b"RCPT")]
        assert envelope == [
            "MAIL FROM:<sender@example.org> RET=HDRS ENVID=env+2B+3D1",
            "RCPT TO:<a@dsn.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Orig+2Bx@old.test",
            "RCPT TO:<b@dsn.test> NOTIFY=NEVER ORCPT=rfc822;b@dsn.test",
            "RCPT TO:<c@dsn.test> ORCPT=rfc822;c@dsn.test",     # none given: none made up
            "RCPT TO:<u@dsn.test> ORCPT=utf-8;j\\x{F6}rg@old.test",
        ]
        plain = [line.decode() for line in without.lines if line[:4] in (b"MAIL", b"RCPT")]
        assert plain == ["MAIL FROM:<sender@example.org>"] + [f"RCPT TO:<{r}>" for r in rcpts]
        # NOTIFY=SUCCESS: the DSN-capable hop reports; the other one got a "relayed" report
        assert len(bounces.messages) == 1
        report = parse_report(bounces.messages[0].content)
        assert list(report.recipients) == ["a@dsn.test"]
        assert report.recipients["a@dsn.test"]["Action"] == "relayed"
        assert report.recipients["a@dsn.test"]["Original-Recipient"] == \
            "rfc822; Orig+x@old.test"
    finally:
        await stack.stop()
        with_dsn.stop()
        without.stop()


@pytest_twisted.ensureDeferred
async def test_delay_notice_once_after_delay_warning_time(tmp_path, sinks):
    next_hop, bounces = sinks
    next_hop.handler.rcpt_replies.update({"slow@example.com": "451 4.3.2 try again later",
                                          "calm@example.com": "451 4.3.2 try again later",
                                          "never@example.com": "451 4.3.2 try again later"})
    stack = Stack(str(tmp_path), queue={"max_retries": 8, "base_retry_delay": 0.2,
                                        "max_retry_delay": 0.3, "storage_type": "disk"},
                  delivery={"delay_warning_time": 0.5},
                  rules=[forward_rule("*@example.org", bounces)])
    dsn = EnvelopeDsn("", "late-1", {"calm@example.com": RecipientDsn("FAILURE"),
                                     "never@example.com": RecipientDsn("NEVER")})
    try:
        ids = await stack.send(forward(next_hop), ["slow@example.com", "calm@example.com",
                                                   "never@example.com"], body=BODY, dsn=dsn)
        await wait_for(lambda: bounces.messages)
        item = await stack.queue.get_item(ids[0])
        assert item.delay_warned and item.status in ("deferred", "processing")
        await finished(stack, ids[0], "failed", timeout=20)
        await wait_for(lambda: len(bounces.messages) == 2)
        await settle()
        assert len(bounces.messages) == 2, "one delay notice, then the failure"
        delayed, failed = (parse_report(m.content) for m in bounces.messages)
        assert delayed.subject == "Delayed Mail (still being retried)"
        assert list(delayed.recipients) == ["slow@example.com"]   # no NOTIFY: DELAY implied
        slow = delayed.recipients["slow@example.com"]
        assert slow["Action"] == "delayed" and slow["Status"] == "4.3.2"
        assert delayed.per_message["Original-Envelope-Id"] == "late-1"
        assert "message/rfc822" not in delayed.parts and "text/rfc822-headers" in delayed.parts
        assert failed.subject == "Undelivered Mail Returned to Sender"
        assert set(failed.recipients) == {"slow@example.com", "calm@example.com"}
        assert stack.delivery.counters["dsn_delays"] == 1
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_no_delay_notice_by_default(tmp_path, sinks):
    next_hop, bounces = sinks
    next_hop.handler.rcpt_replies["slow@example.com"] = "451 4.3.2 try again later"
    stack = Stack(str(tmp_path), queue={"max_retries": 4, "base_retry_delay": 0.2,
                                        "max_retry_delay": 0.2},
                  rules=[forward_rule("*@example.org", bounces)])
    try:
        assert stack.options.delivery.delay_warning_time == 0
        ids = await stack.send(forward(next_hop), ["slow@example.com"], body=BODY,
                               dsn=EnvelopeDsn("", "", {"slow@example.com":
                                                        RecipientDsn("DELAY,FAILURE")}))
        await finished(stack, ids[0], "failed", timeout=20)
        await wait_for(lambda: bounces.messages)
        await settle()
        assert [parse_report(m.content).subject for m in bounces.messages] == [
            "Undelivered Mail Returned to Sender"]
    finally:
        await stack.stop()


@pytest_twisted.ensureDeferred
async def test_utf8_addresses_get_an_rfc_6533_report(tmp_path, sinks):
    next_hop, bounces = sinks
    stack = Stack(str(tmp_path), rules=[forward_rule("*@example.org", bounces)])
    try:
        # the next hop offers no SMTPUTF8: the UTF-8 recipient fails (553 5.6.7)
        ids = await stack.send(forward(next_hop), ["zo\u00eb@example.com"], body=BODY,
                               dsn=EnvelopeDsn("HDRS", "", {"zo\u00eb@example.com": RecipientDsn(
                                   "", "utf-8;zo\u00eb@old.test")}))
        await finished(stack, ids[0], "failed")
        await wait_for(lambda: bounces.messages)
        report = parse_report(bounces.messages[0].content)
        assert "message/global-delivery-status" in report.parts
        assert "message/global-headers" in report.parts
        zoe = report.recipients["zo\u00eb@example.com"]
        assert zoe["Final-Recipient"] == "utf-8; zo\u00eb@example.com"
        assert zoe["Original-Recipient"] == "utf-8; zo\u00eb@old.test"
        assert zoe["Status"] == "5.6.7"
    finally:
        await stack.stop()
