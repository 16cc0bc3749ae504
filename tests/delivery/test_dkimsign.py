"""Delivery-time DKIM signing: what the queue item names is signed, what cannot be signed goes
out unsigned at the first attempt (never retried, never bounced), and the item's signing
field survives the queue's JSON - old queue files without it still load."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from dcrouter.delivery.dkimsign import signed
from dcrouter.dkimkeys import DkimKeyStore
from dcrouter.message import RULE_DESTINATION, DeliveryRequest, DkimSigning
from dcrouter.queue.item import QueueItem
from tests.delivery.harness import Stack
from tests.delivery.peers import Sink
from tests.delivery.test_system import finished, forward


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


@pytest_twisted.ensureDeferred
async def test_unsignable_items_are_delivered_unsigned_at_the_first_attempt(tmp_path, sink):
    stack = Stack(str(tmp_path))
    try:
        stack.dkim_keys.get("example.org", "sel1", create=True)
        no_from = b"To: <a@example.com>\r\nSubject: no author\r\n\r\nHello.\r\n"
        first = await stack.send(forward(sink), ["a@example.com"], no_from,
                                 dkim=DkimSigning("example.org", "sel1"))
        # a key that is not (or no longer) in the store: unsigned, and none is created
        second = await stack.send(forward(sink), ["b@example.com"],
                                  dkim=DkimSigning("gone.example", "old"))
        for item_id in (first[0], second[0]):
            item = await finished(stack, item_id, "delivered")
            assert item.attempts == 1
        assert len(sink.messages) == 2
        assert all(b"DKIM-Signature" not in m.content for m in sink.messages)
        assert stack.delivery.counters["dkim_unsigned"] == 2
        assert stack.delivery.counters["failed"] == 0 and stack.delivery.counters["bounces"] == 0
        assert stack.dkim_keys.get("gone.example", "old") is None
    finally:
        await stack.stop()


def test_signed_never_raises_and_never_creates(tmp_path) -> None:  # type: ignore
    store = DkimKeyStore(str(tmp_path))
    data = b"From: a@example.org\r\n\r\nbody\r\n"
    assert signed(store, None, data) == (data, False)
    assert signed(store, DkimSigning("example.org", "s"), data) == (data, False)
    assert signed(store, DkimSigning("../etc", "s"), data) == (data, False)
    assert not (tmp_path / "dkim").exists()
    store.get("example.org", "s", create=True)
    out, ok = signed(store, DkimSigning("example.org", "s"), data)
    assert ok and out.startswith(b"DKIM-Signature: ") and out.endswith(data)


def test_queue_item_keeps_the_signing_decision_and_old_items_load() -> None:
    request = DeliveryRequest(queue_id="Q1", mode="mta", rule_pattern="*@a.test",
                              mail_from="a@a.test", recipients=["b@b.test"],
                              via=RULE_DESTINATION, body_path="/x", correlation_id="c",
                              dkim=DkimSigning("a.test", "s1"))
    item = QueueItem.from_request(request, "Q1", "ref")
    again = QueueItem.from_json(item.to_json())
    assert again.dkim == DkimSigning("a.test", "s1")
    assert item.to_dict()["dkim"] == {"domain": "a.test", "selector": "s1"}
    # an item stored by an earlier version (format 1): no "dkim" key, a frozen route
    # with the old dkim_* fields chosen from the envelope - ignored, the item is unsigned
    old = json.loads(item.to_json())
    del old["dkim"]
    old["v"] = 1
    old["route"] = {"kind": "mx", "dkim_domain": "forged.test", "dkim_selector": "dcrouter",
                    "dkim_key_path": "/var/dkim/forged.test/dcrouter.key"}
    loaded = QueueItem.from_json(json.dumps(old).encode())
    assert loaded.dkim is None and loaded.via.kind == "rule"
    unsigned = QueueItem.from_request(
        DeliveryRequest(queue_id="Q2", mode="mta", rule_pattern="", mail_from="",
                        recipients=["b@b.test"], via=RULE_DESTINATION, body_path="/x",
                        correlation_id="c"), "Q2", "ref")
    assert b'"dkim"' not in unsigned.to_json()
    assert QueueItem.from_json(unsigned.to_json()).dkim is None
