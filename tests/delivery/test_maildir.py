"""Maildir delivery: files land in new/, and concurrent deliveries share directory fsyncs."""

from __future__ import annotations

import os
import threading

import pytest

from dcrouter.delivery import maildir
from dcrouter.delivery.maildir import DirectorySyncer, deliver
from dcrouter.errors import PermanentDeliveryError


def test_concurrent_deliveries_all_land_and_share_directory_fsyncs(tmp_path, monkeypatch):
    syncer = DirectorySyncer()
    monkeypatch.setattr(maildir, "_directories", syncer)
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:   # a slow disk: renames pile up behind a running fsync
        threading.Event().wait(0.01)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    names = [maildir.new_name() for _ in range(64)]
    paths: list[str] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            paths.append(deliver(str(tmp_path), "alice@localhost", b"message %d\r\n" % i,
                                 names[i]))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sorted(os.listdir(tmp_path / "alice" / "new")) == sorted(names)
    assert os.listdir(tmp_path / "alice" / "tmp") == []
    assert 1 <= syncer.fsyncs < 64          # shared, yet at least one after the renames


def test_a_failed_directory_fsync_covers_nobody(tmp_path, monkeypatch):
    syncer = DirectorySyncer()
    calls = []
    real_fsync = os.fsync

    def flaky(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky)
    with pytest.raises(OSError):
        syncer.sync(str(tmp_path))
    assert syncer.fsyncs == 0
    syncer.sync(str(tmp_path))
    assert syncer.fsyncs == 1


def test_unsafe_local_part_is_refused(tmp_path):
    with pytest.raises(PermanentDeliveryError):
        deliver(str(tmp_path), "../etc@localhost", b"x")


def test_trace_headers_loops_and_utf8_names(tmp_path):
    """Return-Path and Delivered-To in front; a Delivered-To for this recipient (any case,
    folded, any Unicode normalisation) is a loop (5.4.6); UTF-8 local parts get NFC names."""
    import unicodedata
    body = b"Subject: x\r\n\r\nDelivered-To: alice@localhost\r\n"  # in the body: not a loop
    path = deliver(str(tmp_path), "Alice@localhost", body, maildir.new_name(), "a@b.test")
    with open(path, "rb") as f:
        assert f.read() == b"Return-Path: <a@b.test>\r\nDelivered-To: Alice@localhost\r\n" + body
    path = deliver(str(tmp_path), "alice@localhost", body, maildir.new_name(), "")
    with open(path, "rb") as f:
        assert f.read().startswith(b"Return-Path: <>\r\nDelivered-To: alice@localhost\r\n")
    for looping in (b"Delivered-To: ALICE@localhost\r\n", b"delivered-to:\r\n alice@localhost\r\n",
                    b"X: y\r\nDelivered-To:  alice@LOCALHOST  \r\n"):
        with pytest.raises(PermanentDeliveryError, match="554 5.4.6 mail forwarding loop"):
            deliver(str(tmp_path), "alice@localhost", looping + b"\r\nhi\r\n", maildir.new_name())
    nfd = unicodedata.normalize("NFD", "Zoë@localhost")
    with pytest.raises(PermanentDeliveryError, match="5.4.6"):
        deliver(str(tmp_path), nfd, "Delivered-To: zoë@localhost\r\n\r\n".encode(),
                maildir.new_name())
    path = deliver(str(tmp_path), nfd, b"\r\nhi\r\n", maildir.new_name())
    assert os.path.dirname(os.path.dirname(path)) == os.path.join(str(tmp_path), "zoë")
    with pytest.raises(PermanentDeliveryError, match="550 5.1.1"):
        deliver(str(tmp_path), "no/such@localhost", b"x", maildir.new_name())
