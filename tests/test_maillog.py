"""The mail log's summary lines, from a real twistd delivering to a Maildir and an SMTP sink."""

from __future__ import annotations

import json
import smtplib

from dcrouter.maillog import dsn_of, relay_of
from tests.delivery.peers import Sink
from tests.support.configs import default_config_with_free_ports, write_config
from tests.support.net import free_port, wait_for_tcp
from tests.support.proc import TwistdProcess, wait_until


def _summaries(proc: TwistdProcess) -> list[dict]:
    out = []
    for line in proc.output().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "mail.summary":
                out.append(event)
    return out


def test_one_line_per_recipient_sent_deferred_and_bounced(tmp_path):
    sink = Sink().start()
    sink.handler.rcpt_replies["<nobody@sink.test>"] = "550 5.1.1 <nobody@sink.test>: no such user"
    sink.handler.rcpt_replies["nobody@sink.test"] = "550 5.1.1 <nobody@sink.test>: no such user"
    closed = free_port()
    data, ports = default_config_with_free_ports(str(tmp_path / "var"))
    data["router"]["log_format"] = "json"
    data["email"]["queue"]["base_retry_delay"] = 3600
    data["email"]["domain_rules"] += [
        {"pattern": "*@sink.test", "mode": "forward",
         "target": {"server": "127.0.0.1", "port": sink.port}},
        {"pattern": "*@down.test", "mode": "forward",
         "target": {"server": "127.0.0.1", "port": closed}}]
    write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config="dcrouter.toml")
    try:
        wait_for_tcp(ports["smtp"], timeout=30)
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as smtp:
            for rcpts in (["alice@localhost"], ["bob@sink.test", "nobody@sink.test"],
                          ["carol@down.test"]):
                smtp.sendmail("sender@localhost", rcpts, b"Subject: s\r\n\r\nbody\r\n")
        wait_until(lambda: {e["recipient"] for e in _summaries(proc)} >=
                   {"alice@localhost", "bob@sink.test", "nobody@sink.test", "carol@down.test"},
                   timeout=30)
        by = {e["recipient"]: e for e in _summaries(proc)}
        alice = by["alice@localhost"]
        assert (alice["relay"], alice["dsn"], alice["status"], alice["tries"]) == \
            ("local", "2.0.0", "sent", 1)
        assert alice["message"] == (f"{alice['queue_id']}: to=<alice@localhost>, relay=local, "
                                    f"delay={alice['delay']:.3g}, tries=1, dsn=2.0.0, "
                                    f"status=sent ({alice['reply']})")
        assert by["bob@sink.test"]["status"] == "sent"
        assert by["bob@sink.test"]["relay"] == f"127.0.0.1:{sink.port}"
        assert by["bob@sink.test"]["reply"].startswith("250")
        nobody = by["nobody@sink.test"]
        assert (nobody["status"], nobody["dsn"]) == ("bounced", "5.1.1"), nobody
        assert "no such user" in nobody["reply"]
        carol = by["carol@down.test"]
        assert carol["status"] == "deferred" and carol["dsn"].startswith("4."), carol
        assert carol["sender"] == "sender@localhost"
        # each recipient once per attempt, nothing for the bounce's own delivery to sender@
        assert sorted(e["recipient"] for e in _summaries(proc)
                      if e["recipient"] != "sender@localhost") == \
            ["alice@localhost", "bob@sink.test", "carol@down.test", "nobody@sink.test"]
    finally:
        status = proc.stop()
        sink.stop()
    assert status == 0, proc.output()


def test_dsn_and_relay_fields():
    assert dsn_of(250, "250 2.6.0 Ok: queued as X") == "2.6.0"
    assert dsn_of(451, "451 try later") == "4.0.0"
    assert dsn_of(-1, "connection refused") == "4.0.0"
    assert dsn_of(550, "550-5.7.1 blocked") == "5.7.1"
    assert relay_of("10.0.0.7:2525", "a@b") == "10.0.0.7:2525"
    assert relay_of("example.net", "a@Example.NET") == "mx(example.net)"
    assert relay_of("", "a@Example.NET") == "mx(example.net)"
    assert relay_of("local", "a@b") == "local"
