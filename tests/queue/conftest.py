"""Fixtures of the queue tests: a real redis-server on an ephemeral loopback port."""

from __future__ import annotations

import pytest

from tests.queue.helpers import redis_server


@pytest.fixture(scope="module")
def redis_url():
    """``redis://127.0.0.1:PORT/0`` of a redis-server started for the module (no persistence)."""
    with redis_server() as url:
        yield url
