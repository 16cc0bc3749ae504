"""Redis addresses: parsing both URL forms, clear errors, and real connections (TCP and unix)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

import pytest
import pytest_twisted

from dcrouter.config import parse_config
from dcrouter.errors import ConfigError
from dcrouter.redisaddr import RedisAddress
from tests.queue.helpers import redis_server


@pytest.mark.parametrize("url, expected", [
    ("redis://127.0.0.1:6390/2", RedisAddress("127.0.0.1", 6390, 2)),
    ("redis://:s3cret@127.0.0.5/", RedisAddress("127.0.0.5", 6379, 0, "s3cret")),
    ("redis://localhost", RedisAddress("localhost", 6379, 0)),
    ("unix:///run/redis.sock?db=3", RedisAddress(db=3, unix_path="/run/redis.sock")),
    ("unix:///run/redis.sock", RedisAddress(unix_path="/run/redis.sock")),
])
def test_parse(url: str, expected: RedisAddress) -> None:
    assert RedisAddress.parse(url) == expected


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1/", "must be a redis:// or unix:// URL"),
    ("redis://127.0.0.1/abc", "the database in 'redis://127.0.0.1/abc' must be a number"),
    ("redis://127.0.0.1:99999/0", "the port in 'redis://127.0.0.1:99999/0' must be 1..65535"),
    ("unix:///run/redis.sock?db=\u00b9", "must be a number"),
    ("unix://", "names no socket path"),
])
def test_bad_urls_are_config_errors_naming_the_key(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"email": {"queue": {"storage_type": "redis", "redis_url": url}}})
    assert info.value.path == "email.queue.redis_url" and reason in str(info.value)


@pytest.fixture
def unix_redis() -> Any:
    """A redis-server listening only on a unix socket."""
    workdir = tempfile.mkdtemp(prefix="redis-unix-")
    sock = os.path.join(workdir, "redis.sock")
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", sock,
                             "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"unix://{sock}?db=1"
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest_twisted.inlineCallbacks
def test_connect_over_tcp_and_a_unix_socket(unix_redis: str) -> None:
    with redis_server() as tcp_url:
        for url in (tcp_url, unix_redis):
            address = RedisAddress.parse(url)
            connection = yield address.connect(reconnect=False, timeout=5)
            try:
                yield connection.set("dcrouter:probe", "one")
                assert (yield connection.get("dcrouter:probe")) == "one"
            finally:
                yield connection.disconnect()
            raw = yield address.connect(reconnect=False, timeout=5, raw=True)
            try:
                assert (yield raw.get("dcrouter:probe")) == b"one"
            finally:
                yield raw.disconnect()
