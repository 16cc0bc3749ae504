"""systemd's notification protocol, read from a fake ``$NOTIFY_SOCKET`` the test binds.

The socket passes the sender's credentials (``SO_PASSCRED``), as systemd's does,
so the tests also check that only the main process (the master) notifies.
"""

from __future__ import annotations

import os
import select
import signal
import smtplib
import socket
import struct
import time
from typing import Optional

import dns.message
import dns.query
from twisted.internet.task import Clock

from dcrouter.sdnotify import SystemdNotifier, child_environment, from_environment
from tests.support.configs import default_config_with_free_ports, write_config
from tests.support.net import wait_for_tcp
from tests.support.proc import TwistdProcess, wait_until


class FakeSystemd:
    """A unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        #: (sender pid, {key: value}) in arrival order.
        self.messages: list[tuple[int, dict[str, str]]] = []

    def poll(self, timeout: float = 0.0) -> None:
        """Read every datagram waiting (for up to ``timeout`` seconds for the first)."""
        while select.select([self.sock], [], [], timeout)[0]:
            timeout = 0.0
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((pid, fields))

    def wait_for(self, key: str, value: str = "1", after: int = 0,
                 timeout: float = 30.0) -> tuple[int, dict[str, str]]:
        """The first message at index >= ``after`` with ``key=value``; returns (index, it)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (_, fields) in enumerate(self.messages[after:], after):
                if fields.get(key) == value:
                    return i, fields
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key}={value} after #{after}: {self.messages}")
            self.poll(0.2)

    def without_watchdog(self) -> list[dict[str, str]]:
        """Every message but the watchdog pings."""
        return [f for _, f in self.messages if "WATCHDOG" not in f]

    def close(self) -> None:
        """Close and unlink."""
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def test_notifier_speaks_the_protocol_to_a_path_and_an_abstract_socket(tmp_path):
    fake = FakeSystemd(str(tmp_path / "notify"))
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": fake.path})
        notifier.ready("ready: email tcp/25")
        notifier.reloading("reloading")
        notifier.status("multi\nline   status")
        notifier.stopping()
        fake.poll(2)
        got = [f for _, f in fake.messages]
        assert got[0] == {"READY": "1", "STATUS": "ready: email tcp/25"}
        assert got[1]["RELOADING"] == "1" and int(got[1]["MONOTONIC_USEC"]) > 0
        assert got[2] == {"STATUS": "multi line status"} and got[3] == {"STOPPING": "1"}
        assert {pid for pid, _ in fake.messages} == {os.getpid()}
    finally:
        fake.close()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"dcrouter-test-{os.getpid()}"
    abstract.bind("\0" + name)
    try:
        SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert abstract.recv(100) == b"READY=1\n"
    finally:
        abstract.close()


def test_without_notify_socket_nothing_is_sent_and_a_dead_socket_does_not_raise(tmp_path):
    assert not from_environment({}).enabled
    gone = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled and gone.send(READY=1) is False  # logged once, no exception
    assert child_environment({"NOTIFY_SOCKET": "x", "WATCHDOG_USEC": "1", "PATH": "/bin"}) == \
        {"PATH": "/bin"}


def test_watchdog_pings_every_half_period_from_the_reactor(tmp_path):
    fake = FakeSystemd(str(tmp_path / "notify"))
    clock = Clock()
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": fake.path, "WATCHDOG_USEC": "3000000"})
        notifier.start_watchdog(clock)
        for _ in range(3):
            clock.advance(1.5)
        notifier.stop_watchdog()
        clock.advance(10)
        fake.poll(1)
        assert [f for _, f in fake.messages] == [{"WATCHDOG": "1"}] * 4  # at 0, 1.5, 3, 4.5
        other = SystemdNotifier({"NOTIFY_SOCKET": fake.path, "WATCHDOG_USEC": "3000000",
                                 "WATCHDOG_PID": "1"})
        assert other.watchdog_usec == 0  # meant for another process
    finally:
        fake.close()


def _start(tmp_path, fake: FakeSystemd, workers: int = 1) -> tuple[TwistdProcess, dict]:
    data, ports = default_config_with_free_ports(str(tmp_path / "var"))
    data["router"]["workers"] = workers
    data["router"]["shutdown_timeout"] = 5
    write_config(str(tmp_path / "dcrouter.toml"), data)
    proc = TwistdProcess(str(tmp_path), config="dcrouter.toml",
                         extra_env={"NOTIFY_SOCKET": fake.path, "WATCHDOG_USEC": "400000"})
    return proc, ports


def test_twistd_says_ready_reloading_ready_and_stopping(tmp_path):
    fake = FakeSystemd(str(tmp_path / "notify"))
    proc, ports = _start(tmp_path, fake)
    try:
        ready_at, ready = fake.wait_for("READY")
        # every listener is bound when READY=1 arrives
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=5) as smtp:
            assert smtp.noop()[0] == 250
        query = dns.message.make_query("dcrouter.test.", "A")
        assert dns.query.udp(query, "127.0.0.1", port=ports["dns"], timeout=5).answer
        wait_for_tcp(ports["api"], timeout=1)
        assert ready["STATUS"].startswith("ready: ") and f"tcp/{ports['smtp']}" in \
            ready["STATUS"] and f"udp/{ports['dns']}" in ready["STATUS"], ready
        assert {pid for pid, _ in fake.messages} == {proc.proc.pid}
        # SIGHUP: RELOADING=1, then READY=1 saying it was applied
        proc.signal(signal.SIGHUP)
        reload_at, reloading = fake.wait_for("RELOADING", after=ready_at + 1)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        _, again = fake.wait_for("READY", after=reload_at + 1)
        assert "configuration applied" in again["STATUS"], again
        # a broken file: still RELOADING then READY, saying the old configuration runs on
        with open(tmp_path / "dcrouter.toml", "a") as f:
            f.write("\n[email.nonsense\n")
        mark = len(fake.messages)
        proc.signal(signal.SIGHUP)
        refused_at, _ = fake.wait_for("RELOADING", after=mark)
        _, refused = fake.wait_for("READY", after=refused_at + 1)
        assert "reload refused" in refused["STATUS"], refused
        pings = [f for _, f in fake.messages if f.get("WATCHDOG") == "1"]
        wait_until(lambda: fake.poll(0.1) or len([f for _, f in fake.messages
                                                  if f.get("WATCHDOG") == "1"]) > len(pings),
                   timeout=10)
    finally:
        status = proc.stop()
        fake.poll(1)
        fake.close()
    assert status == 0, proc.output()
    assert fake.without_watchdog()[-1].get("STOPPING") == "1", fake.messages


def test_master_is_ready_once_every_worker_is_and_workers_stay_silent(tmp_path):
    fake = FakeSystemd(str(tmp_path / "notify"))
    proc, ports = _start(tmp_path, fake, workers=2)
    try:
        ready_at, ready = fake.wait_for("READY")
        assert ready["STATUS"] == "ready: 2 workers"
        assert proc.output().count(") ready") == 2, proc.output()
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=5) as smtp:
            assert smtp.noop()[0] == 250
        proc.signal(signal.SIGHUP)
        reload_at, _ = fake.wait_for("RELOADING", after=ready_at + 1)
        _, again = fake.wait_for("READY", after=reload_at + 1)
        assert again["STATUS"] == "ready (reloaded): 2 workers"
        assert proc.output().count("configuration applied") >= 2, proc.output()
    finally:
        status = proc.stop()
        fake.poll(1)
        fake.close()
    assert status == 0, proc.output()
    assert fake.without_watchdog()[-1].get("STOPPING") == "1", fake.messages
    senders: set[Optional[int]] = {pid for pid, _ in fake.messages}
    assert senders == {proc.proc.pid}, senders  # NotifyAccess=main is enough
