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
