"""A real Postfix on both sides of dcrouter (issue 14, "Done means").

One private Postfix instance (``postfix -c DIR start-fg``, Debian package ``postfix``)
serves the whole module:

* as the **sending MTA**: its ``relayhost`` is dcrouter, with STARTTLS required
  (``smtp_tls_security_level = encrypt``); a message injected into Postfix arrives
  in dcrouter's Maildir, with dcrouter's Received header naming the TLS version and
  Postfix's log showing the TLS connection and ``status=sent``;
* as the **next hop**: a dcrouter forward rule points at Postfix's smtpd, and
  Postfix's maillog shows it received the message (smtpd ``client=``, qmgr
  ``from=``) and finished it (``final.test`` goes to Postfix's ``discard``
  transport, so nothing loops back).
"""

from __future__ import annotations

import glob
import os
import smtplib
import time
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from tests.support.net import free_port
from tests.support.postfix import PostfixInstance
from tests.support.router import options_from, port_of, start_router, stop_router


class Peers:
    """The running pair."""

    def __init__(self, postfix: PostfixInstance, router: Any, state: str) -> None:
        self.postfix = postfix
        self.router = router
        self.state = state
        self.dcrouter_port = port_of(router, "email")


@pytest.fixture(scope="module")
def peers(tmp_path_factory: Any) -> Iterator[Peers]:
    state = str(tmp_path_factory.mktemp("postfix-interop"))
    postfix = PostfixInstance(main={
        "smtp_tls_security_level": "encrypt",   # STARTTLS required towards dcrouter
        "smtp_tls_loglevel": "1",
        "transport_maps": "inline:{ final.test=discard: }",
        "relay_domains": "final.test",
    })
    dcrouter_port = free_port()
    email = {
        "hostname": "dcrouter.test", "listen": "127.0.0.1", "ports": [dcrouter_port],
        "submission_ports": [], "implicit_tls_ports": [],
        "domain_rules": [
            {"pattern": "*@inbound.test", "mode": "mta",
             "mta_options": {"allow_local_delivery": True,
                             "local_delivery_path": os.path.join(state, "mail")}},
            {"pattern": "*@final.test", "mode": "forward",
             "target": {"server": "127.0.0.1", "port": postfix.port}},
        ],
        "queue": {"storage_type": "disk"},
    }
    router = start_router(options_from({"router": {"log_level": "warn"}, "email": email},
                                       state))
    postfix.main["relayhost"] = f"[127.0.0.1]:{dcrouter_port}"
    try:
        postfix.start()
    except Exception:
        pytest_twisted.blockon(stop_router(router))
        raise
    yield Peers(postfix, router, state)
    postfix.cleanup()
    pytest_twisted.blockon(stop_router(router))


def _submit(port: int, mail_from: str, rcpt: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(mail_from, [rcpt], f"From: <{mail_from}>\r\nTo: <{rcpt}>\r\n"
                   f"Subject: {subject}\r\n\r\nHello from the interop test.\r\n")


async def _poll(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_postfix_relays_into_dcrouter_over_required_starttls(peers: Peers) -> None:
    subject = f"interop-in-{time.time_ns()}"
    await deferToThread(_submit, peers.postfix.port, "alice@postfix.test", "bob@inbound.test",
                        subject)

    def arrived() -> Any:
        for path in glob.glob(os.path.join(peers.state, "mail", "bob", "new", "*")):
            with open(path, "rb") as f:
                data = f.read()
            if subject.encode() in data:
                return data
        return None
    data = await _poll(arrived)
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    ours = head.split("Received: ")[1]          # the newest Received header is dcrouter's
    assert ours.startswith("from postfix.test ([127.0.0.1])")
    assert "by dcrouter.test (dcrouter)" in ours and "(using TLSv1." in ours
    assert "by postfix.test (Postfix)" in head   # Postfix's own, below ours
    log = peers.postfix.wait_log(r"to=<bob@inbound\.test>, relay=127\.0\.0\.1\[127\.0\.0\.1\]"
                                 rf":{peers.dcrouter_port},.*status=sent")
    assert log
    tls = peers.postfix.wait_log(r"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]"
                                 rf":{peers.dcrouter_port}: TLSv1\.[23]")
    assert tls


@pytest_twisted.ensureDeferred
async def test_dcrouter_forwards_to_postfix_as_next_hop(peers: Peers) -> None:
    subject = f"interop-out-{time.time_ns()}"
    sender = f"carol-{time.time_ns()}@source.test"
    await deferToThread(_submit, peers.dcrouter_port, sender, "dave@final.test", subject)
    # Postfix's smtpd took it from dcrouter, its queue manager queued it, discard finished it
    queued = await deferToThread(peers.postfix.wait_log, rf"from=<{sender}>")
    queue_id = queued[0].split(": from=")[0].rsplit(" ", 1)[1]
    received = peers.postfix.wait_log(rf"postfix/smtpd\[\d+\]: {queue_id}: "
                                      r"client=localhost\[127\.0\.0\.1\]")
    done = peers.postfix.wait_log(rf"{queue_id}: to=<dave@final\.test>, relay=none.*"
                                  r"status=sent")
    assert received and done
    delivery = peers.router.by_name["email"].delivery
    assert delivery.counters["pipelined_transactions"] >= 1, "Postfix offers PIPELINING"
