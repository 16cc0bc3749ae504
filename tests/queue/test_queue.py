"""UnifiedDeliveryQueue with the memory and disk stores: enqueue, claim, outcomes, operator actions."""

from __future__ import annotations

import os
import stat

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from dcrouter.config.queue import QueueOptions
from dcrouter.errors import QueueError, QueueFullError
from dcrouter.message import Route
from dcrouter.queue import UnifiedDeliveryQueue
from dcrouter.queue.disk import DiskStore
from dcrouter.queue.memory import MemoryStore
from tests.delivery.harness import wait_for
from tests.queue.helpers import request, spool_message


def make_queue(tmp_path, kind: str = "disk", **opts) -> UnifiedDeliveryQueue:
    options = QueueOptions(storage_type=kind, persistent_path=str(tmp_path / "queue"), **opts)
    queue = UnifiedDeliveryQueue.from_options(options, str(tmp_path))
    queue.startService()
    return queue


@pytest.mark.parametrize("kind", ["memory", "disk"])
@pytest_twisted.inlineCallbacks
def test_enqueue_claim_complete(tmp_path, kind):
    queue = make_queue(tmp_path, kind)
    yield queue.when_ready()
    path = spool_message(str(tmp_path), b"Subject: x\r\n\r\nbody\r\n")
    ids = yield queue.enqueue([request(path, ["a@example.com", "b@example.com"])])
    assert len(ids) == 1
    assert not os.path.exists(path), "the queue takes the spool file over"
    item = yield queue.get_item(ids[0])
    assert item.status == "pending" and [r.address for r in item.recipients] == [
        "a@example.com", "b@example.com"]
    assert queue.get_stats()["by_status"]["pending"] == 1
    claimed = yield queue.claim(10)
    assert [i.id for i in claimed] == ids and claimed[0].status == "processing"
    assert (yield queue.claim(10)) == []
    body = yield queue.read_body(claimed[0])
    assert body == b"Subject: x\r\n\r\nbody\r\n"
    for r in claimed[0].recipients:
        r.status = "delivered"
    yield queue.complete(claimed[0])
    assert queue.get_stats()["size"] == 0
    finished = yield queue.get_item(ids[0])
    assert finished.status == "delivered"
    page, _ = yield queue.list_items(status="delivered")
    assert [i.id for i in page] == ids
    yield queue.stopService()


@pytest_twisted.inlineCallbacks
def test_mx_requests_split_per_domain_and_share_one_body(tmp_path):
    queue = make_queue(tmp_path)
    yield queue.when_ready()
    path = spool_message(str(tmp_path))
    req = request(path, ["a@one.test", "b@two.test", "c@one.test"], route=Route(kind="mx"))
    req2 = request(path, ["d@example.com"])
    ids = yield queue.enqueue([req, req2])
    assert len(ids) == 3
    items = []
    for i in ids:
        items.append((yield queue.get_item(i)))
    assert sorted(i.destination for i in items) == ["127.0.0.1:2525", "one.test", "two.test"]
    assert len({i.body_ref for i in items}) == 1
    store = queue.store
    bodies = [f for _, _, files in os.walk(store.bodies_dir) for f in files]
    assert len(bodies) == 1
    # the body stays until the last item is gone
    for item in items[:2]:
        item.status = "processing"
        for r in item.recipients:
            r.status = "delivered"
        yield queue.complete(item)
    assert os.path.exists(store.body_file(items[2].body_ref))
    for r in items[2].recipients:
        r.status = "delivered"
    yield queue.complete(items[2])
    yield store.committer.cleanup_done()  # bodies go after their removal is durable
    assert not os.path.exists(store.body_file(items[2].body_ref))
    yield queue.stopService()


@pytest_twisted.inlineCallbacks
def test_disk_files_private_and_recovered_after_crash(tmp_path):
    queue = make_queue(tmp_path)
    yield queue.when_ready()
    ids = []
    for n in range(5):
        ids += yield queue.enqueue([request(spool_message(str(tmp_path), b"m%d\r\n" % n))])
    claimed = yield queue.claim(2)
    assert len(claimed) == 2
    deferred = (yield queue.claim(1))[0]
    deferred.attempts = 1
    yield queue.defer_item(deferred, "451 try later", delay=3600)
    root = str(tmp_path / "queue")
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    journal = queue.store.journal._path(queue.store.journal.segment)
    assert stat.S_IMODE(os.stat(journal).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(queue.store.body_file(ids[0])).st_mode) == 0o600
    # "crash": drop the lock without any shutdown work; damage one record, tear the tail
    queue.store.lock.release()
    victim = [i for i in ids if i != deferred.id][0]
    with open(journal, "rb") as f:
        data = f.read()
    start = data.index(b" P " + victim.encode())
    flipped = b"Y" if data[start + 20:start + 21] == b"X" else b"X"   # always a change
    data = data[:start + 20] + flipped + data[start + 21:]
    with open(journal, "wb") as f:
        f.write(data + b"0badc0de P torn-off-rec")
    queue2 = make_queue(tmp_path)
    yield queue2.when_ready()
    stats = queue2.get_stats()
    assert stats["size"] == 4
    assert stats["by_status"]["pending"] == 3, "processing items went back to pending"
    assert stats["by_status"]["deferred"] == 1
    back = yield queue2.get_item(deferred.id)
    assert back.last_error == "451 try later" and back.attempts == 1
    # the damaged record's body has no item any more: kept beside it in corrupt/
    yield queue2.store.swept
    yield queue2.store.committer.cleanup_done()
    assert sorted(n.endswith(".eml") for n in os.listdir(os.path.join(root, "corrupt"))) == [
        False, False, True]
    assert os.path.exists(os.path.join(root, "corrupt", os.path.basename(
        queue2.store.body_file(victim))))
    due = yield queue2.claim(10)
    assert {i.id for i in due} == set(ids) - {deferred.id, victim}
    body = yield queue2.read_body(due[0])
    assert body.startswith(b"m")
    yield queue2.stopService()
    # the torn tail was cut off: a third start only meets the damaged record again
    queue3 = make_queue(tmp_path)
    yield queue3.when_ready()
    assert queue3.store.corrupt == 1 and queue3.get_stats()["size"] == 4
    yield queue3.stopService()


@pytest_twisted.inlineCallbacks
def test_journal_compaction_keeps_live_items(tmp_path):
    queue = make_queue(tmp_path)
    yield queue.when_ready()
    ids = []
    for n in range(30):
        ids += yield queue.enqueue([request(spool_message(str(tmp_path), b"c%d\r\n" % n))])
    items = yield queue.claim(30)
    for item in items[:25]:
        for r in item.recipients:
            r.status = "delivered"
        yield queue.complete(item)
    store = queue.store
    journal_dir = store.journal.directory
    before = {name: open(os.path.join(journal_dir, name), "rb").read()
              for name in os.listdir(journal_dir)}
    yield threads.deferToThread(store.journal.compact)
    assert store.journal.records == 5
    assert [n for n in os.listdir(journal_dir) if n.endswith(".snap")]
    yield queue.stopService()
    queue2 = make_queue(tmp_path)
    yield queue2.when_ready()
    assert sorted(i.id for i in queue2.store.items.values()) == sorted(i.id for i in items[25:])
    yield queue2.stopService()
    # a crash after the snapshot but before the old segments were deleted: they come back,
    # and the delivered items must not rise from them
    for name, data in before.items():
        with open(os.path.join(journal_dir, name), "wb") as f:
            f.write(data)
    queue3 = make_queue(tmp_path)
    yield queue3.when_ready()
    assert sorted(queue3.store.items) == sorted(i.id for i in items[25:])
    assert not [n for n in os.listdir(journal_dir) if n in before], "covered segments removed"
    yield queue3.stopService()


@pytest_twisted.inlineCallbacks
def test_compaction_runs_in_the_background_while_commits_go_on(tmp_path):
    queue = make_queue(tmp_path)
    yield queue.when_ready()
    queue.store.committer.compact_slack = 20
    kept = []
    for n in range(60):
        ids = yield queue.enqueue([request(spool_message(str(tmp_path), b"b%d\r\n" % n))])
        item = (yield queue.claim(1))[0]
        if n % 3 == 0:
            kept.append(item.id)
            item.attempts = 1
            yield queue.defer_item(item, "451 later", delay=3600)
        else:
            for r in item.recipients:
                r.status = "delivered"
            yield queue.complete(item)
    yield wait_for(lambda: not queue.store.committer.compacting)
    assert queue.store.committer.compactions >= 1
    yield queue.stopService()
    queue2 = make_queue(tmp_path)
    yield queue2.when_ready()
    assert sorted(queue2.store.items) == sorted(kept)
    assert queue2.store.journal.records < 60
    yield queue2.stopService()


@pytest_twisted.inlineCallbacks
def test_second_process_on_same_directory_is_refused(tmp_path):
    queue = make_queue(tmp_path)
    yield queue.when_ready()
    other = DiskStore(str(tmp_path / "queue"))
    with pytest.raises(QueueError, match="in use by another dcrouter process"):
        other.lock.acquire()
    second = UnifiedDeliveryQueue.from_options(QueueOptions(
        persistent_path=str(tmp_path / "queue")), str(tmp_path))
    with pytest.raises(QueueError, match=r"pid \d+"):
        second.startService()
    assert not second.running
    yield queue.stopService()
    other.lock.acquire()
    other.lock.release()


@pytest_twisted.inlineCallbacks
def test_capacity_limits(tmp_path):
    queue = make_queue(tmp_path, "memory", max_queue_size=3, max_per_destination=2)
    yield queue.when_ready()
    for _ in range(2):
        yield queue.enqueue([request(spool_message(str(tmp_path)))])
    with pytest.raises(QueueFullError):
        queue.check_capacity(["127.0.0.1:2525"])
    queue.check_capacity(["other.test"])
    yield queue.enqueue([request(spool_message(str(tmp_path)), route=Route(kind="mx"),
                                 recipients=["x@other.test"])])
    with pytest.raises(QueueFullError):
        queue.check_capacity(["third.test"])


@pytest_twisted.inlineCallbacks
def test_operator_actions(tmp_path):
    queue = make_queue(tmp_path)
    yield queue.when_ready()
    ids = []
    for _ in range(5):
        ids += yield queue.enqueue([request(spool_message(str(tmp_path)))])
    page, cursor = yield queue.list_items(limit=2)
    assert [i.id for i in page] == sorted(ids)[:2] and cursor == sorted(ids)[1]
    page2, _ = yield queue.list_items(limit=2, cursor=cursor)
    assert [i.id for i in page2] == sorted(ids)[2:4]
    queue.pause()
    assert (yield queue.claim(10)) == []
    queue.resume()
    items = yield queue.claim(10)
    for item in items:
        item.attempts = 1
        yield queue.defer_item(item, "451 later", delay=3600)
    assert (yield queue.claim(10)) == []
    assert (yield queue.retry_now(ids[0])) is True
    assert [i.id for i in (yield queue.claim(10))] == [ids[0]]
    assert (yield queue.flush()) == 4
    assert (yield queue.delete(ids[1])) is True
    assert (yield queue.delete("nope")) is False
    assert sorted(i.id for i in (yield queue.claim(10))) == sorted(ids[2:])
    with pytest.raises(QueueError):
        yield queue.list_items(status="bogus")
    yield queue.stopService()


def test_retry_delay_doubles_with_jitter_and_cap(tmp_path):
    queue = UnifiedDeliveryQueue(QueueOptions(storage_type="memory", base_retry_delay=10,
                                              max_retry_delay=60), str(tmp_path),
                                 store=MemoryStore())
    assert 9 <= queue.retry_delay(1) <= 11
    assert 18 <= queue.retry_delay(2) <= 22
    assert 54 <= queue.retry_delay(10) <= 66


@pytest_twisted.inlineCallbacks
def test_group_commit_shares_fsyncs(tmp_path):
    queue = make_queue(tmp_path)
    yield queue.when_ready()
    before = queue.store.committer.batches
    ds = [queue.enqueue([request(spool_message(str(tmp_path)))]) for _ in range(50)]
    from twisted.internet import defer
    yield defer.gatherResults(ds)
    batches = queue.store.committer.batches - before
    assert batches < 50, f"50 concurrent enqueues took {batches} commit batches"
    assert queue.get_stats()["size"] == 50
    yield queue.stopService()


@pytest_twisted.inlineCallbacks
def test_recovered_item_with_damaged_json_goes_to_corrupt(tmp_path):
    from dcrouter.queue.disk import encode_put
    queue = make_queue(tmp_path)
    yield queue.when_ready()
    ids = []
    for n in range(3):
        ids += yield queue.enqueue([request(spool_message(str(tmp_path), b"d%d\r\n" % n))])
    victim = yield queue.get_item(ids[1])
    payload = victim.journal_payload()
    yield queue.stopService()
    journal = queue.store.journal._path(queue.store.journal.segment)
    with open(journal, "ab") as f:  # a later record with a sound checksum but broken JSON
        f.write(encode_put(victim.id, payload[:payload.index(b"{")] + b'{"v": 1, "id"'))
    queue2 = make_queue(tmp_path)
    yield queue2.when_ready()
    assert queue2.get_stats()["size"] == 3, "the index is rebuilt from the record headers"
    due = yield queue2.claim(10)
    assert sorted(i.id for i in due) == sorted([ids[0], ids[2]])
    assert os.path.exists(os.path.join(str(tmp_path / "queue"), "corrupt",
                                       f"item-{victim.id}.bad"))
    assert queue2.get_stats()["size"] == 2
    yield queue2.stopService()
    queue3 = make_queue(tmp_path)
    yield queue3.when_ready()
    assert victim.id not in queue3.store.items, "its removal was journaled"
    yield queue3.stopService()


def test_enqueue_fails_cleanly_when_the_store_never_opens(tmp_path):
    from twisted.internet import defer, task

    from dcrouter.queue import queue as queue_module

    class NeverOpens(MemoryStore):
        def open(self):
            return defer.Deferred()
    clock = task.Clock()
    queue = UnifiedDeliveryQueue(QueueOptions(storage_type="memory"), str(tmp_path),
                                 store=NeverOpens(), reactor=clock)
    queue.startService()
    d = queue.enqueue([request(spool_message(str(tmp_path)))])
    failures = []
    d.addErrback(failures.append)
    clock.advance(queue_module.READY_TIMEOUT + 1)
    assert failures and failures[0].check(QueueError)
    assert "not ready" in str(failures[0].value)


@pytest_twisted.inlineCallbacks
def test_a_bad_request_fails_alone_in_its_group_commit(tmp_path):
    from twisted.internet import defer
    queue = make_queue(tmp_path)
    yield queue.when_ready()
    good = [queue.enqueue([request(spool_message(str(tmp_path)))]) for _ in range(5)]
    gone = request(spool_message(str(tmp_path)))
    os.unlink(gone.body_path)
    bad = queue.enqueue([gone])
    good += [queue.enqueue([request(spool_message(str(tmp_path)))]) for _ in range(5)]
    ids = yield defer.gatherResults(good)
    with pytest.raises(QueueError, match="cannot take over"):
        yield bad
    assert queue.get_stats()["size"] == 10
    yield queue.stopService()
    queue2 = make_queue(tmp_path)
    yield queue2.when_ready()
    assert sorted(queue2.store.items) == sorted(i for group in ids for i in group)
    yield queue2.stopService()


@pytest_twisted.inlineCallbacks
def test_orphaned_bodies_removed_at_start(tmp_path):
    """Bodies left without an item by a crash (no 250 was given for them) are deleted."""
    queue = make_queue(tmp_path)
    yield queue.when_ready()
    ids = []
    for n in range(3):
        ids += yield queue.enqueue([request(spool_message(str(tmp_path), b"live%d\r\n" % n))])
    yield queue.stopService()
    store = queue.store
    orphans = [store.body_file(ref) for ref in ("orphan0", "orphanZ", "01JORPHANK")]
    for path in orphans:
        with open(path, "wb") as f:
            f.write(b"never acknowledged\r\n")
    queue2 = make_queue(tmp_path)
    yield queue2.when_ready()
    removed = yield queue2.store.swept
    yield queue2.store.committer.cleanup_done()
    assert removed == 3 and not any(os.path.exists(p) for p in orphans)
    assert queue2.get_stats()["orphaned_bodies_removed"] == 3
    claimed = yield queue2.claim(10)
    assert sorted(i.id for i in claimed) == sorted(ids)
    bodies = yield defer.gatherResults([queue2.read_body(i) for i in claimed])
    assert sorted(bodies) == [b"live0\r\n", b"live1\r\n", b"live2\r\n"]
    yield queue2.stopService()
