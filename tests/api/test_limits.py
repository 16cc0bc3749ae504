"""Request limits of the API listener, with raw sockets and curl: body size and time, head size
and time (slowloris), JSON nesting.  Everything here is refused before authentication."""

from __future__ import annotations

import json
import os
import resource
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from typing import Optional

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from dcrouter.api.types import MAX_JSON_DEPTH, json_depth_exceeds, parse_json
from dcrouter.api import errors
from tests.api.support import TOKEN, start_api_router
from tests.support.router import stop_router


def read_until_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after the answer is a close)."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One response (status, headers, body) framed by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split(" ")[1]), headers, body[:length]


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    return int(raw.split(b" ", 2)[1])


def error_code(raw: bytes) -> str:
    body = raw.partition(b"\r\n\r\n")[2]
    return json.loads(body)["error"]["code"]


def temp_files_open() -> set[str]:
    """This process's open unlinked temporary files (``tempfile.TemporaryFile``, which
    twisted.web spools request bodies to: ``/tmp/#<inode> (deleted)`` with O_TMPFILE)."""
    found = set()
    tmp = tempfile.gettempdir()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(tmp) and target.endswith(" (deleted)"):
            found.add(target)
    return found


def rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@pytest_twisted.async_yield_fixture
async def api(tmp_path):
    """A router whose API has short timeouts and a 1000-byte body limit; yields its port."""
    router, port = start_api_router(str(tmp_path / "var"), header_timeout=1.0, body_timeout=1.0,
                                    max_body_size=1000)
    try:
        yield port
    finally:
        await stop_router(router)


@pytest_twisted.async_yield_fixture
async def default_api(tmp_path):
    """A router with the API's default limits; yields its port."""
    router, port = start_api_router(str(tmp_path / "var"))
    try:
        yield port
    finally:
        await stop_router(router)


# -- body size ---------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_a_300_mb_declared_body_is_refused_at_the_headers_before_authentication(default_api):
    port = default_api

    def post() -> tuple[bytes, set[str], int]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 314572800\r\n\r\n")
            status, headers, body = read_response(s)      # before any body byte is sent
            assert headers["connection"] == "close"
            # what a client that does not wait sends anyway is read and thrown away
            sent = 0
            try:
                for _ in range(64):
                    s.sendall(b"\0" * 65536)
                    sent += 65536
            except (BrokenPipeError, ConnectionResetError):
                pass
            spooled = temp_files_open()
            rest = read_until_close(s)
            return b"HTTP/1.1 %d \r\n\r\n" % status + body, spooled, len(rest)
    before = temp_files_open()
    rss_before = rss_kib()
    raw, spooled, rest = yield deferToThread(post)
    assert status_of(raw) == 413 and error_code(raw) == "payload_too_large"
    assert b"314572800" in raw
    assert not spooled - before, spooled        # nothing was written to a temporary file
    assert rest == 0                            # nothing after the answer: the server closed
    assert rss_kib() - rss_before < 32 * 1024


@pytest_twisted.inlineCallbacks
def test_curl_gets_413_for_a_big_upload_with_and_without_chunking(default_api):
    port = default_api

    def curl(*args: str) -> str:
        producer = subprocess.Popen(["head", "-c", str(5 * 1024 * 1024), "/dev/zero"],
                                    stdout=subprocess.PIPE)
        try:
            result = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                 "-H", "Content-Type: application/json", *args,
                 f"http://127.0.0.1:{port}/api/email/rules"],
                stdin=producer.stdout, capture_output=True, text=True, timeout=60)
        finally:
            producer.kill()
            producer.wait()
        return result.stdout
    # chunked: cut at the limit
    assert (yield deferToThread(curl, "-H", "Transfer-Encoding: chunked",
                                "--data-binary", "@-")) == "413"
    # declared length: refused before curl sends the body (it waits for 100 Continue)
    assert (yield deferToThread(curl, "-H", "Content-Length: 5242880", "--data-binary",
                                "@-")) == "413"


@pytest_twisted.inlineCallbacks
def test_a_chunked_body_is_cut_at_the_limit_and_one_below_it_is_read(api):
    port = api

    def chunked(total: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /api/email/rules HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                      b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            body = b"[" + b" " * (total - 2) + b"]"
            try:
                for i in range(0, len(body), 100):
                    piece = body[i:i + 100]
                    s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                s.sendall(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            status, _h, answer = read_response(s)
            return b"HTTP/1.1 %d \r\n\r\n" % status + answer
    raw = yield deferToThread(chunked, 5000)
    assert status_of(raw) == 413 and error_code(raw) == "payload_too_large"
    raw = yield deferToThread(chunked, 900)     # read whole; the handler refuses a list
    assert status_of(raw) == 400 and error_code(raw) == "bad_request"


# -- head and body time ---------------------------------------------------------------------

def trickle(port: int, first: bytes, piece: bytes, pieces: int = 100,
            delay: float = 0.2) -> bytes:
    """Send ``first``, then ``piece`` every ``delay`` seconds until the server answers/closes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    answer: list[bytes] = []
    reader = threading.Thread(target=lambda: answer.append(read_until_close(s)), daemon=True)
    reader.start()
    try:
        s.sendall(first)
        for _ in range(pieces):
            if not reader.is_alive():
                break
            time.sleep(delay)
            s.sendall(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    reader.join(20)
    s.close()
    assert not reader.is_alive(), "the server kept the connection open"
    return answer[0]


@pytest_twisted.inlineCallbacks
def test_a_trickled_head_is_cut_with_408(api):
    raw = yield deferToThread(trickle, api, b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                              b"X-Slow: a\r\n")
    assert status_of(raw) == 408 and error_code(raw) == "request_timeout"
    # byte by byte inside one header line as well
    raw = yield deferToThread(trickle, api, b"GET /api/status HTTP/1.1\r\nX-Slow: ", b"a")
    assert status_of(raw) == 408


@pytest_twisted.inlineCallbacks
def test_the_head_timeout_applies_to_every_request_of_a_kept_alive_connection(api):
    port = api

    def second_is_slow() -> tuple[int, bytes]:
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                  + TOKEN.encode() + b"\r\n\r\n")
        status, _h, _b = read_response(s)
        s.close()
        return status, trickle(port, b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
                               b"GET /api/status HTTP/1.1\r\n", b"X-Slow: a\r\n")
    first, raw = yield deferToThread(second_is_slow)
    assert first == 200
    assert raw.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in raw


@pytest_twisted.inlineCallbacks
def test_a_body_that_does_not_arrive_is_cut_with_408(api):
    raw = yield deferToThread(trickle, api, b"POST /api/email/rules HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 900\r\n\r\n", b"x")
    assert status_of(raw) == 408 and error_code(raw) == "request_timeout"


# -- head size --------------------------------------------------------------------------------

@pytest.mark.parametrize("head, status, code", [
    (b"GET /api/status HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101))
     + b"\r\n", 431, "request_header_fields_too_large"),
    (b"GET /api/status HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431,
     "request_header_fields_too_large"),
    (b"GET /api/status HTTP/1.1\r\n" + b"X-Some: " + b"b" * 1000 + b"\r\n" * 1 +
     b"".join(b"X-M%d: %s\r\n" % (i, b"c" * 1000) for i in range(17)) + b"\r\n", 431,
     "request_header_fields_too_large"),
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
])
@pytest_twisted.inlineCallbacks
def test_oversized_heads_are_refused(head, status, code, default_api):
    def send() -> bytes:
        with socket.create_connection(("127.0.0.1", default_api), timeout=10) as s:
            try:
                s.sendall(head)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return read_until_close(s)
    raw = yield deferToThread(send)
    assert status_of(raw) == status and error_code(raw) == code


@pytest_twisted.inlineCallbacks
def test_a_100_header_request_is_still_answered(default_api):
    def send() -> bytes:
        with socket.create_connection(("127.0.0.1", default_api), timeout=10) as s:
            s.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                      + b"".join(b"X-H%d: v\r\n" % i for i in range(97)) + b"\r\n")
            return read_until_close(s)
    assert status_of((yield deferToThread(send))) == 401


# -- over HTTPS -------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_refusals_work_over_https(tmp_path):
    router, port = start_api_router(str(tmp_path / "var"), tls=True, header_timeout=1.0)
    try:
        def over_tls(request: bytes, trickled: Optional[bytes] = None) -> bytes:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
                with context.wrap_socket(raw) as s:
                    s.sendall(request)
                    out = b""
                    while True:
                        try:
                            chunk = s.recv(65536)
                        except (ConnectionResetError, ssl.SSLError):
                            return out
                        if not chunk:
                            return out
                        out += chunk
        raw = await deferToThread(over_tls, b"POST /api/status HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 314572800\r\n\r\n")
        assert status_of(raw) == 413
        raw = await deferToThread(over_tls, b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
        assert status_of(raw) == 408
    finally:
        await stop_router(router)


# -- JSON ----------------------------------------------------------------------------------------

def test_json_bounds_units() -> None:
    assert not json_depth_exceeds("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert json_depth_exceeds("[" * (MAX_JSON_DEPTH + 1))
    assert not json_depth_exceeds('"' + "[" * 100 + '"')           # inside a string
    assert not json_depth_exceeds('["\\"' + "[" * 100 + '"]')       # escaped quote
    assert parse_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for bad in [b"[" * 100000 + b"]" * 100000, b"1" * 5000, b"[1e99999]", b"[NaN]",
                b"[-Infinity]", b'{"a": ' * 40 + b"1" + b"}" * 40, b"\xff"]:
        with pytest.raises(errors.ApiError) as info:
            parse_json(bad)
        assert info.value.status == 400


@pytest_twisted.inlineCallbacks
def test_deeply_nested_json_and_huge_numbers_get_400_not_500(default_api):
    def post(body: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", default_api), timeout=10) as s:
            s.sendall(b"POST /api/email/rules HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close"
                      b"\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                      % len(body) + body)
            return read_until_close(s)
    for body in [b"[" * 200000 + b"]" * 200000, b'{"pattern": ' + b"9" * 10000 + b"}",
                 b'{"pattern": "*@x.test", "x": ' + b"[" * 50 + b"]" * 50 + b"}"]:
        raw = yield deferToThread(post, body[:1024 * 1024])
        assert status_of(raw) == 400 and error_code(raw) == "bad_request", raw[:300]
