"""Real peers for the email tests: spamd, clamd and redis-server on ephemeral loopback ports.

Each starts in a temp dir, is waited for, and is stopped by its PID.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from typing import Optional

from dcrouter.email.scanning.virus import EICAR
from tests.support.net import free_port, wait_for_tcp


#: A harmless file only the test signature database knows (the built-in check does not).
CUSTOM_SAMPLE = b"dcrouter test sample: flagged by the clamd test database only\n"


class Peer:
    """A started server process and its port."""

    def __init__(self, proc: subprocess.Popen, port: int, pidfile: Optional[str] = None,
                 log_path: str = "") -> None:
        self.proc = proc
        self.port = port
        self.pidfile = pidfile
        self.log_path = log_path

    def stop(self) -> None:
        """SIGTERM the process (and spamd's children through its pidfile's PID)."""
        pids = [self.proc.pid]
        if self.pidfile and os.path.exists(self.pidfile):
            with open(self.pidfile) as f:
                text = f.read().strip()
            if text.isdigit() and int(text) not in pids:
                pids.append(int(text))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_clamd(tmp: str) -> Peer:
    """clamd with a one-line hash database that knows the EICAR file."""
    db = os.path.join(tmp, "db")
    os.makedirs(db, exist_ok=True)
    with open(os.path.join(db, "test.hdb"), "w") as f:
        f.write(f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:Test.EICAR-Custom\n")
        f.write(f"{hashlib.md5(CUSTOM_SAMPLE).hexdigest()}:{len(CUSTOM_SAMPLE)}:"
                "Test.Dcrouter-Custom\n")
    port = free_port()
    conf = os.path.join(tmp, "clamd.conf")
    log = os.path.join(tmp, "clamd.log")
    with open(conf, "w") as f:
        f.write(f"Foreground yes\nTCPSocket {port}\nTCPAddr 127.0.0.1\nDatabaseDirectory {db}\n"
                f"LogFile {log}\nPidFile {os.path.join(tmp, 'clamd.pid')}\n")
    out = open(os.path.join(tmp, "clamd.out"), "wb")
    proc = subprocess.Popen(["clamd", "-c", conf], stdout=out, stderr=subprocess.STDOUT)
    wait_for_tcp(port, timeout=30)
    return Peer(proc, port, log_path=log)


def start_spamd(tmp: str) -> Peer:
    """spamd without Bayes, one child process pool of 2, answering loopback only."""
    port = free_port()
    pidfile = os.path.join(tmp, "spamd.pid")
    out = open(os.path.join(tmp, "spamd.out"), "wb")
    proc = subprocess.Popen(
        ["spamd", "-L", "-i", "127.0.0.1", "-p", str(port), "-A", "127.0.0.1", "-m", "2",
         "-u", "nobody", "-x", "--cf=use_bayes 0", "--cf=bayes_auto_learn 0",
         "--syslog=stderr", f"--pidfile={pidfile}"],
        stdout=out, stderr=subprocess.STDOUT)
    wait_for_tcp(port, timeout=60)
    return Peer(proc, port, pidfile=pidfile)


def start_redis(tmp: str) -> Peer:
    """redis-server without persistence."""
    port = free_port()
    out = open(os.path.join(tmp, "redis.out"), "wb")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--daemonize", "no",
                             "--dir", tmp], stdout=out, stderr=subprocess.STDOUT)
    wait_for_tcp(port, timeout=20)
    time.sleep(0.05)
    return Peer(proc, port)
