"""File modes over a real run: every directory dcrouter creates is 0700, every file 0600.

A router with email (disk queue, local delivery into the default Maildir root and into a
nested root outside state_dir, DKIM signing), DNS (serials) and the API over TLS (its
self-signed certificate) takes mail over SMTP and delivers it; then state_dir and the
Maildir roots are walked.  A ``state_dir/dkim`` left 0755 by an older version is
tightened at start.
"""

from __future__ import annotations

import os
import smtplib
import stat
from typing import Any

import pytest_twisted
from twisted.internet import threads

from dcrouter.config import parse_config
from tests.delivery.harness import wait_for
from tests.support.net import free_port, free_tcp_udp_port
from tests.support.router import start_router, stop_router


def modes(root: str) -> dict[str, int]:
    """``{path relative to root: permission bits}`` of root and everything below it."""
    out = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


@pytest_twisted.ensureDeferred
async def test_every_directory_0700_every_file_0600_after_real_delivery(tmp_path: Any) -> None:
    state = str(tmp_path / "var")
    nested = str(tmp_path / "outside" / "a" / "b" / "maildir")
    # an older version left the key folders 0755 (state_dir itself is the operator's)
    os.mkdir(state, 0o700)
    os.makedirs(os.path.join(state, "dkim", "old.test"))
    for path in (os.path.join(state, "dkim"), os.path.join(state, "dkim", "old.test")):
        os.chmod(path, 0o755)
    smtp = free_port()
    options = parse_config({
        "router": {"state_dir": state},
        "email": {
            "hostname": "mail.modes.test", "listen": "127.0.0.1", "ports": [smtp],
            "submission_ports": [], "implicit_tls_ports": [],
            "dkim": {"domains": ["modes.test"]},
            "domain_rules": [
                {"pattern": "*@local.test", "mode": "mta",
                 "mta_options": {"allow_local_delivery": True}},
                {"pattern": "*@nested.test", "mode": "mta",
                 "mta_options": {"allow_local_delivery": True, "local_delivery_path": nested}},
            ],
            "queue": {"storage_type": "disk", "check_interval": 0.1},
        },
        "dns": {"listen": "127.0.0.1", "port": free_tcp_udp_port(), "rate_limit": 0,
                "publish_email_records": True, "zones": [{"origin": "modes.test"}]},
        "api": {"listen": "127.0.0.1", "port": free_port(), "tls": True},
    })
    router = start_router(options)
    try:
        await router.by_name["email"].processor.signing.wait_ready()
        await router.by_name["dns"].ready

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", smtp, timeout=20) as client:
                for rcpt in ("alice@local.test", "Bob@local.test", "carol@nested.test"):
                    client.sendmail("a@modes.test", [rcpt],
                                    f"From: a@modes.test\r\nTo: {rcpt}\r\nSubject: modes\r\n"
                                    f"\r\nhello\r\n")
        await threads.deferToThread(send)
        boxes = [os.path.join(state, "mail", "alice"), os.path.join(state, "mail", "bob"),
                 os.path.join(nested, "carol")]
        await wait_for(lambda: all(os.path.isdir(os.path.join(b, "new")) and
                                   os.listdir(os.path.join(b, "new")) for b in boxes),
                       timeout=20)
    finally:
        await stop_router(router)
    with open(os.path.join(boxes[0], "new", os.listdir(os.path.join(boxes[0], "new"))[0]),
              "rb") as f:
        stored = f.read()   # signed with the key under dkim/ (below the trace headers)
    assert stored.split(b"\r\n")[2].startswith(b"DKIM-Signature: ")
    found = modes(state)
    for name in ("dkim", "dkim/modes.test", "dkim/old.test", "mail", "mail/alice/new",
                 "queue", "dns", "api/certs"):
        assert name in found, name
    wrong = {path: oct(mode) for path, mode in found.items()
             if mode != (0o700 if os.path.isdir(os.path.join(state, path)) else 0o600)}
    assert wrong == {}
    outside = modes(str(tmp_path / "outside"))
    assert "a/b/maildir/carol/new" in outside
    wrong = {path: oct(mode) for path, mode in outside.items()
             if mode != (0o700 if os.path.isdir(os.path.join(tmp_path, "outside", path))
                         else 0o600)}
    assert wrong == {}
