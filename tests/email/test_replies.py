"""Replies, command line limits and trace headers as Postfix gives them, over raw sockets.

RFC 5321 4.2.4: 500 for a command not recognised, 502 for one recognised but not
implemented; VRFY without an argument is a syntax error (501, Postfix's text);
command lines up to 2048 octets (Postfix's ``line_length_limit``), AUTH lines
(XOAUTH2 bearer tokens) longer; the ``with`` of the Received header by RFC 3848
(SMTP after HELO, ESMTP, ESMTPS, ESMTPSA) and RFC 6531 (UTF8SMTP...).
"""

from __future__ import annotations

import base64
from typing import Any, Optional

import pytest_twisted
from twisted.internet.threads import deferToThread

from dcrouter.email.sessioncore import AUTH_LINE_LIMIT, COMMAND_LINE_LIMIT
from dcrouter.message import SessionInfo
from tests.email.conftest import PASSWORD
from tests.email.oauth_checker import LONG_TOKEN
from tests.email.test_bdat import Client
from tests.email.test_server import received_header


@pytest_twisted.inlineCallbacks
def test_unrecognised_500_unimplemented_502_vrfy_501(start_server: Any) -> None:
    run = start_server(max_errors=50)

    def client() -> dict[str, str]:
        c = Client(run.ports["smtp"])
        c.hello()
        out = {line: c.cmd(line) for line in
               ("FOO", "XYZZY bar", "MAIL", "EXPN staff", "TURN", "ETRN local.test", "VRFY",
                "VRFY   ", "VRFY bob", "vrfy <bob@local.test>")}
        out["after"] = c.cmd("NOOP")
        c.close()
        return out

    out = yield deferToThread(client)
    assert out["FOO"] == out["XYZZY bar"] == "500 5.5.2 Error: command not recognized"
    assert out["MAIL"] == "501 5.5.4 Syntax: MAIL FROM:<address>"
    assert out["EXPN staff"] == out["TURN"] == out["ETRN local.test"] == \
        "502 5.5.1 Error: command not implemented"
    assert out["VRFY"] == out["VRFY   "] == "501 5.5.4 Syntax: VRFY address"
    assert out["VRFY bob"].startswith("252 2.0.0 ") and out["vrfy <bob@local.test>"][:4] == "252 "
    assert out["after"] == "250 2.0.0 Ok"
    assert run.server.get_stats()["rejected_by_reason"]["unknown_command"] == 2


@pytest_twisted.inlineCallbacks
def test_command_lines_up_to_2048_octets(start_server: Any) -> None:
    run = start_server()
    orcpt = "rfc822;" + "o" * 480 + "@x.test"          # an ORCPT of 500 characters
    rcpt = f"RCPT TO:<b@local.test> NOTIFY=SUCCESS,FAILURE ORCPT={orcpt}"

    def padded(line: str, octets: int) -> str:
        return line + " " * (octets - 2 - len(line))   # parameters may be spaced out

    def client() -> list[str]:
        c = Client(run.ports["smtp"])
        c.hello()
        out = [c.cmd(padded("MAIL FROM:<a@sender.test> RET=HDRS ENVID=e1", COMMAND_LINE_LIMIT)),
               c.cmd(padded(rcpt, COMMAND_LINE_LIMIT)),
               c.cmd(padded(rcpt.replace("<b@", "<c@"), COMMAND_LINE_LIMIT + 1)),
               c.cmd("RCPT TO:<d@local.test>"), c.cmd("DATA")]
        c.send(b"Subject: long lines\r\n\r\nhi\r\n.\r\n")
        out.append(c.reply())
        c.close()
        return out

    out = yield deferToThread(client)
    assert COMMAND_LINE_LIMIT == 2048
    assert out[:3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "500 5.5.2 Error: line too long"]
    assert out[3] == "250 2.1.5 Ok" and out[4].startswith("354")
    assert out[5].startswith("250 2.0.0 Ok: queued as ")
    message = run.handler.messages[0]["message"]
    assert message.recipients == ["b@local.test", "d@local.test"]
    assert message.dsn.for_recipient("b@local.test").orcpt == orcpt


@pytest_twisted.inlineCallbacks
def test_auth_lines_longer_than_command_lines(start_server: Any) -> None:
    """An XOAUTH2 initial response of 4,300 octets is read; one over 12,288 is refused."""
    run = start_server(auth={"methods": ["PLAIN", "XOAUTH2"],
                             "checker": "tests.email.oauth_checker:TokenChecker"})
    response = base64.b64encode(b"user=dave@local.test\x01auth=Bearer " + LONG_TOKEN +
                                b"\x01\x01").decode()

    def client() -> list[str]:
        c = Client(run.ports["smtp"])
        c.hello()
        c.starttls(run.client_context())
        c.cmd("EHLO client.test")
        out = [c.cmd("AUTH PLAIN " + "A" * AUTH_LINE_LIMIT)]
        out.append(c.cmd("AUTH XOAUTH2 " + response))
        c.close()
        return out

    out = yield deferToThread(client)
    assert len("AUTH XOAUTH2 " + response) > 2 * COMMAND_LINE_LIMIT
    assert out == ["500 5.5.2 Error: line too long", "235 2.7.0 Authentication successful"]


def _session(run: Any, tls: str, helo: str, auth: bool, smtputf8: bool) -> None:
    """One message over a fresh session (TLS none, STARTTLS or implicit; HELO or EHLO)."""
    context = run.client_context()
    if tls == "implicit":
        c = Client(run.ports["smtps"], context=context)
        c.reply()
    else:
        c = Client(run.ports["smtp"])
        c.reply()
        if tls == "starttls":
            c.cmd("EHLO client.test")
            c.starttls(context)
    assert c.cmd(f"{helo} client.test").startswith("250")
    if auth:
        plain = base64.b64encode(b"\x00alice\x00" + PASSWORD.encode()).decode()
        assert c.cmd("AUTH PLAIN " + plain).startswith("235")
    assert c.cmd("MAIL FROM:<a@local.test>" + (" SMTPUTF8" if smtputf8 else ""))[:3] == "250"
    assert c.cmd("RCPT TO:<b@local.test>")[:3] == "250"
    assert c.cmd("DATA")[:3] == "354"
    c.send(b"Subject: trace\r\n\r\nhi\r\n.\r\n")
    assert c.reply()[:3] == "250"
    c.close()


@pytest_twisted.inlineCallbacks
def test_received_with_names_by_rfc_3848_and_6531(start_server: Any) -> None:
    run = start_server()
    cases: list[tuple[str, str, bool, bool, str]] = [
        ("none", "HELO", False, False, "SMTP"),
        ("implicit", "HELO", False, False, "SMTP"),      # RFC 3848 names are for ESMTP only
        ("starttls", "HELO", False, False, "SMTP"),
        ("none", "EHLO", False, False, "ESMTP"),
        ("starttls", "EHLO", False, False, "ESMTPS"),
        ("implicit", "EHLO", True, False, "ESMTPSA"),
        ("starttls", "EHLO", True, False, "ESMTPSA"),
        ("none", "EHLO", False, True, "UTF8SMTP"),
        ("starttls", "EHLO", False, True, "UTF8SMTPS"),
        ("implicit", "EHLO", True, True, "UTF8SMTPSA"),
    ]

    def client() -> None:
        for tls, helo, auth, utf8, _ in cases:
            _session(run, tls, helo, auth, utf8)

    yield deferToThread(client)
    seen = []
    for record in run.handler.messages:
        header = received_header(record["data"])
        seen.append(header.split(" with ", 1)[1].split()[0])
        assert f" id {record['message'].queue_id}" in header
    assert seen == [case[-1] for case in cases]


def test_protocol_names_of_the_session_record() -> None:
    """The combinations no socket session reaches here (AUTH needs TLS): ESMTPA, UTF8SMTPA."""
    def info(esmtp: bool, tls: bool, user: str) -> SessionInfo:
        return SessionInfo("c", "192.0.2.1", 1, 25, tls=tls, auth_user=user, esmtp=esmtp)
    table: dict[tuple[bool, bool, str, bool], Optional[str]] = {
        (True, False, "u", False): "ESMTPA", (True, False, "u", True): "UTF8SMTPA",
        (True, True, "", False): "ESMTPS", (False, True, "u", False): "SMTP",
        (True, False, "", False): "ESMTP",
    }
    for (esmtp, tls, user, utf8), name in table.items():
        assert info(esmtp, tls, user).protocol_for(utf8) == name
    assert info(True, True, "u").protocol == "ESMTPSA"
