"""Fixtures of the API tests: running routers with a token."""

from __future__ import annotations

import pytest_twisted

from tests.api.support import Client, InMemoryQueue, start_api_router
from tests.support.router import stop_router


@pytest_twisted.async_yield_fixture
async def running(tmp_path):
    """(router, client, queue): the default config on free ports, api.token set, real queue."""
    router, port = start_api_router(str(tmp_path / "var"))
    try:
        yield router, Client(port), router.email.queue
    finally:
        await stop_router(router)


@pytest_twisted.async_yield_fixture
async def standin(tmp_path):
    """(router, client, queue) with the queue replaced by :class:`InMemoryQueue`.

    For states the real queue reaches only by timing (an item being delivered)
    and for failures (a queue that raises).
    """
    router, port = start_api_router(str(tmp_path / "var"))
    queue = InMemoryQueue()
    real = router.email.queue
    router.email.queue = queue
    try:
        yield router, Client(port), queue
    finally:
        router.email.queue = real
        await stop_router(router)
