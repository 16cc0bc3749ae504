"""Helpers for queue tests: spool files, delivery requests, a redis-server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from typing import Iterator, Optional

from dcrouter.message import DeliveryRequest, Destination, Route, new_correlation_id, new_queue_id
from tests.support.net import free_port, wait_for_tcp


def spool_message(state_dir: str, body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> str:
    """Write a message into state_dir/spool and return its path."""
    spool = os.path.join(state_dir, "spool")
    os.makedirs(spool, exist_ok=True)
    path = os.path.join(spool, new_queue_id() + ".eml")
    with open(path, "wb") as f:
        f.write(body)
    return path


def request(body_path: str, recipients: Optional[list[str]] = None,
            route: Optional[Route] = None, mail_from: str = "sender@example.org",
            queue_id: str = "") -> DeliveryRequest:
    """A forward request to 127.0.0.1:2525 unless a route (a literal next hop) is given."""
    return DeliveryRequest(queue_id=queue_id or new_queue_id(), mode="forward",
                           rule_pattern="*@example.com", mail_from=mail_from,
                           recipients=recipients or ["a@example.com"],
                           via=Destination.to(route or Route(kind="forward", server="127.0.0.1",
                                                             port=2525)),
                           body_path=body_path, correlation_id=new_correlation_id(),
                           size=os.path.getsize(body_path))


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server on an ephemeral loopback port (no persistence); yields its URL."""
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
        shutil.rmtree(workdir, ignore_errors=True)
