"""Spool files: streaming writes, the size limit while streaming, clean-up."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from dcrouter.email.spool import SpoolFiles, SpoolWriter, clean_spool, remove_quietly, spool_dir
from tests.email.test_server import Raw


def test_writer_streams_header_and_body(tmp_path: Any) -> None:
    directory = spool_dir(str(tmp_path))
    assert directory.endswith("/spool") and oct(os.stat(directory).st_mode & 0o777) == "0o700"
    writer = SpoolWriter(*SpoolFiles(directory).take(), limit=10)
    writer.write_header(b"Received: x\r\n")  # does not count against the limit
    writer.write(b"0123456789")
    assert not writer.oversize and not writer.has_8bit
    path = writer.finish()
    with open(path, "rb") as f:
        assert f.read() == b"Received: x\r\n0123456789"
    assert writer.total_size == 23


def test_writer_past_limit_deletes_and_keeps_counting(tmp_path: Any) -> None:
    writer = SpoolWriter(*SpoolFiles(str(tmp_path)).take(), limit=5)
    writer.write(b"abc")
    writer.write(b"def")
    assert writer.oversize and not os.path.exists(writer.path)
    writer.write(b"more")
    assert writer.size == 10


def test_writer_8bit_flag_abort_and_remove(tmp_path: Any) -> None:
    writer = SpoolWriter(*SpoolFiles(str(tmp_path)).take(), limit=100)
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
            size = max(os.path.getsize(os.path.join(run.server.spool_dir, f)) for f in files)
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


@pytest_twisted.inlineCallbacks
def test_pool_prepares_files_in_a_thread_and_cleans_up(tmp_path: Any) -> None:
    from twisted.internet import reactor, task
    directory = str(tmp_path)
    for name in ("0123456789abcdef0123456789abcdef.eml", "0123456789abcdef0123456789abcdef.eml.ar",
                 "dsn-abc.eml"):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(b"left over by a crash")
    assert clean_spool(directory) == 2 and os.listdir(directory) == ["dsn-abc.eml"]
    os.unlink(os.path.join(directory, "dsn-abc.eml"))
    pool = SpoolFiles(directory, reactor, target=8)
    path, fd = pool.take()  # the pool is empty: made on the spot, a refill starts
    os.close(fd)
    for _ in range(100):
        if len(pool.ready_paths()) == 8:
            break
        yield task.deferLater(reactor, 0.02, lambda: None)
    assert len(pool.ready_paths()) == 8
    assert set(os.listdir(directory)) == {os.path.basename(p) for p in pool.ready_paths()} | \
        {os.path.basename(path)}
    taken, fd = pool.take()
    os.close(fd)
    assert taken not in pool.ready_paths()
    pool.close()
    yield task.deferLater(reactor, 0.2, lambda: None)  # a refill finishing late is discarded
    assert set(os.listdir(directory)) == {os.path.basename(path), os.path.basename(taken)}


# -- the DATA decoder that feeds the spool ------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from dcrouter.email.data import DotDecoder, dot_stuff  # noqa: E402

_lines = st.lists(st.one_of(st.binary(max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b".", b"..", b".x", b"", b". ", b"...", b"\x00", b"\xff."])), max_size=30)


def _decode(stream: bytes, cuts: list[int], partial_flush: int = 64 * 1024) -> tuple:
    decoder = DotDecoder(partial_flush)
    out, buf, pos = [], b"", 0
    for cut in sorted(set(c % (len(stream) + 1) for c in cuts)) + [len(stream)]:
        buf += stream[pos:cut]
        pos = cut
        data, buf, done = decoder.feed(buf)
        out.append(data)
        if done:
            return b"".join(out), buf + stream[pos:], True
    return b"".join(out), buf, False


@settings(max_examples=400, deadline=None)
@given(lines=_lines, cuts=st.lists(st.integers(0, 10000), max_size=12),
       trailer=st.sampled_from([b"", b"MAIL FROM:<a@b>\r\n", b"QUIT\r\n"]))
def test_decoder_round_trip_any_chunking(lines: list, cuts: list, trailer: bytes) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    decoded, rest, done = _decode(dot_stuff(message) + trailer, cuts)
    assert done and decoded == message and rest == trailer


@settings(max_examples=200, deadline=None)
@given(lines=_lines, cuts=st.lists(st.integers(0, 10000), max_size=12))
def test_decoder_bare_lf_ends_lines_but_never_the_message(lines: list, cuts: list) -> None:
    """Bare LF lines are taken as CRLF lines (dots unstuffed), but ".\n" is content:
    only CRLF.CRLF ends the message (no SMTP smuggling)."""
    message = b"".join(line + b"\r\n" for line in lines)
    bare = dot_stuff(message).replace(b"\r\n", b"\n")
    decoded, rest, done = _decode(bare, cuts)
    assert not done and rest == b""
    decoder_input = bare + b"\r\n.\r\nQUIT\r\n"
    decoded, rest, done = _decode(decoder_input, cuts)
    assert done and decoded == message + b".\r\n\r\n" and rest == b"QUIT\r\n"


def test_decoder_long_lines_pass_in_pieces_without_splitting_crlf() -> None:
    long_line = b"." + b"a" * 99 + b"\r"  # ends in CR: must not become CR CR LF
    decoded, rest, done = _decode(long_line + b"\n.\r\n", [len(long_line)], partial_flush=50)
    assert done and decoded == b"a" * 99 + b"\r\n"


# -- Authentication-Results claiming our id, removed while spooling -----------------------------

from dcrouter.email.spool import ResultsFilter, SpoolWriter  # noqa: E402

_OURS = "mx.dcrouter.test"
_FIELDS = st.sampled_from([
    (b"Authentication-Results: mx.dcrouter.test; spf=pass\r\n", False),
    (b"Authentication-Results: mx.dcrouter.test 1; dkim=pass\r\n", False),
    (b"Authentication-Results: MX.DCROUTER.TEST (verified); x=y\r\n", False),
    (b"Authentication-Results: (c) mx.dcrouter.test;\r\n\tspf=pass\r\n", False),
    (b"authentication-results :\r\n (a (b) c)\r\n \"mx.dcrouter.test.\";\r\n x=y\r\n", False),
    (b"Authentication-Results: mx.dcrouter.test\r\n", False),
    (b"Authentication-Results: (only a comment)\r\n", False),
    (b"Authentication-Results: other.test; spf=pass\r\n", True),
    (b"Authentication-Results: mx.dcrouter.test.evil; spf=pass\r\n", True),
    (b"X-Authentication-Results: mx.dcrouter.test; spf=pass\r\n", True),
    (b"Subject: Authentication-Results: mx.dcrouter.test;\r\n", True),
    (b"Received: from x\r\n\tby y; Mon, 1 Jan 2024\r\n", True),
    (b"X-Long: " + b"a" * 300 + b"\r\n", True),
])


def _filter(data: bytes, cuts: list[int], hold_limit: int = 64) -> tuple[bytes, int]:
    f = ResultsFilter(_OURS, hold_limit=hold_limit)
    out, pos = [], 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        out.append(f.feed(data[pos:cut]))
        pos = cut
    out.append(f.finish())
    return b"".join(out), f.removed


@settings(max_examples=400, deadline=None)
@given(fields=st.lists(_FIELDS, max_size=12), cuts=st.lists(st.integers(0, 5000), max_size=10),
       body=st.sampled_from([b"", b"\r\nAuthentication-Results: mx.dcrouter.test; body\r\n",
                             b"\r\nbody\r\n"]))
def test_results_filter_drops_exactly_our_fields_whatever_the_chunking(
        fields: list, cuts: list, body: bytes) -> None:
    data = b"".join(f for f, _ in fields) + body
    expected = b"".join(f for f, keep in fields if keep) + body
    out, removed = _filter(data, cuts)
    assert out == expected
    assert removed == sum(1 for _, keep in fields if not keep)


def test_results_filter_over_long_lines_and_no_header_section() -> None:
    long_ours = b"Authentication-Results: " + b"(" + b"x" * 5000 + b") mx.dcrouter.test; a\r\n"
    long_other = b"X-Other: " + b"y" * 5000 + b"\r\n"
    data = long_other + long_ours + b"Authentication-Results: mx.dcrouter.test; b\r\n\r\nbody"
    out, removed = _filter(data, [100, 3000, 6000, 9000], hold_limit=1000)
    assert out == long_other + b"\r\nbody" and removed == 2
    # a message that starts with its body: nothing is a header field
    out, removed = _filter(b"no header here\r\nAuthentication-Results: mx.dcrouter.test;\r\n", [])
    assert removed == 0 and out.startswith(b"no header here")
    out, removed = _filter(b"\r\nAuthentication-Results: mx.dcrouter.test;\r\n", [1])
    assert removed == 0


def test_spool_writer_sizes_count_what_is_stored(tmp_path: Any) -> None:
    path = str(tmp_path / "m.eml")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    writer = SpoolWriter(path, fd, 10_000, authserv_id=_OURS)
    writer.write_header(b"Received: x\r\n")
    for piece in (b"Authentication-Results: mx.dcr", b"outer.test; spf=pass\r\nSub",
                  b"ject: s\r\n\r\nbody\r\n"):
        writer.write(piece)
    writer.finish()
    with open(path, "rb") as f:
        stored = f.read()
    assert stored == b"Received: x\r\nSubject: s\r\n\r\nbody\r\n"
    assert writer.total_size == len(stored) and writer.results is not None
    assert writer.results.removed == 1
