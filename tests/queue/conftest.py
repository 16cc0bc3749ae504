"""Fixtures of the queue tests: a real redis-server on an ephemeral loopback port."""

from __future__ import annotations

import signal
import subprocess
import tempfile

import pytest

from tests.support.net import free_port, wait_for_tcp


@pytest.fixture(scope="module")
def redis_url():
    """``redis://127.0.0.1:PORT/0`` of a redis-server started for the module (no persistence)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="redis-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--daemonize", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_tcp(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
