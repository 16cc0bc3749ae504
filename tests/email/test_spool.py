"""Spool files: streaming writes, the size limit while streaming, clean-up."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from dcrouter.email.spool import SpoolWriter, remove_quietly, spool_dir
from tests.email.test_server import Raw


def test_writer_streams_header_and_body(tmp_path: Any) -> None:
    directory = spool_dir(str(tmp_path))
    assert directory.endswith("/spool") and oct(os.stat(directory).st_mode & 0o777) == "0o700"
    writer = SpoolWriter(directory, "Q1", limit=10)
    writer.write_header(b"Received: x\r\n")  # does not count against the limit
    writer.write(b"0123456789")
    assert not writer.oversize and not writer.has_8bit
    path = writer.finish()
    with open(path, "rb") as f:
        assert f.read() == b"Received: x\r\n0123456789"
    assert writer.total_size == 23


def test_writer_past_limit_deletes_and_keeps_counting(tmp_path: Any) -> None:
    writer = SpoolWriter(str(tmp_path), "Q2", limit=5)
    writer.write(b"abc")
    writer.write(b"def")
    assert writer.oversize and not os.path.exists(writer.path)
    writer.write(b"more")
    assert writer.size == 10


def test_writer_8bit_flag_abort_and_remove(tmp_path: Any) -> None:
    writer = SpoolWriter(str(tmp_path), "Q3", limit=100)
    writer.write("é".encode())
    assert writer.has_8bit
    writer.abort()
    assert not os.path.exists(writer.path)
    remove_quietly(writer.path)  # already gone: fine


@pytest_twisted.inlineCallbacks
def test_data_reaches_disk_while_streaming(start_server: Any) -> None:
    """8 MB arrive; the spool file grows before the end of data and the session buffers little."""
    run = start_server()
    sessions: list = []

    def client() -> tuple:
        raw = Raw(run.ports["smtp"], timeout=30)
        raw.reply()
        raw.cmd("EHLO client.test")
        raw.cmd("MAIL FROM:<a@local.test>")
        raw.cmd("RCPT TO:<b@local.test>")
        raw.cmd("DATA")
        chunk = (b"y" * 1000 + b"\r\n") * 100
        for _ in range(80):
            raw.send(chunk)
        deadline = time.monotonic() + 20
        size = 0
        while time.monotonic() < deadline:
            files = os.listdir(run.server.spool_dir)
            if files:
                size = os.path.getsize(os.path.join(run.server.spool_dir, files[0]))
                if size > 7_000_000:
                    break
            time.sleep(0.02)
        buffered = max(len(s._buf) for s in run.server.sessions)
        reply = raw.cmd(".")
        raw.close()
        return size, buffered, reply

    size, buffered, reply = yield deferToThread(client)
    assert size > 7_000_000  # on disk before the terminating dot was sent
    assert buffered < 256 * 1024
    assert reply.startswith("250 ")
    assert len(run.handler.body()) == 80 * 100 * 1002
