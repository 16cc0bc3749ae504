"""The suppression list through the API and dcrouterctl: refused at RCPT, listed, lifted."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys

import pytest_twisted
from twisted.internet import threads

from tests.api.support import TOKEN, assert_error
from tests.support.proc import twistd_env
from tests.support.router import port_of


def _rcpt(port: int, address: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("me@localhost")
        return smtp.rcpt(address)


def _ctl(api_port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcrouter.api.ctl", "--url",
                           f"http://127.0.0.1:{api_port}", "--token", TOKEN, *args],
                          capture_output=True, text=True, env=twistd_env(), timeout=60)


@pytest_twisted.ensureDeferred
async def test_suppressed_recipient_refused_listed_and_lifted(running):
    router, client, _queue = running
    smtp_port = port_of(router, "email")
    router.email.delivery.suppression.add("gone@localhost", "550 5.1.1 no such user")

    code, text = await threads.deferToThread(_rcpt, smtp_port, "gone@localhost")
    assert code == 550 and b"5.1.1" in text

    listed = (await client.get("/api/email/suppression")).json()
    assert listed["count"] == 1
    assert listed["suppressed"][0]["address"] == "gone@localhost"
    assert "no such user" in listed["suppressed"][0]["reason"]

    api_port = client.base.rsplit(":", 1)[1]
    result = await threads.deferToThread(_ctl, int(api_port), "suppression", "list")
    assert result.returncode == 0 and "gone@localhost" in result.stdout

    result = await threads.deferToThread(_ctl, int(api_port), "--json", "suppression",
                                         "remove", "gone@localhost")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"removed": "gone@localhost"}

    code, _ = await threads.deferToThread(_rcpt, smtp_port, "gone@localhost")
    assert code == 250
    assert_error(await client.delete("/api/email/suppression/gone@localhost"), 404, "not_found")
    result = await threads.deferToThread(_ctl, int(api_port), "suppression", "remove",
                                         "gone@localhost")
    assert result.returncode == 1
