"""DSN parameters at the SMTP server (RFC 3461), over raw sockets.

EHLO offers DSN; RET, ENVID, NOTIFY and ORCPT are read and kept (decoded) for
the queue; a malformed or repeated one is answered ``501 5.5.4`` with
Postfix's texts and counted as a client error; an unknown parameter stays
``555``; with ``email.dsn = false`` nothing is offered and the parameters get
``501 5.7.1 DSN support is disabled``.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from dcrouter.dsn import RecipientDsn
from tests.email.test_bdat import Client

NOTIFY_ERR = "501 5.5.4 Error: Bad NOTIFY parameter syntax"
ORCPT_ERR = "501 5.5.4 Error: Bad ORCPT parameter syntax"
MAIL_REFUSED = [
    ("MAIL FROM:<a@sender.test> RET=MAYBE", "501 5.5.4 Bad RET parameter syntax"),
    ("MAIL FROM:<a@sender.test> RET", "501 5.5.4 Bad RET parameter syntax"),
    ("MAIL FROM:<a@sender.test> RET=FULL RET=HDRS", "501 5.5.4 Bad RET parameter syntax"),
    ("MAIL FROM:<a@sender.test> ENVID=a=b", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@sender.test> ENVID=a+0D+0AX:+20y", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@sender.test> ENVID=" + "e" * 101, "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@sender.test> ENVID=x ENVID=y", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@sender.test> ENVID=caf\u00e9", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@sender.test> XENVID=1", "555 5.5.4 Unsupported option: XENVID"),
]
RCPT_REFUSED = [
    ("RCPT TO:<b@local.test> NOTIFY=NEVER,SUCCESS", NOTIFY_ERR),
    ("RCPT TO:<b@local.test> NOTIFY=SOMETIMES", NOTIFY_ERR),
    ("RCPT TO:<b@local.test> NOTIFY=SUCCESS NOTIFY=FAILURE", NOTIFY_ERR),
    ("RCPT TO:<b@local.test> NOTIFY", NOTIFY_ERR),
    ("RCPT TO:<b@local.test> ORCPT=a@b.test", ORCPT_ERR),
    ("RCPT TO:<b@local.test> ORCPT=rfc822;a+0D+0ABcc:+20x@b.test", ORCPT_ERR),
    ("RCPT TO:<b@local.test> ORCPT=rfc822;a@b ORCPT=rfc822;c@d", ORCPT_ERR),
    ("RCPT TO:<b@local.test> ORCPT=utf-8;j\u00f6rg@b.test", ORCPT_ERR),   # no SMTPUTF8
    ("RCPT TO:<b@local.test> ORCPT=utf-8;a\\x{0A}@b.test", ORCPT_ERR),
    ("RCPT TO:<b@local.test> ORCPT=rfc822;" + "o" * 494, ORCPT_ERR),
    ("RCPT TO:<b@local.test> DELIVERBY=120", "555 5.5.4 Unsupported option: DELIVERBY"),
]


@pytest_twisted.inlineCallbacks
def test_dsn_offered_and_parameters_kept_decoded(start_server: Any) -> None:
    run = start_server()

    def client() -> tuple[str, list[str]]:
        c = Client(run.ports["smtp"])
        ehlo = c.hello()
        out = [c.cmd("MAIL FROM:<a@sender.test> ret=hdrs ENVID=QQ+2B314159 SIZE=100"),
               c.cmd("RCPT TO:<b@local.test> NOTIFY=delay,SUCCESS ORCPT=rfc822;Orig+2Bx@old.test"),
               c.cmd("RCPT TO:<c@local.test> NOTIFY=NEVER"),
               c.cmd("RCPT TO:<d@local.test>"),
               c.cmd("RCPT TO:<e@local.test> ORCPT=x400;c+3Dus"),
               c.cmd("DATA")]
        c.send(b"Subject: dsn\r\n\r\nhi\r\n.\r\n")
        out.append(c.reply())
        # SMTPUTF8: a utf-8 ORCPT may come in UTF-8 itself (utf-8-addr-unitext)
        out += [c.cmd("MAIL FROM:<a@sender.test> SMTPUTF8"),
                c.cmd("RCPT TO:<b@local.test> NOTIFY=FAILURE ORCPT=utf-8;j\u00f6rg@\\x{7528}.test"),
                c.cmd("DATA")]
        c.send(b"Subject: dsn 2\r\n\r\nhi\r\n.\r\n")
        out.append(c.reply())
        c.close()
        return ehlo, out

    ehlo, out = yield deferToThread(client)
    assert "250-DSN" in ehlo.splitlines()
    assert [r[:3] for r in out] == ["250"] * 5 + ["354", "250"] + ["250", "250", "354", "250"]
    first, second = (m["message"] for m in run.handler.messages)
    assert first.dsn.ret == "HDRS" and first.dsn.envid == "QQ+314159"
    assert first.dsn.recipients == {
        "b@local.test": RecipientDsn("SUCCESS,DELAY", "rfc822;Orig+x@old.test"),
        "c@local.test": RecipientDsn("NEVER", ""),
        "e@local.test": RecipientDsn("", "x400;c=us")}
    assert second.dsn.ret == "" and second.dsn.envid == ""
    assert second.dsn.recipients == {
        "b@local.test": RecipientDsn("FAILURE", "utf-8;j\u00f6rg@\u7528.test")}


@pytest_twisted.inlineCallbacks
def test_bad_dsn_parameters_501_unknown_555(start_server: Any) -> None:
    run = start_server(max_errors=100)

    def client() -> tuple[list[str], list[str], str]:
        c = Client(run.ports["smtp"])
        c.hello()
        mail = [c.cmd(line) for line, _ in MAIL_REFUSED]
        assert c.cmd("MAIL FROM:<a@sender.test>").startswith("250")
        rcpt = [c.cmd(line) for line, _ in RCPT_REFUSED]
        last = c.cmd("RCPT TO:<b@local.test> NOTIFY=FAILURE")
        c.close()
        return mail, rcpt, last

    mail, rcpt, last = yield deferToThread(client)
    assert mail == [reply for _, reply in MAIL_REFUSED]
    assert rcpt == [reply for _, reply in RCPT_REFUSED]
    assert last == "250 2.1.5 Ok", "a refused RCPT leaves the transaction usable"


@pytest_twisted.inlineCallbacks
def test_dsn_errors_count_toward_max_errors(start_server: Any) -> None:
    run = start_server(max_errors=3)

    def client() -> list[str]:
        c = Client(run.ports["smtp"])
        c.hello()
        c.cmd("MAIL FROM:<a@sender.test>")
        out = [c.cmd("RCPT TO:<b@local.test> NOTIFY=X") for _ in range(3)]
        out.append("closed" if c.closed() else "open")
        c.close()
        return out

    out = yield deferToThread(client)
    assert out == [NOTIFY_ERR, NOTIFY_ERR,
                   "421 4.7.0 mail.dcrouter.test Error: too many errors", "closed"]


@pytest_twisted.inlineCallbacks
def test_dsn_disabled_and_parameters_need_ehlo(start_server: Any) -> None:
    off = start_server(dsn=False)
    on = start_server()

    def client() -> tuple[str, list[str], list[str]]:
        c = Client(off.ports["smtp"])
        ehlo = c.hello()
        disabled = [c.cmd("MAIL FROM:<a@sender.test> RET=FULL"),
                    c.cmd("MAIL FROM:<a@sender.test>"),
                    c.cmd("RCPT TO:<b@local.test> NOTIFY=SUCCESS"),
                    c.cmd("RCPT TO:<b@local.test>")]
        c.close()
        h = Client(on.ports["smtp"])
        h.reply()
        h.cmd("HELO client.test")
        helo = [h.cmd("MAIL FROM:<a@sender.test> ENVID=x"), h.cmd("MAIL FROM:<a@sender.test>"),
                h.cmd("RCPT TO:<b@local.test> NOTIFY=NEVER")]
        h.close()
        return ehlo, disabled, helo

    ehlo, disabled, helo = yield deferToThread(client)
    assert "DSN" not in ehlo
    assert disabled == ["501 5.7.1 DSN support is disabled", "250 2.1.0 Ok",
                        "501 5.7.1 DSN support is disabled", "250 2.1.5 Ok"]
    assert helo == ["555 5.5.4 Unsupported option: parameters need EHLO", "250 2.1.0 Ok",
                    "555 5.5.4 Unsupported option: parameters need EHLO"]
