"""Process lifecycle over real sockets: SIGTERM lets an open SMTP transaction finish."""

from __future__ import annotations

import glob
import os
import signal
import smtplib
import socket

from tests.support.configs import default_config_with_free_ports, write_config
from tests.support.net import wait_for_tcp
from tests.support.proc import TwistdProcess, wait_until


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except OSError:
        return True


def test_sigterm_finishes_open_transaction_then_exits_zero(tmp_path):
    state = tmp_path / "var"
    data, ports = default_config_with_free_ports(str(state))
    data["router"]["shutdown_timeout"] = 20
    write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config="dcrouter.toml")
    try:
        wait_for_tcp(ports["smtp"], timeout=30)
        smtp = smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=20)
        smtp.ehlo("client.test")
        assert smtp.mail("me@localhost")[0] == 250
        assert smtp.rcpt("carol@localhost")[0] == 250
        smtp.putcmd("DATA")
        assert smtp.getreply()[0] == 354
        smtp.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        proc.signal(signal.SIGTERM)
        wait_until(lambda: _refused(ports["smtp"]), timeout=10)   # stopped accepting
        assert proc.proc.poll() is None                            # but still running
        smtp.send(b"second half\r\n.\r\n")
        code, reply = smtp.getreply()
        assert code == 250 and b"queued as" in reply
        smtp.quit()
        assert proc.wait(30) == 0, proc.output()
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    # the acknowledged message is delivered (during the drain, or by the next start)
    maildir = str(state / "mail" / "carol" / "new")
    if not glob.glob(os.path.join(maildir, "*")):
        proc = TwistdProcess(str(tmp_path), config="dcrouter.toml")
        try:
            wait_until(lambda: bool(glob.glob(os.path.join(maildir, "*"))), timeout=30)
        finally:
            proc.stop()
    (path,) = glob.glob(os.path.join(maildir, "*"))
    with open(path, "rb") as f:
        body = f.read()
    assert b"first half\r\nsecond half" in body.replace(b"\n", b"\r\n").replace(b"\r\r", b"\r")
    assert "Traceback" not in proc.output()
