"""Scanners failing closed, end to end: smtplib into a real ``twistd dcrouter`` with a process
rule, an aiosmtpd sink behind it, the client an outsider (not in relay_networks).

* a zip bomb gets a clear 554 5.7.1 naming the limit, and nothing reaches the sink;
* a blocked .exe nested deep (archives in an attached message) is still refused;
* a scan that runs out of time answers 451 4.7.0 (scan_fail_mode "closed", the default)
  and its worker stops using CPU; with "open" the same message is delivered, tagged;
* a worker that hangs is killed: its PID is gone, and the next message is scanned again.
"""

from __future__ import annotations

import os
import signal
import smtplib
import time
from typing import Any, Iterator

import pytest

from tests.delivery.peers import Sink
from tests.email.support import simple_message
from tests.email.zipcraft import deep_zip, mime_attachment, nested_bomb, ratio_bomb
from tests.support.configs import write_config
from tests.support.net import free_port, wait_for_tcp
from tests.support.proc import TwistdProcess, wait_until

UNLIMITED = {"max_scan_size": 0, "max_file_size": 0, "max_ratio": 0}


class Gateway:
    """A running twistd dcrouter and its SMTP port."""

    def __init__(self, proc: TwistdProcess, port: int) -> None:
        self.proc = proc
        self.port = port

    def send(self, data: bytes, rcpt: str = "bob@scan.test") -> tuple[int, str]:
        """(code, text) of the answer to DATA (250 when accepted)."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
            try:
                client.sendmail("alice@sender.test", [rcpt], data)
            except smtplib.SMTPDataError as e:
                return e.smtp_code, e.smtp_error.decode("utf-8", "replace")
        return 250, ""

    def scan_workers(self) -> list[int]:
        """PIDs of the gateway's scan worker processes."""
        pids = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if int(fields[1]) == self.proc.proc.pid and fields[0] != "Z" \
                    and b"dcrouter.email.scanning.worker" in cmdline:
                pids.append(int(name))
        return pids


def start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot): with the PID, names one process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return -1
    return -1 if fields[0] == "Z" else int(fields[19])


def cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return -1
    return int(fields[11]) + int(fields[12])


def start_gateway(tmp: str, sink: Sink, **email: Any) -> Gateway:
    port = free_port()
    section: dict[str, Any] = {
        "hostname": "gw.test", "listen": "127.0.0.1", "ports": [port],
        "submission_ports": [], "implicit_tls_ports": [],
        "relay_networks": ["192.0.2.0/24"],     # the loopback test client is an outsider
        "scan_workers": 1,
        "domain_rules": [{
            "pattern": "*@scan.test", "mode": "process", "content_scanning": True,
            "target": {"server": "127.0.0.1", "port": sink.port},
            "scanners": [{"type": "virus", "action": "reject"},
                         {"type": "attachment", "blocked_extensions": [".exe"],
                          "action": "reject"}]}],
        "queue": {"base_retry_delay": 0.2, "max_retry_delay": 1.0, "check_interval": 0.1},
    }
    section.update(email)
    os.makedirs(tmp, exist_ok=True)
    config = write_config(os.path.join(tmp, "dcrouter.toml"),
                          {"router": {"state_dir": os.path.join(tmp, "var")}, "email": section})
    proc = TwistdProcess(tmp, config=config)
    try:
        wait_for_tcp(port, timeout=30)
    except Exception:
        proc.kill()
        raise
    return Gateway(proc, port)


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, sink: Sink) -> Iterator[Gateway]:
    """Default limits and fail mode; a 2 s scan timeout."""
    gw = start_gateway(str(tmp_path_factory.mktemp("gw")), sink, scan_timeout=2)
    yield gw
    stop(gw)


def stop(gw: Gateway) -> None:
    workers = gw.scan_workers()
    try:
        assert gw.proc.stop() == 0, gw.proc.output()[-3000:]
    finally:
        gw.proc.kill()
    for pid in workers:   # the gateway's workers go with it
        wait_until(lambda: cpu_ticks(pid) < 0 or not os.path.exists(f"/proc/{pid}"), timeout=10)


def delivered(sink: Sink, subject: str) -> bytes:
    wait_until(lambda: any(subject.encode() in m.content for m in sink.messages), timeout=20)
    return next(m.content for m in sink.messages if subject.encode() in m.content)


def test_zip_bomb_rejected_with_a_clear_5xx(gateway: Gateway, sink: Sink) -> None:
    code, text = gateway.send(mime_attachment(ratio_bomb(20 << 20, with_crc=False),
                                              subject="bomb"))
    assert code == 554
    assert text == "5.7.1 Message rejected: content exceeds scanning limits " \
                   "(Heuristics.Limits.Exceeded.MaxRatio)"
    code, text = gateway.send(mime_attachment(nested_bomb(16, 3, 1 << 20), "42.zip",
                                              subject="42"))
    assert (code, text.rsplit("(", 1)[-1]) == (554, "Heuristics.Limits.Exceeded.MaxScanSize)")
    # a clean message on the same connection pool still goes through
    assert gateway.send(simple_message(subject="after the bombs")) == (250, "")
    delivered(sink, "after the bombs")
    assert not any(b"Subject: bomb" in m.content or b"Subject: 42" in m.content
                   for m in sink.messages)


def test_blocked_exe_nested_deep_still_blocked(gateway: Gateway, sink: Sink) -> None:
    archive = deep_zip(8, "invoice.pdf.exe", b"MZ\x90\x00")
    inner = mime_attachment(archive, "docs.zip", subject="inner")
    outer = mime_attachment(inner, "forwarded.eml", "message/rfc822", subject="deep exe")
    assert gateway.send(outer) == (550, "5.7.1 Message rejected: blocked attachment type")
    past_the_limit = mime_attachment(deep_zip(30, "x.exe", b"MZ"), subject="deeper")
    code, text = gateway.send(past_the_limit)
    assert code == 554 and "MaxRecursion" in text


def test_a_hanging_worker_is_killed_and_replaced(gateway: Gateway, sink: Sink) -> None:
    assert gateway.send(simple_message(subject="warm up")) == (250, "")
    (pid,) = gateway.scan_workers()
    born = start_time(pid)
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    code, text = gateway.send(simple_message(subject="while hung"))
    assert (code, text) == (451, "4.7.0 Temporary content scanning failure, try again later")
    assert time.monotonic() - started < 2 + 1 + 3     # scan_timeout + kill grace + slack
    wait_until(lambda: start_time(pid) != born, timeout=10)   # that process is gone
    assert gateway.send(simple_message(subject="after the kill")) == (250, "")
    delivered(sink, "after the kill")
    (new,) = gateway.scan_workers()
    assert (new, start_time(new)) != (pid, born)


@pytest.mark.parametrize("fail_mode", ["closed", "open"])
def test_scan_timeout_fail_closed_and_open(tmp_path: Any, sink: Sink, fail_mode: str) -> None:
    """Limits off, so a 3 GiB bomb keeps the worker busy past its 1 s: 451, or tagged."""
    gw = start_gateway(str(tmp_path / fail_mode), sink, scan_timeout=1,
                       scan_limits=UNLIMITED, scan_fail_mode=fail_mode)
    try:
        bomb = mime_attachment(ratio_bomb(3 << 30, with_crc=False), subject=f"slow {fail_mode}")
        started = time.monotonic()
        answer = gw.send(bomb)
        took = time.monotonic() - started
        if fail_mode == "closed":
            assert answer == (451, "4.7.0 Temporary content scanning failure, try again later")
        else:
            assert answer == (250, "")
            body = delivered(sink, f"slow {fail_mode}")
            assert b"X-Dcrouter-Scan: error; virus=error; attachment=error" in body
        assert took < 1 + 1 + 4
        # the scan stopped: the worker (kept or replaced) is not burning CPU
        workers = gw.scan_workers()
        before = {pid: cpu_ticks(pid) for pid in workers}
        time.sleep(0.6)
        for pid in workers:
            assert cpu_ticks(pid) - before[pid] <= 3, "a timed-out scan still runs"
    finally:
        stop(gw)
