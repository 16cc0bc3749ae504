"""Outbound STARTTLS injection (CVE-2011-0411 class, client side), over real sockets.

A next hop answers STARTTLS with ``220 ready`` and a forged ``250 PIPELINING`` in
the same packet.  A client that reads the buffered plaintext line after the
handshake takes it for the reply to its encrypted EHLO: it learns PIPELINING that
the server never offered under TLS and talks ahead of the real reply, so every
later reply is matched to the wrong command.
"""

from __future__ import annotations

import pytest_twisted

from dcrouter.message import Route
from tests.delivery.harness import Stack, wait_for
from tests.delivery.peers import CertAuthority
from tests.delivery.rawpeer import RawNextHop


def _done(stack: Stack, item_id: str, status: str):
    entry = stack.queue.finished.get(item_id)
    return entry[1] if entry and entry[1].status == status else None


@pytest_twisted.ensureDeferred
async def test_plaintext_after_the_220_to_starttls_is_discarded(tmp_path):
    ca = CertAuthority(str(tmp_path))
    peer = RawNextHop(tls=ca.server_context(), ehlo=("8BITMIME",), tls_ehlo=("8BITMIME",),
                      starttls_reply=b"220 2.0.0 ready\r\n250 PIPELINING\r\n",
                      rcpt_replies={"gone@example.com": "550 5.1.1 <gone@example.com>: no"},
                      ehlo_wait=0.5).start()
    stack = Stack(str(tmp_path))
    try:
        ids = await stack.send(Route(kind="forward", server=peer.host, port=peer.port),
                               ["ok@example.com", "gone@example.com"], mail_from="")
        item = await wait_for(lambda: _done(stack, ids[0], "failed"))
        # the client waited for the real (encrypted) EHLO reply before saying anything
        assert peer.spoke_early == [], f"the client talked ahead: {peer.spoke_early!r}"
        assert peer.commands[:4] == ["EHLO", "STARTTLS", "EHLO", "MAIL"]
        # and, not pipelining (the TLS EHLO did not offer it), every reply matched its command
        assert stack.delivery.counters["pipelined_transactions"] == 0
        states = {r.address: (r.status, r.code) for r in item.recipients}
        assert states == {"ok@example.com": ("delivered", 250),
                          "gone@example.com": ("failed", 550)}
        assert len(peer.data) == 1
        assert stack.delivery.counters["starttls_injections"] == 1
    finally:
        await stack.stop()
        peer.stop()


@pytest_twisted.ensureDeferred
async def test_a_clean_starttls_counts_no_injection(tmp_path):
    ca = CertAuthority(str(tmp_path))
    peer = RawNextHop(tls=ca.server_context(), tls_ehlo=("8BITMIME", "PIPELINING")).start()
    stack = Stack(str(tmp_path))
    try:
        ids = await stack.send(Route(kind="forward", server=peer.host, port=peer.port),
                               ["ok@example.com"])
        await wait_for(lambda: _done(stack, ids[0], "delivered"))
        assert stack.delivery.counters["starttls_injections"] == 0
        assert stack.delivery.counters["pipelined_transactions"] == 1, "PIPELINING under TLS used"
    finally:
        await stack.stop()
        peer.stop()
