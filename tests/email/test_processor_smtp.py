"""The processor behind the real SMTP server: smtplib clients over loopback.

Each mode end to end, relay denial, a scanner reject answered as 550 at DATA,
rate limits answered as 451, queue back-pressure as 452.
"""

from __future__ import annotations

import smtplib
import ssl
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from dcrouter.config import parse_config
from dcrouter.email.processor import MultiModeProcessor
from dcrouter.email.routing import DomainRouter
from dcrouter.email.scanning.virus import EICAR
from dcrouter.email.server import UnifiedEmailServer
from dcrouter.service import Extensions, RouterContext
from tests.email.conftest import PASSWORD
from tests.email.support import RecordingQueue, multipart, simple_message, transport_of
from tests.support.net import free_port

RULES = [
    {"pattern": "*@fwd.test", "mode": "forward", "target": {"server": "127.0.0.1", "port": 2626}},
    {"pattern": "*@local.test", "mode": "mta", "mta_options": {"allow_local_delivery": True}},
    {"pattern": "*@mx.test", "mode": "mta", "mta_options": {"dkim_sign": True}},
    {"pattern": "*@proc.test", "mode": "process", "content_scanning": True,
     "scanners": [{"type": "spam", "threshold": 5.0, "action": "tag", "subject_prefix": "[SPAM]"},
                  {"type": "virus", "action": "reject"},
                  {"type": "attachment", "blocked_extensions": [".exe"], "action": "reject"}],
     "transformations": [{"type": "add_header", "header": "X-Gateway", "value": "dcrouter"}],
     "rate_limits": {"max_messages_per_minute": 3, "max_recipients_per_message": 2}},
]


class Stack:
    """Server + processor + recording queue built from one [email] section."""

    def __init__(self, server: UnifiedEmailServer, processor: MultiModeProcessor,
                 queue: RecordingQueue, ports: dict[str, int], ca: str) -> None:
        self.server = server
        self.processor = processor
        self.queue = queue
        self.ports = ports
        self.ca = ca


@pytest.fixture
def stack(tmp_path: Any, certs: dict[str, str]) -> Any:
    started: list[UnifiedEmailServer] = []

    def start(**email: Any) -> Stack:
        ports = {"smtp": free_port(), "submission": free_port()}
        section: dict[str, Any] = {
            "hostname": "mail.dcrouter.test", "listen": "127.0.0.1",
            "ports": [ports["smtp"], ports["submission"]],
            "submission_ports": [ports["submission"]], "implicit_tls_ports": [],
            "tls": {"cert_path": certs["server.pem"], "key_path": certs["server.key"]},
            "auth": {"users": [{"username": "alice", "password": PASSWORD}]},
            "domain_rules": RULES,
        }
        section.update(email)
        options = parse_config({"router": {"state_dir": str(tmp_path / "state")},
                                "email": section})
        assert options.email is not None
        context = RouterContext(options, reactor, Extensions())
        queue = RecordingQueue(str(tmp_path / "queue"))
        processor = MultiModeProcessor(options.email, DomainRouter.from_options(options.email),
                                       queue, context)
        server = UnifiedEmailServer(options.email, processor, context)
        server.startService()
        started.append(server)
        return Stack(server, processor, queue, ports, certs["ca.pem"])

    yield start
    for server in started:
        pytest_twisted.blockon(server.stopService())


def converse(port: int, mail_from: str, rcpts: list[str], data: bytes,
             login: bool = False, ca: str = "") -> dict[str, Any]:
    """One SMTP transaction step by step; the reply to every command (blocking)."""
    out: dict[str, Any] = {"rcpt": []}
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.ehlo("client.test")
        if login:
            s.starttls(context=ssl.create_default_context(cafile=ca))
            s.ehlo("client.test")
            s.login("alice", PASSWORD)
        out["mail"] = s.mail(mail_from)
        if out["mail"][0] != 250:
            return out
        for rcpt in rcpts:
            out["rcpt"].append(s.rcpt(rcpt))
        if not any(code == 250 for code, _ in out["rcpt"]):
            return out
        out["data"] = s.data(data)
    return out


def send(st: Stack, rcpts: list[str], data: bytes = b"", *, port: str = "smtp",
         login: bool = False, mail_from: str = "alice@sender.test") -> Any:
    return deferToThread(converse, st.ports[port], mail_from, rcpts, data or simple_message(),
                         login, st.ca)


@pytest_twisted.inlineCallbacks
def test_each_mode_over_smtp(stack: Any) -> None:
    st = stack()
    r = yield send(st, ["a@fwd.test", "b@local.test", "c@mx.test", "d@proc.test",
                        "e@elsewhere.test"])
    assert [c for c, _ in r["rcpt"]] == [250] * 5
    code, text = r["data"]
    assert code == 250 and b"queued as" in text
    by = {q.rule_pattern: q for q in st.queue.requests}
    assert set(by) == {"*@fwd.test", "*@local.test", "*@mx.test", "*@proc.test", ""}
    assert text.endswith(st.queue.requests[0].queue_id.encode())
    hop = transport_of(st.processor, by["*@fwd.test"])
    assert (hop.kind, hop.port) == ("forward", 2626)
    assert transport_of(st.processor, by["*@local.test"]).kind == "local"
    assert by["*@mx.test"].dkim is None    # From: sender.test is not mx.test: unsigned
    assert transport_of(st.processor, by[""]).kind == "mx"   # default mode for a relay client
    processed = st.queue.body(by["*@proc.test"])
    assert b"X-Gateway: dcrouter" in processed and b"X-Dcrouter-Scan: spam=clean" in processed
    forwarded = st.queue.body(by["*@fwd.test"])
    assert forwarded.startswith(b"Received: from client.test") and b"X-Gateway" not in forwarded


@pytest_twisted.inlineCallbacks
def test_relay_denied_outside_relay_networks(stack: Any) -> None:
    st = stack(relay_networks=["192.0.2.0/24"])
    r = yield send(st, ["x@gmail.test", "b@local.test"])
    assert r["rcpt"][0][0] == 554 and b"5.7.1 Relay access denied" in r["rcpt"][0][1]
    assert r["rcpt"][1][0] == 250 and r["data"][0] == 250
    assert [q.recipients for q in st.queue.requests] == [["b@local.test"]]
    # authenticated on the submission port: relaying is allowed
    r = yield send(st, ["x@gmail.test"], port="submission", login=True)
    assert r["rcpt"][0][0] == 250 and r["data"][0] == 250
    assert transport_of(st.processor, st.queue.requests[-1]).kind == "mx"


@pytest_twisted.inlineCallbacks
def test_scanner_reject_is_550_at_data(stack: Any) -> None:
    st = stack()
    virus = multipart([("Content-Type: application/octet-stream",
                        "Content-Disposition: attachment; filename=\"x.bin\"", EICAR)])
    r = yield send(st, ["d@proc.test", "b@local.test"], virus)
    assert r["data"] == (550, b"5.7.1 Message rejected: virus detected")
    exe = multipart([("Content-Type: application/zip",
                      "Content-Disposition: attachment; filename=\"a.zip\"",
                      _zip("setup.exe"))])
    r = yield send(st, ["d@proc.test"], exe)
    assert r["data"] == (550, b"5.7.1 Message rejected: blocked attachment type")
    assert st.queue.requests == []


def _zip(name: str) -> bytes:
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, b"MZ")
    return buf.getvalue()


@pytest_twisted.inlineCallbacks
def test_spam_tagged_over_smtp(stack: Any) -> None:
    st = stack()
    spam = (b"From: \"service@bank.example\" <x@evil.test>\r\nSubject: URGENT ACCOUNT NOTICE\r\n"
            b"\r\nYour account has been suspended. Verify your account now.\r\n")
    r = yield send(st, ["d@proc.test"], spam)
    assert r["data"][0] == 250
    body = st.queue.body(st.queue.requests[0])
    assert b"X-Spam-Status: Yes, score=9.0" in body and b"Subject: [SPAM] URGENT" in body


@pytest_twisted.inlineCallbacks
def test_rate_limits_are_451(stack: Any) -> None:
    # 127.0.0.1 is in relay_networks, exempt by default: count it here
    st = stack(rate_limits={"max_messages_per_minute_per_ip": 4}, client_limit_exceptions=[])
    for _ in range(3):
        r = yield send(st, ["d@proc.test"])
        assert r["data"][0] == 250
    r = yield send(st, ["d@proc.test", "b@local.test"])          # the rule's 3/minute is used up
    assert r["rcpt"][0] == (451, b"4.7.1 Rate limit exceeded, try again later")
    assert r["rcpt"][1][0] == 250 and r["data"][0] == 250
    r = yield send(st, ["b@local.test"])                          # 5th message from this IP
    assert r["mail"] == (451, b"4.7.1 Rate limit exceeded, try again later")
    assert st.processor.get_stats()["rejections"]["rate_limit"] == 2


@pytest_twisted.inlineCallbacks
def test_recipient_cap_and_queue_full(stack: Any) -> None:
    st = stack()
    r = yield send(st, ["1@proc.test", "2@proc.test", "3@proc.test"])
    assert [c for c, _ in r["rcpt"]] == [250, 250, 452]
    assert r["rcpt"][2][1] == b"4.5.3 Too many recipients"
    assert st.queue.requests[-1].recipients == ["1@proc.test", "2@proc.test"]
    st.queue.full = True
    r = yield send(st, ["b@local.test"])
    assert r["rcpt"][0] == (452, b"4.3.1 Insufficient system storage")


@pytest_twisted.inlineCallbacks
def test_whole_router_wiring(tmp_path: Any) -> None:
    """make_router builds DomainRouter + processor + server: mail in, relay policy applied."""
    from tests.support.configs import default_config_with_free_ports
    from tests.support.router import options_from, port_of, start_router, stop_router

    data, _ports = default_config_with_free_ports(str(tmp_path))
    email = dict(data["email"], relay_networks=["192.0.2.0/24"])
    router = start_router(options_from({"email": email}, str(tmp_path)))
    try:
        port = port_of(router, "email")
        r = yield deferToThread(converse, port, "me@localhost", ["alice@localhost",
                                                                 "x@elsewhere.test"],
                                simple_message(), False, "")
        assert r["rcpt"][0][0] == 250 and r["rcpt"][1][0] == 554
        assert r["data"][0] == 250
        processor = router.by_name["email"].processor
        assert processor.get_stats()["messages"] == 1
        assert router.by_name["email"].delivery.transports.for_address(
            "alice@localhost").kind == "local"
    finally:
        yield stop_router(router)


@pytest_twisted.inlineCallbacks
def test_every_transformation_over_smtp_dkim_verifies(stack: Any) -> None:
    import dkim

    st = stack(dkim={"domains": ["sender.test"]}, domain_rules=[{
        "pattern": "*@proc.test", "mode": "process",
        "transformations": [
            {"type": "remove_header", "header": "X-Internal"},
            {"type": "add_header", "header": "X-Gateway", "value": "dcrouter"},
            {"type": "rewrite_subject", "prefix": "[EXT]"},
            {"type": "add_footer", "text": "Scanned by dcrouter"},
            {"type": "dkim_sign", "selector": "gw"},
        ]}])
    data = simple_message(subject="Quarterly numbers", extra="X-Internal: secret\r\n")
    r = yield send(st, ["d@proc.test"], data)
    assert r["data"][0] == 250
    body = st.queue.body(st.queue.requests[0])
    assert body.startswith(b"DKIM-Signature: ")
    assert b"X-Internal" not in body and b"X-Gateway: dcrouter" in body
    assert b"Subject: [EXT] Quarterly numbers" in body
    assert b"-- \r\nScanned by dcrouter" in body
    key = st.server.context.dkim_keys.get("sender.test", "gw", create=False)
    assert st.queue.requests[0].dkim is None   # signed once, by the transformation
    record = key.public_record().encode()
    assert dkim.verify(body, dnsfunc=lambda name, timeout=5: record)


@pytest_twisted.inlineCallbacks
def test_per_user_limit_over_submission(stack: Any) -> None:
    st = stack(rate_limits={"max_messages_per_minute_per_user": 1})
    r = yield send(st, ["x@gmail.test"], port="submission", login=True)
    assert r["data"][0] == 250
    r = yield send(st, ["x@gmail.test"], port="submission", login=True)
    assert r["mail"] == (451, b"4.7.1 Rate limit exceeded, try again later")
    r = yield send(st, ["b@local.test"])                   # not logged in: not this user's bucket
    assert r["data"][0] == 250
