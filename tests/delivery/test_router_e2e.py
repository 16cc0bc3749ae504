"""Queue and delivery inside the real router (twistd): bounces routed by the rules, suppression at RCPT,
Maildir delivery of an mta rule."""

from __future__ import annotations

import email
import email.policy
import os
import smtplib

import pytest

from tests.delivery.peers import Sink
from tests.support.configs import write_config
from tests.support.net import free_port, wait_for_tcp
from tests.support.proc import TwistdProcess, wait_until


@pytest.fixture
def sinks():
    a, b = Sink().start(), Sink().start()
    yield a, b
    a.stop()
    b.stop()


def test_bounce_suppression_and_maildir_through_the_router(tmp_path, sinks):
    rejecting, sender_side = sinks
    rejecting.handler.rcpt_replies["gone@example.com"] = "550 5.1.1 <gone@example.com>: no such user"
    smtp_port = free_port()
    state = str(tmp_path / "var")
    config = write_config(str(tmp_path / "dcrouter.toml"), {
        "router": {"state_dir": state},
        "email": {
            "hostname": "gw.test", "listen": "127.0.0.1", "ports": [smtp_port],
            "submission_ports": [], "implicit_tls_ports": [], "relay_networks": ["127.0.0.0/8"],
            "domain_rules": [
                {"pattern": "*@example.com", "mode": "forward",
                 "target": {"server": "127.0.0.1", "port": rejecting.port}},
                {"pattern": "*@sender.test", "mode": "forward",
                 "target": {"server": "127.0.0.1", "port": sender_side.port}},
                {"pattern": "*@local.test", "mode": "mta",
                 "mta_options": {"allow_local_delivery": True,
                                 "local_delivery_path": str(tmp_path / "mail")}},
            ],
            "queue": {"base_retry_delay": 0.2, "max_retry_delay": 1.0, "check_interval": 0.1},
        },
    })
    proc = TwistdProcess(str(tmp_path), config=config)
    try:
        wait_for_tcp(smtp_port, timeout=30)
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            refused = client.sendmail("author@sender.test", ["ok@example.com", "gone@example.com"],
                                      "Subject: hi\r\nMessage-ID: <m1@sender.test>\r\n\r\nhello\r\n")
            assert refused == {}
            client.sendmail("author@sender.test", ["Box@local.test"],
                            "Subject: local\r\n\r\nfor the maildir\r\n")
        wait_until(lambda: rejecting.messages and sender_side.messages, timeout=20)
        assert rejecting.messages[0].rcpt_tos == ["ok@example.com"]
        dsn = sender_side.messages[0]
        assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == ["author@sender.test"]
        report = email.message_from_bytes(dsn.content, policy=email.policy.default)
        assert report.get_content_type() == "multipart/report"
        assert b"Status: 5.1.1" in dsn.content and b"m1@sender.test" in dsn.content
        # the hard bounce is now refused at RCPT, before any queueing
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
                client.sendmail("author@sender.test", ["gone@example.com"], "Subject: again\r\n\r\nx\r\n")
        code, _ = info.value.recipients["gone@example.com"]
        assert 500 <= code < 600
        box = tmp_path / "mail" / "box" / "new"
        wait_until(lambda: box.is_dir() and os.listdir(box), timeout=20)
        with open(box / os.listdir(box)[0], "rb") as f:
            assert b"for the maildir" in f.read()
        assert os.path.exists(os.path.join(state, "suppression.json"))
    finally:
        try:
            assert proc.stop() == 0, proc.output()[-2000:]
        finally:
            proc.kill()
