"""Wire preparation of message data for DATA."""

from __future__ import annotations

from dcrouter.delivery.smtpclient import Job, wire_data


def test_wire_data_crlf_and_dot_stuffing():
    assert wire_data(b".first\n..x\r\nplain\n.") == b"..first\r\n...x\r\nplain\r\n..\r\n"
    assert wire_data(b"a\r\nb\r\n") == b"a\r\nb\r\n"


def test_job_fail_all_once():
    job = Job("id", "s@example.org", ["a@x", "b@x"], b"m")
    seen = []
    job.deferred.addCallback(seen.append)
    job.fail_all(451, "4.3.0 later", permanent=False)
    job.fail_all(550, "5.0.0 no", permanent=True)
    assert seen[0]["a@x"].message == "451 4.3.0 later" and not seen[0]["b@x"].permanent
