"""Fixtures of the API tests: a running router with a token and a queue stand-in."""

from __future__ import annotations

import pytest_twisted

from tests.api.support import Client, InMemoryQueue, start_api_router
from tests.support.router import stop_router


@pytest_twisted.async_yield_fixture
async def running(tmp_path):
    """(router, client, queue): the default config on free ports, api.token set."""
    router, port = start_api_router(str(tmp_path / "var"))
    queue = InMemoryQueue()
    router.by_name["email"].queue = queue
    try:
        yield router, Client(port), queue
    finally:
        await stop_router(router)
