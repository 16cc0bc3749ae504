"""Scan bomb benchmark: CPU a 15 MB zip bomb costs, and how much it delays other sessions.

Runs a real ``twistd -n dcrouter`` (default scan limits, scan_fail_mode closed) with two
rules: ``*@scan.test`` (process mode, virus + attachment scanners) and ``*@plain.test``
(forward mode), both to an aiosmtpd sink in its own process.  Then:

1. ``baseline``: bench/smtp_latency (a small C client the bench builds with cc) runs plain
   sessions to ``*@plain.test`` one after another for ``--seconds``; latency of each.
2. ``bombs``: the same client again, while a separate process sends 15 MB bomb messages
   to ``*@scan.test`` one after another (each should get 554); CPU of the gateway process
   and of its scan workers per bomb, from /proc.
3. the peer: clamd (its default limits, database of one test signature) scans each bomb
   file over INSTREAM; its CPU per scan and its answer.

Bomb shapes (each about 15 MB as a message): ``42`` (42.zip shape, 16 x 16 x 16 leaves of
1 MiB, repeated to fill the message: stopped by MaxScanSize after 100 MiB inflated - the
most work the limits allow), ``liar`` (one member declaring 1 KB that inflates to ~10 GB:
stopped by the real ratio), ``ratio`` (declared truthfully: stopped before inflating),
``overlap`` (60,000 entries sharing one kernel: refused on the directory, before
anything is inflated).

Usage::

    .venv/bin/python bench/scan_bomb.py                 # ~1 minute
    .venv/bin/python bench/scan_bomb.py --seconds 20 --shapes 42,liar
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.email.zipcraft import (  # noqa: E402
    RawEntry, deflate_zeros, mime_attachment, nested_bomb, overlap_bomb, raw_zip,
)

TARGET = 15 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (0 when gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        out.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def attach_many(blob: bytes, name: str) -> bytes:
    """A message of ~TARGET bytes: ``blob`` attached as often as it fits."""
    one = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    copies = max(1, TARGET // max(len(one), 1))
    parts = [b"From: a@sender.test\r\nTo: b@scan.test\r\nSubject: bomb\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n"]
    for i in range(copies):
        parts.append(f"--BB\r\nContent-Type: application/zip\r\nContent-Disposition: "
                     f"attachment; filename=\"{i}-{name}\"\r\nContent-Transfer-Encoding: "
                     f"base64\r\n\r\n".encode() + one)
    parts.append(b"--BB--\r\n")
    return b"".join(parts)


def make_bombs(shapes: list[str]) -> dict[str, bytes]:
    bombs = {}
    zipped = TARGET * 3 // 4 - 4096      # what fits in 15 MB after base64
    for shape in shapes:
        if shape == "42":
            bombs[shape] = attach_many(nested_bomb(16, 3, 1 << 20), "42.zip")
        elif shape == "liar":
            size = zipped // 1032 * 1 << 20   # deflate of zeros: ~1 KiB per MiB
            bombs[shape] = mime_attachment(raw_zip([RawEntry(
                "small.txt", deflate_zeros(size), size, 0, declared_size=1000)]))
        elif shape == "ratio":
            size = zipped // 1032 * 1 << 20
            bombs[shape] = mime_attachment(raw_zip([RawEntry(
                "zeros.bin", deflate_zeros(size), size, 0)]))
        elif shape == "overlap":
            bombs[shape] = mime_attachment(overlap_bomb(60000, 1 << 20, 180))
        else:
            raise SystemExit(f"unknown shape {shape!r}")
    return bombs


def send_bombs(port: int, data: bytes, seconds: float, out: Any) -> None:
    """In its own process: bombs one after another; (seconds to the answer, code) each."""
    stop = time.monotonic() + seconds
    results = []
    while time.monotonic() < stop:
        t0 = time.monotonic()
        code, text = 250, ""
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
                client.sendmail("a@sender.test", ["b@scan.test"], data)
        except smtplib.SMTPDataError as e:
            code, text = e.smtp_code, e.smtp_error.decode("utf-8", "replace")
        results.append((time.monotonic() - t0, code, text))
    out.put(results)


def latency(client: str, port: int, seconds: float) -> list[float]:
    out = subprocess.run([client, "127.0.0.1", str(port), "x@plain.test", str(seconds)],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    bad = [r for r in rows if r[1] != "250"]
    if bad:
        raise SystemExit(f"plain sessions failed: {bad[:3]}")
    return [float(r[0]) for r in rows]


def summary(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return (f"n={len(values)} p50={statistics.median(values):.1f} ms p99={p99:.1f} ms "
            f"max={values[-1]:.1f} ms")


def clamd_peer(tmp: str, files: dict[str, str]) -> dict[str, tuple[float, str]]:
    """clamd with its default limits: CPU seconds and answer per bomb file."""
    sys.path.insert(0, REPO)
    from tests.email.peers import start_clamd
    peer = start_clamd(os.path.join(tmp, "clamd"))
    results = {}
    try:
        for shape, path in files.items():
            before = cpu(peer.proc.pid)
            with socket.create_connection(("127.0.0.1", peer.port), timeout=300) as s, \
                    open(path, "rb") as f:
                s.sendall(b"zINSTREAM\0")
                while chunk := f.read(65536):
                    s.sendall(len(chunk).to_bytes(4, "big") + chunk)
                s.sendall(b"\0\0\0\0")
                answer = s.recv(4096).split(b"\0")[0].decode()
            results[shape] = (cpu(peer.proc.pid) - before, answer)
    finally:
        peer.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--shapes", default="42,liar,ratio,overlap")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="scan-bomb-")
    client = os.path.join(tmp, "smtp_latency")
    subprocess.run(["cc", "-O2", "-o", client, os.path.join(REPO, "bench", "smtp_latency.c")],
                   check=True)
    shapes = args.shapes.split(",")
    bombs = make_bombs(shapes)
    files = {}
    for shape, data in bombs.items():
        files[shape] = os.path.join(tmp, f"{shape}.eml")
        with open(files[shape], "wb") as f:
            f.write(data)
    sink_port, smtp_port = free_port(), free_port()
    sink = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-l",
                             f"127.0.0.1:{sink_port}", "-c", "aiosmtpd.handlers.Sink"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from dcrouter.config.toml_writer import dumps
    config = os.path.join(tmp, "dcrouter.toml")
    target = {"server": "127.0.0.1", "port": sink_port}
    with open(config, "w") as f:
        f.write(dumps({
            "router": {"state_dir": os.path.join(tmp, "var"), "log_level": "warn"},
            "email": {"hostname": "gw.test", "listen": "127.0.0.1", "ports": [smtp_port],
                      "submission_ports": [], "implicit_tls_ports": [],
                      "domain_rules": [
                          {"pattern": "*@scan.test", "mode": "process",
                           "content_scanning": True, "target": target,
                           "scanners": [{"type": "virus", "action": "reject"},
                                        {"type": "attachment", "action": "reject",
                                         "blocked_extensions": [".exe"]}]},
                          {"pattern": "*@plain.test", "mode": "forward", "target": target}]},
        }))
    env = dict(os.environ, PYTHONPATH=REPO)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    gw = subprocess.Popen([twistd, "-n", "--pidfile=", "dcrouter", "--config", config],
                          cwd=tmp, env=env, stdout=open(os.path.join(tmp, "twistd.out"), "wb"),
                          stderr=subprocess.STDOUT)
    try:
        wait_port(sink_port)
        wait_port(smtp_port)
        print(f"# scan_bomb: {os.cpu_count()} CPUs, {args.seconds:g} s per phase, "
              f"python {sys.version.split()[0]}")
        base = latency(client, smtp_port, args.seconds)
        print(f"baseline plain sessions: {summary(base)}")
        for shape in shapes:
            size = len(bombs[shape])
            # the cost of one bomb alone: gateway (SMTP, spool) + scan workers, from /proc
            alone = []
            for _ in range(3):
                before = cpu(gw.pid), sum(cpu(c) for c in children(gw.pid))
                t0 = time.monotonic()
                q: Any = multiprocessing.Queue()
                send_bombs(smtp_port, bombs[shape], 0.0001, q)
                took = time.monotonic() - t0
                (_t, code, text), = q.get()
                after = cpu(gw.pid), sum(cpu(c) for c in children(gw.pid))
                alone.append((after[0] - before[0], after[1] - before[1], took,
                              f"{code} {text}"))
            gw_cpu = statistics.median(a[0] for a in alone)
            worker_cpu = statistics.median(a[1] for a in alone)
            print(f"{shape}: one {size / 1e6:.1f} MB bomb alone: answer '{alone[-1][3]}' after "
                  f"{statistics.median(a[2] for a in alone):.2f} s; CPU gateway "
                  f"{gw_cpu:.2f} s + scan worker {worker_cpu:.2f} s = "
                  f"{gw_cpu + worker_cpu:.2f} s (median of 3)")
            queue: Any = multiprocessing.Queue()
            sender = multiprocessing.Process(target=send_bombs,
                                             args=(smtp_port, bombs[shape], args.seconds, queue))
            sender.start()
            loaded = latency(client, smtp_port, args.seconds)
            results = queue.get(timeout=600)
            sender.join()
            codes = sorted({code for _t, code, _x in results})
            answer = statistics.median(t for t, _c, _x in results)
            worst = max(loaded) - max(base)
            print(f"{shape}: {len(results)} bombs back to back, answers {codes}, median "
                  f"{answer:.2f} s each; plain sessions meanwhile: {summary(loaded)}; "
                  f"worst delay over the baseline's worst {worst:.1f} ms")
        peer = clamd_peer(tmp, files)
        for shape, (seconds, answer) in peer.items():
            print(f"peer clamd (default limits) on {shape}: {seconds:.2f} s CPU, "
                  f"answer {answer!r}")
    finally:
        gw.terminate()
        sink.terminate()
        gw.wait(30)
        sink.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
