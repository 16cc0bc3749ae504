"""The scan worker pool with real worker processes: reports, timeouts that stop the CPU, kills.

A timed-out scan must stop using CPU: either the worker notices its deadline
between chunks (and sits idle, its CPU time no longer growing), or it is
stuck and is killed (its PID gone); cancelling a scan kills its worker too.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from dcrouter.email.scanning.limits import Limits
from dcrouter.email.scanning.pool import KILL_GRACE, ScanPool
from dcrouter.email.scanning.types import ScannerError
from tests.email.zipcraft import mime_attachment, ratio_bomb, zip_of

UNLIMITED = Limits(max_scan_size=0, max_file_size=0, max_files=0, max_ratio=0)


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie) and still a child of this process (PIDs get reused)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z" and int(fields[1]) == os.getpid()


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


@pytest.fixture
def pool() -> Any:
    p = ScanPool(reactor, size=1)
    yield p
    pytest_twisted.blockon(p.close())


@pytest.fixture(scope="module")
def bomb_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A message whose unlimited scan inflates 3 GiB (several seconds of CPU)."""
    path = str(tmp_path_factory.mktemp("bomb") / "bomb.eml")
    with open(path, "wb") as f:
        f.write(mime_attachment(ratio_bomb(3 << 30, with_crc=False)))
    return path


@defer.inlineCallbacks
def busy(pool: ScanPool) -> Any:
    """Wait until a worker runs the job; its PID."""
    for _ in range(200):
        if pool.get_stats()["busy"]:
            break
        yield sleep(0.02)
    yield sleep(0.2)   # well into the bomb
    (pid,) = pool.worker_pids()
    return pid


def write(tmp_path: Any, data: bytes) -> str:
    path = os.path.join(str(tmp_path), "m.eml")
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest_twisted.inlineCallbacks
def test_report_from_a_worker(pool: ScanPool, tmp_path: Any) -> None:
    path = write(tmp_path, mime_attachment(zip_of(("a/setup.exe", b"MZ"))))
    report = yield pool.analyse(path, ["names", "archives"], Limits(), 10)
    assert ["archive.zip/a/setup.exe", "a/setup.exe", True] in report["names"]
    (pid,) = pool.worker_pids()
    assert pid != os.getpid() and alive(pid)
    again = yield pool.analyse(path, ["names"], Limits(), 10)
    assert pool.worker_pids() == [pid]     # the worker is reused
    assert again["verdict"] is None


@pytest_twisted.inlineCallbacks
def test_deadline_stops_the_work_and_the_worker_idles(pool: ScanPool, bomb_file: str,
                                                       tmp_path: Any) -> None:
    yield pool.analyse(write(tmp_path, b"Subject: warm\r\n\r\nup\r\n"), ["spam"], Limits(), 30)
    with pytest.raises(ScannerError, match="timed out after 0.5s"):
        yield pool.analyse(bomb_file, ["eicar"], UNLIMITED, 0.5)
    (pid,) = pool.worker_pids()
    before = cpu_ticks(pid)
    yield sleep(0.5)
    assert cpu_ticks(pid) - before <= 2, "the timed-out scan is still burning CPU"
    assert pool.get_stats()["timeouts"] == 1 and pool.get_stats()["killed"] == 0


@pytest_twisted.inlineCallbacks
def test_a_stuck_worker_is_killed(pool: ScanPool, tmp_path: Any) -> None:
    path = write(tmp_path, mime_attachment(zip_of(("x.txt", b"x"))))
    yield pool.analyse(path, ["names"], Limits(), 10)
    (pid,) = pool.worker_pids()
    os.kill(pid, signal.SIGSTOP)      # a worker that will never answer
    started = reactor.seconds()
    with pytest.raises(ScannerError, match="timed out after 0.3s"):
        yield pool.analyse(path, ["names"], Limits(), 0.3)
    assert reactor.seconds() - started < 0.3 + KILL_GRACE + 1.0
    for _ in range(50):
        if not alive(pid):
            break
        yield sleep(0.05)
    assert not alive(pid), "the stuck worker was not killed"
    assert pool.get_stats()["killed"] == 1
    report = yield pool.analyse(path, ["names"], Limits(), 10)   # a new worker takes over
    assert report["verdict"] is None and pool.worker_pids() != [pid]


@pytest_twisted.inlineCallbacks
def test_cancelling_a_scan_kills_its_worker(pool: ScanPool, bomb_file: str) -> None:
    d = pool.analyse(bomb_file, ["eicar"], UNLIMITED, 30)
    pid = yield busy(pool)
    d.cancel()
    with pytest.raises(ScannerError, match="cancelled"):
        yield d
    for _ in range(50):
        if not alive(pid):
            break
        yield sleep(0.05)
    assert not alive(pid)


@pytest_twisted.inlineCallbacks
def test_a_worker_that_dies_is_an_error_and_replaced(pool: ScanPool, bomb_file: str,
                                                      tmp_path: Any) -> None:
    d = pool.analyse(bomb_file, ["eicar"], UNLIMITED, 30)
    pid = yield busy(pool)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ScannerError, match="killed by signal 9"):
        yield d
    path = write(tmp_path, b"Subject: x\r\n\r\nhi\r\n")
    report = yield pool.analyse(path, ["spam"], Limits(), 10)
    assert "spam" in report and pool.get_stats()["crashed"] == 1


@pytest_twisted.inlineCallbacks
def test_jobs_wait_for_a_free_worker_within_their_time(pool: ScanPool, bomb_file: str,
                                                        tmp_path: Any) -> None:
    busy = pool.analyse(bomb_file, ["eicar"], UNLIMITED, 1.0)
    path = write(tmp_path, b"Subject: x\r\n\r\nhi\r\n")
    waiting = pool.analyse(path, ["spam"], Limits(), 0.2)
    with pytest.raises(ScannerError, match="no scan worker free within 0.2s"):
        yield waiting
    with pytest.raises(ScannerError, match="timed out"):
        yield busy
    report = yield pool.analyse(path, ["spam"], Limits(), 5)
    assert report["verdict"] is None


@pytest_twisted.inlineCallbacks
def test_memory_cap_and_a_large_member_streamed(tmp_path: Any) -> None:
    """A worker capped at 160 MB of address space scans a 300 MB member: it streams."""
    p = ScanPool(reactor, size=1, memory=160 * 1024 * 1024)
    try:
        path = write(tmp_path, mime_attachment(ratio_bomb(300 * 1024 * 1024)))
        report = yield p.analyse(path, ["eicar"], UNLIMITED, 30)
        assert report["verdict"] is None and report["spent"]["bytes"] > 300 * 1024 * 1024
    finally:
        yield p.close()


@pytest_twisted.inlineCallbacks
def test_reply_lists_only_blocked_names(pool: ScanPool, tmp_path: Any) -> None:
    """9,000 long member names: the worker sends back the one that matters, and a count."""
    from tests.email.zipcraft import RawEntry, raw_zip
    members = [RawEntry(f"{i:05d}-" + "n" * 200 + ".txt", b"", 0, 0, method=0)
               for i in range(9000)]
    members.append(RawEntry("tools/run.exe", b"MZ", 2, 0x1a3b4c5d, method=0))
    import zlib
    members[-1].crc = zlib.crc32(b"MZ")
    path = write(tmp_path, mime_attachment(raw_zip(members)))
    report = yield pool.analyse(path, ["names", "archives"], Limits(), 10, [".exe", ".bat"])
    assert report["names"] == [["archive.zip/tools/run.exe", "tools/run.exe", True]]
    assert report["names_seen"] == 9002   # the attachment's own name too


@pytest_twisted.inlineCallbacks
def test_a_worker_that_cannot_start_fails_fast_without_a_respawn_storm(tmp_path: Any) -> None:
    p = ScanPool(reactor, size=2, python="/bin/false")
    try:
        path = write(tmp_path, b"Subject: x\r\n\r\nhi\r\n")
        started = reactor.seconds()
        with pytest.raises(ScannerError, match="failed to start"):
            yield p.analyse(path, ["spam"], Limits(), 10)
        assert reactor.seconds() - started < 5
        yield sleep(0.5)
        assert p.get_stats()["spawned"] == 1 and p.get_stats()["start_failures"] == 1
    finally:
        yield p.close()
