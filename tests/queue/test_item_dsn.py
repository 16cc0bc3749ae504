"""The DSN fields of queue items: RET, ENVID, NOTIFY/ORCPT per recipient, the delay mark.

They survive the disk journal across a restart and the Redis store; items
without them (every item of older versions) store nothing extra and load with
none.
"""

from __future__ import annotations

import dataclasses
import json

import pytest_twisted

from dcrouter.config.queue import QueueOptions
from dcrouter.dsn import EnvelopeDsn, RecipientDsn
from dcrouter.queue import UnifiedDeliveryQueue
from dcrouter.queue.item import QueueItem, StoredItem
from tests.queue.helpers import redis_server, request, spool_message

DSN = EnvelopeDsn("HDRS", "env 1", {
    "a@example.com": RecipientDsn("SUCCESS,FAILURE", "rfc822;orig@old.test"),
    "c@example.com": RecipientDsn("NEVER", "utf-8;j\u00f6rg@old.test")})
RCPTS = ["a@example.com", "b@example.com", "c@example.com"]


def _check(item: QueueItem) -> None:
    assert (item.ret, item.envid) == ("HDRS", "env 1")
    assert [(r.address, r.notify, r.orcpt) for r in item.recipients] == [
        ("a@example.com", "SUCCESS,FAILURE", "rfc822;orig@old.test"),
        ("b@example.com", "", ""),
        ("c@example.com", "NEVER", "utf-8;j\u00f6rg@old.test")]


def test_round_trip_and_compact_form(tmp_path):
    req = dataclasses.replace(request(spool_message(str(tmp_path)), RCPTS), dsn=DSN)
    item = QueueItem.from_request(req, "ID1", "ID1")
    item.delay_warned = True
    data = json.loads(item.to_json())
    assert data["ret"] == "HDRS" and data["envid"] == "env 1" and data["dwarn"] is True
    assert data["rcpt"][1] == ["b@example.com", "pending", 0, ""], "no DSN: the old four fields"
    back = QueueItem.from_json(item.to_json())
    _check(back)
    assert back.delay_warned
    lazy = StoredItem("ID1", item.journal_payload()).materialize()
    _check(lazy)
    assert item.to_dict()["recipients"][0]["notify"] == "SUCCESS,FAILURE"
    # without DSN parameters nothing is added to the record
    plain = QueueItem.from_request(request(spool_message(str(tmp_path)), RCPTS), "ID2", "ID2")
    record = json.loads(plain.to_json())
    assert not {"ret", "envid", "dwarn"} & set(record)
    assert all(len(r) == 4 for r in record["rcpt"])
    old = QueueItem.from_json(plain.to_json())
    assert old.ret == old.envid == "" and not old.delay_warned
    assert all(r.notify == r.orcpt == "" for r in old.recipients)


def _queue(tmp_path, **options) -> UnifiedDeliveryQueue:
    queue = UnifiedDeliveryQueue.from_options(
        QueueOptions(persistent_path=str(tmp_path / "queue"), **options), str(tmp_path))
    queue.startService()
    return queue


@pytest_twisted.inlineCallbacks
def test_disk_journal_keeps_them_across_a_restart(tmp_path):
    queue = _queue(tmp_path)
    yield queue.when_ready()
    ids = yield queue.enqueue([dataclasses.replace(
        request(spool_message(str(tmp_path)), RCPTS), dsn=DSN)])
    item = (yield queue.claim(1))[0]
    item.attempts = 1
    item.delay_warned = True
    yield queue.defer_item(item, "451 later", delay=3600)
    yield queue.stopService()
    again = _queue(tmp_path)
    yield again.when_ready()
    back = yield again.get_item(ids[0])
    _check(back)
    assert back.delay_warned and back.status == "deferred"
    yield again.stopService()


@pytest_twisted.inlineCallbacks
def test_redis_store_keeps_them(tmp_path):
    with redis_server() as url:
        queue = _queue(tmp_path, storage_type="redis", redis_url=url)
        yield queue.when_ready()
        ids = yield queue.enqueue([dataclasses.replace(
            request(spool_message(str(tmp_path)), RCPTS), dsn=DSN)])
        item = yield queue.get_item(ids[0])
        _check(item)
        yield queue.stopService()
