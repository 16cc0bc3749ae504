"""The plug-in examples of docs/extending.md work in a running router over real SMTP.

Each example module under ``docs/examples/`` is loaded the way the guide
says - by name in the configuration (scanner, transformation, auth checker)
or through :class:`dcrouter.service.Extensions` (queue store, delivery
observer, auth checker) - into one router built from the embedded default
configuration on ephemeral ports, and a real smtplib client shows its effect.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import smtplib
import ssl
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from dcrouter.queue.memory import MemoryStore
from dcrouter.service import Extensions
from tests.support.configs import default_config_with_free_ports
from tests.support.proc import REPO, wait_until
from tests.support.router import options_from, start_router, stop_router

EXAMPLES = os.path.join(REPO, "docs", "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

from audit_store import AuditedStore  # noqa: E402
from delivery_log import JsonDeliveryLog  # noqa: E402
from token_checker import SignedTokenChecker, make_token  # noqa: E402

SECRET = b"docs-example-secret"


@pytest.fixture
def router(tmp_path: Any) -> Any:
    state = str(tmp_path / "var")
    data, ports = default_config_with_free_ports(state)
    mail = os.path.join(state, "mail")
    data["email"]["auth"]["methods"] = ["PLAIN", "LOGIN", "XOAUTH2"]
    data["email"]["auth"]["checker"] = "token_checker:SignedTokenChecker"
    data["email"]["domain_rules"].append({
        "pattern": "*@help.localhost", "mode": "process", "content_scanning": True,
        "scanners": [{"type": "my_scanner:BannedPhraseScanner", "action": "reject"}],
        "transformations": [{"type": "my_transform:TicketStamp", "prefix": "HELP"}],
        "mta_options": {"allow_local_delivery": True, "local_delivery_path": mail},
    })
    data.pop("proxy")
    data.pop("api")
    os.environ["DCROUTER_TOKEN_SECRET"] = SECRET.decode()
    paths = {"audit": str(tmp_path / "audit.log"), "deliveries": str(tmp_path / "deliveries.jsonl"),
             "mail": mail}
    extensions = Extensions(queue_store=AuditedStore(MemoryStore(), paths["audit"]),
                            delivery_observers=[JsonDeliveryLog(paths["deliveries"])])
    r = start_router(options_from(data, state), extensions)
    yield r, ports, paths
    pytest_twisted.blockon(stop_router(r))
    os.environ.pop("DCROUTER_TOKEN_SECRET", None)


def _send(port: int, rcpt: str, subject: str, body: str) -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        try:
            s.sendmail("me@localhost", [rcpt], f"Subject: {subject}\r\n\r\n{body}\r\n".encode())
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
    return 250, "queued"


def _maildir_messages(root: str, user: str) -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(root, user, "new", "*"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            out.append(f.read())
    return out


@pytest_twisted.inlineCallbacks
def test_scanner_and_transformation_by_name(router: Any) -> Any:
    r, ports, paths = router
    code, text = yield deferToThread(_send, ports["smtp"], "support@help.localhost",
                                     "Printer", "It is broken again.")
    assert code == 250
    code, text = yield deferToThread(_send, ports["smtp"], "support@help.localhost",
                                     "Offer", "Buy NOW while stocks last")
    assert code == 550 and "spam detected" in text
    yield deferToThread(wait_until,
                        lambda: len(_maildir_messages(paths["mail"], "support")) == 1)
    [message] = _maildir_messages(paths["mail"], "support")
    assert "X-Ticket: HELP-1 (1 rcpt)" in message
    assert "It is broken again." in message


@pytest_twisted.inlineCallbacks
def test_queue_store_and_delivery_observer_through_extensions(router: Any) -> Any:
    r, ports, paths = router
    code, _ = yield deferToThread(_send, ports["smtp"], "alice@localhost", "hi", "hello")
    assert code == 250

    def delivered() -> bool:
        return os.path.exists(paths["deliveries"]) and '"delivered"' in open(
            paths["deliveries"]).read()
    yield deferToThread(wait_until, delivered)
    events = [json.loads(line) for line in open(paths["deliveries"])]
    assert [e["event"] for e in events] == ["start", "delivered"]
    assert events[1]["recipients"] == ["alice@localhost"]
    item_id = events[0]["id"]

    def audited() -> bool:  # the store hears of the outcome just after the observer
        return any(line.split()[1:4] == ["remove", item_id, "delivered"]
                   for line in open(paths["audit"]))
    yield deferToThread(wait_until, audited)
    audit = open(paths["audit"]).read().splitlines()
    assert audit[0].split()[1:] == ["add", events[0]["id"], "pending", "alice@localhost"]


def _xoauth2(port: int, user: str, token: str, ca_free: bool = True) -> tuple[int, bytes]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the default config's self-signed certificate
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.starttls(context=context)
        s.ehlo()
        assert "XOAUTH2" in s.esmtp_features["auth"]
        blob = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        code, reply = s.docmd("AUTH", "XOAUTH2 " + blob)
        if code == 334:  # the XOAUTH2 error challenge: acknowledge it
            code, reply = s.docmd("")
        return code, reply


@pytest_twisted.inlineCallbacks
def test_xoauth2_token_checker_by_name(router: Any) -> Any:
    r, ports, paths = router
    good = make_token("bob", SECRET)
    code, _ = yield deferToThread(_xoauth2, ports["submission"], "bob", good)
    assert code == 235
    code, _ = yield deferToThread(_xoauth2, ports["submission"], "eve", good)
    assert code == 535
    expired = make_token("bob", SECRET, lifetime=-10)
    code, _ = yield deferToThread(_xoauth2, ports["submission"], "bob", expired)
    assert code == 535


def test_token_checker_through_extensions_is_the_same_class() -> None:
    checker = SignedTokenChecker(SECRET)
    assert Extensions(auth_checkers=[checker]).auth_checkers == [checker]
