"""CHUNKING benchmark: one big message by BDAT (in chunks, or one chunk) against DATA.

Reuses the server processes of ``bench/smtp_accept.py`` (``server``: dcrouter's
UnifiedEmailServer with a durable handler; ``aiosmtpd``: the peer, which has no
CHUNKING, so it is measured with DATA only, and with a message under its default
32 MiB limit).  For each case one message of
``--size`` bytes is sent over loopback; reported: seconds from the first body
byte to the final reply, and the server's peak RSS growth during the message
(VmHWM reset through ``/proc/PID/clear_refs`` before each message).

Usage::

    .venv/bin/python bench/smtp_bdat.py                 # 50 MB, ~30 seconds
    .venv/bin/python bench/smtp_bdat.py --size 20000000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any, Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

from smtp_accept import Target, proc_status  # noqa: E402

MIB = 1024 * 1024
#: aiosmtpd's default data_size_limit (32 MiB): the peer gets a message under it.
AIOSMTPD_LIMIT = 33554432
LINE = b"z" * 998 + b"\r\n"


def _session(port: int) -> tuple[socket.socket, Callable[[], bytes]]:
    s = socket.create_connection(("127.0.0.1", port), timeout=300)
    f = s.makefile("rb")

    def reply() -> bytes:
        while True:
            r = f.readline()
            if r[3:4] != b"-":
                return r

    reply()
    for cmd in (b"EHLO big.test\r\n", b"MAIL FROM:<a@bench.test>\r\n",
                b"RCPT TO:<b@bench.test>\r\n"):
        s.sendall(cmd)
        reply()
    return s, reply


def send_data(port: int, size: int) -> bytes:
    """DATA with 1000-octet lines, written 64 KB at a time."""
    s, reply = _session(port)
    with s:
        s.sendall(b"DATA\r\n")
        reply()
        piece = LINE * 64
        sent = 0
        while sent < size:
            s.sendall(piece)
            sent += len(piece)
        s.sendall(b".\r\n")
        return reply()


def send_bdat(port: int, size: int, chunk: int) -> bytes:
    """BDAT chunks of ``chunk`` octets (the last one LAST), written 64 KB at a time."""
    s, reply = _session(port)
    piece = (LINE * 66)[:64 * 1024]
    with s:
        left = size
        while left > 0:
            this = min(chunk, left)
            left -= this
            s.sendall(b"BDAT %d%s\r\n" % (this, b"" if left else b" LAST"))
            written = 0
            while written < this:
                n = min(len(piece), this - written)
                s.sendall(piece[:n])
                written += n
            r = reply()
            if not r.startswith(b"250"):
                return r
        return r


def measure(target: Target, send: Callable[[], bytes]) -> dict[str, Any]:
    """Run ``send`` once; seconds and peak RSS growth of the server process."""
    try:
        with open(f"/proc/{target.proc.pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = proc_status(target.proc.pid)
    started = time.monotonic()
    r = send()
    elapsed = time.monotonic() - started
    after = proc_status(target.proc.pid)
    return {"reply": r.decode(errors="replace").strip()[:40], "seconds": round(elapsed, 2),
            "peak_rss_growth_mib": round((after["VmHWM"] - before["VmRSS"]) / 1024, 1)}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=50 * 1000 * 1000,
                        help="message size in octets (default 50,000,000: under the 50 MiB limit)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"cores: {os.cpu_count()}, message: {args.size} octets, rounds: {args.rounds}")
    server = Target("server", max_size=max(52428800, args.size + MIB))
    peer = Target("aiosmtpd")
    peer_size = min(args.size, AIOSMTPD_LIMIT - MIB)
    try:
        cases = [
            ("dcrouter DATA", server, lambda: send_data(server.port, args.size)),
            ("dcrouter BDAT 1 MiB chunks", server,
             lambda: send_bdat(server.port, args.size, MIB)),
            ("dcrouter BDAT one chunk", server,
             lambda: send_bdat(server.port, args.size, args.size)),
            (f"aiosmtpd DATA (peer) {peer_size}", peer, lambda: send_data(peer.port, peer_size)),
        ]
        for n in range(args.rounds):
            for name, target, send in cases:
                print(f"round {n + 1} {name:38s} {measure(target, send)}", flush=True)
    finally:
        server.stop()
        peer.stop()


if __name__ == "__main__":
    main()
